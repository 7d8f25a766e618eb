"""ONNX Runtime against TVM for the arm64 targets, each bundle's own runner on the EMULATED aarch64 board
(redux_edge/deploy/emulated.py: qemu-aarch64 as the target's core). Same model, same inputs (the bundle's
recorded sample), same threads; blocks in the order ORT, TVM, TVM, ORT, so that drift hits both alike.
The ratio TVM / ONNX Runtime is what the arm64 targets' default backend follows from (README, "Targets");
absolute times under emulation say nothing about a board.

TVM here is untuned: tuning for aarch64 needs a board behind a TVM RPC tracker (``compile --tune N
--rpc-tracker``); tuned TVM against ONNX Runtime on x86 is ``tools/bench.py --tvm-trials N``.

    python tools/bench_arm.py [--model mnist-cnn] [--iterations 10] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from redux_edge import api
from redux_edge.deploy.emulated import board_python
from redux_edge.recipe import load_recipe
from redux_edge.targets import load_target

TARGETS = ("arm64-cortex-a72", "arm64-cortex-a76")
BACKENDS = ("onnxruntime", "tvm")


def _bench(python: Path, bundle: Path, iterations: int, threads: int) -> dict:
    argv = [str(python), str(bundle / "runner" / "run.py"), "--bench", "--json", "--warmup", "1"]
    argv += ["--iterations", str(iterations), "--threads", str(threads), "--latencies"]
    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=3600)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(model: str, target_name: str, folder: Path, iterations: int, threads: int) -> dict:
    target = load_target(target_name)
    python = board_python(target.cpu)
    if python is None:
        raise SystemExit("no emulated aarch64 board: run make aarch64-board (as root)")
    bundles = {
        backend: api.compile_model(
            model, target_name, load_recipe(None), folder / f"{target_name}-{backend}", backend_name=backend
        ).path
        for backend in BACKENDS
    }
    latencies: dict[str, list[float]] = {backend: [] for backend in BACKENDS}
    emulated = ""
    for backend in (*BACKENDS, *reversed(BACKENDS)):
        report = _bench(python, bundles[backend], iterations, threads)
        latencies[backend] += report["latencies_ms"]
        emulated = report["emulated"]
    p50 = {backend: statistics.median(values) for backend, values in latencies.items()}
    return {
        "target": target_name,
        "emulated": emulated,
        "batch": report["batch"],
        "p50_ms": p50,
        "tvm_over_onnxruntime": p50["tvm"] / p50["onnxruntime"],
        "faster": min(p50, key=p50.__getitem__),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist-cnn")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, api.native_output_to_stderr():
        rows = [measure(args.model, name, Path(folder), args.iterations, args.threads) for name in TARGETS]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{args.model}, {args.threads} threads, {2 * args.iterations} runs per backend, EMULATED (qemu)")
    for row in rows:
        p50 = row["p50_ms"]
        print(
            f"  {row['target']:<18} batch {row['batch']}  onnxruntime {p50['onnxruntime']:9.1f} ms  "
            f"tvm (untuned) {p50['tvm']:9.1f} ms  tvm / onnxruntime {row['tvm_over_onnxruntime']:6.2f}"
            f"  ({row['emulated']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
