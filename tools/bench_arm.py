"""ONNX Runtime against TVM for the arm64 targets, each bundle's own runner on the EMULATED aarch64 board
(redux_edge/deploy/emulated.py: qemu-aarch64 as the target's core). Same model, same inputs (the bundle's
recorded sample), same threads; blocks in the order ORT, TVM untuned, TVM tuned, then reversed, so that
drift hits all alike. The ratios TVM / ONNX Runtime are what the arm64 targets' default backend follows
from (docs/TARGETS.md); absolute times under emulation say nothing about a board.

Tuned TVM: MetaSchedule with ``--tvm-trials`` trials in all, from an empty database, every candidate
measured on the emulated core through TVM's RPC (``board_rpc_tracker``), as ``compile --tune N
--rpc-tracker`` does with a real board.

    python tools/bench_arm.py [--model mnist-cnn] [--iterations 10] [--threads 2] [--tvm-trials 32] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from redux_edge import api
from redux_edge.backends.board import board_python
from redux_edge.deploy.emulated import board_rpc_tracker
from redux_edge.recipe import load_recipe
from redux_edge.targets import load_target

TARGETS = ("arm64-cortex-a72", "arm64-cortex-a76")


def _bench(python: Path, bundle: Path, iterations: int, threads: int) -> dict:
    argv = [str(python), str(bundle / "runner" / "run.py"), "--bench", "--json", "--warmup", "1"]
    argv += ["--iterations", str(iterations), "--threads", str(threads), "--latencies"]
    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=3600)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(model: str, target_name: str, folder: Path, iterations: int, threads: int, trials: int) -> dict:
    target = load_target(target_name)
    python = board_python(target.cpu)
    if python is None:
        raise SystemExit("no emulated aarch64 board: run make aarch64-board (as root)")
    variants: dict[str, tuple[str, dict]] = {
        "onnxruntime": ("onnxruntime", {}),
        "tvm untuned": ("tvm", {"tuning_db": folder / f"{target_name}-no-tuning"}),
    }
    with contextlib.ExitStack() as stack:
        if trials:
            key = f"emulated-{target.cpu}"
            tracker = stack.enter_context(board_rpc_tracker(target.cpu, key))
            tuning = {"tune": trials, "tuning_db": folder / f"{target_name}-tuning"}
            variants[f"tvm tuned ({trials} trials)"] = (
                "tvm",
                {**tuning, "rpc": {"tracker": tracker, "key": key}},
            )
        bundles = {
            name: api.compile_model(
                model,
                target_name,
                load_recipe(None),
                folder / f"{target_name}-{index}",
                backend_name=backend,
                backend_options={"threads": threads, **options},
            ).path
            for index, (name, (backend, options)) in enumerate(variants.items())
        }
    latencies: dict[str, list[float]] = {name: [] for name in variants}
    for name in (*variants, *reversed(variants)):
        report = _bench(python, bundles[name], iterations, threads)
        latencies[name] += report["latencies_ms"]
    p50 = {name: statistics.median(values) for name, values in latencies.items()}
    tuned = [name for name in variants if name.startswith("tvm tuned")]
    records = {
        name: json.loads((bundles[name] / "manifest.json").read_text())["backend"]["tuning"]["records_after"]
        for name in tuned
    }
    return {
        "tuning_records": records,
        "target": target_name,
        "emulated": report["emulated"],
        "batch": report["batch"],
        "p50_ms": p50,
        "over_onnxruntime": {
            name: p50[name] / p50["onnxruntime"] for name in variants if name != "onnxruntime"
        },
        "faster": min(p50, key=p50.__getitem__),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist-cnn")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tvm-trials", type=int, default=32, help="MetaSchedule budget (0: no tuned row)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, api.native_output_to_stderr():
        rows = [
            measure(args.model, name, Path(folder), args.iterations, args.threads, args.tvm_trials)
            for name in TARGETS
        ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{args.model}, {args.threads} threads, {2 * args.iterations} runs per backend, EMULATED (qemu)")
    for row in rows:
        times = "  ".join(f"{name} {ms:.1f} ms" for name, ms in row["p50_ms"].items())
        ratios = "  ".join(
            f"{name} / onnxruntime {ratio:.2f}" for name, ratio in row["over_onnxruntime"].items()
        )
        print(f"  {row['target']:<18} batch {row['batch']}  {times}")
        records = "".join(
            f", {count} schedules measured on the board" for count in row["tuning_records"].values()
        )
        print(f"  {'':<18} {ratios}  fastest: {row['faster']}{records}  ({row['emulated']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
