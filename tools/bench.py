"""Side-by-side latency of minilm-l6 in one process: PyTorch eager, ONNX Runtime on a plain export,
ONNX Runtime after its transformer optimizer, and the redux-edge ``host`` bundle.

Every row gets the same inputs (real sentences, tokenised to the benchmarked length) and the same thread
count. Rows are measured in blocks (warm-up, then consecutive calls), in forward and then reverse order,
so that drift in machine load hits all rows alike; calls are not interleaved one by one because each
ONNX Runtime session keeps its own spinning thread pool, and the previous row's spinning threads would
steal the two cores from the next row. Ratios are to the plain export: latency ratio < 1 and throughput
ratio > 1 are better. The redux-edge row must not be slower than the transformer-optimizer row
(ratio <= 1.05).

    python tools/bench.py [--threads 2] [--rounds 60] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnxruntime.transformers import optimizer as ort_transformer_optimizer

from redux_edge import api, zoo
from redux_edge.frontend.torch import export_module
from redux_edge.recipe import load_recipe
from redux_edge.runtime.runner import BundleSession, latency_stats

CASES = ((1, 128), (8, 128))
ALLOWED_RATIO_TO_OPTIMIZER = 1.05


def _sentences_to_length(entry: zoo.ZooModel, batch: int, length: int) -> dict[str, np.ndarray]:
    """Real text from the model card, tokenised and cut to exactly ``length`` tokens."""
    card = zoo.load_card(entry.name)
    text = " ".join(card["samples"] * 8)
    encoded = entry.preprocessor([text])
    ids = np.concatenate([encoded["input_ids"][:, : length - 1], encoded["input_ids"][:, -1:]], axis=1)
    return {"input_ids": np.repeat(ids, batch, axis=0), "attention_mask": np.ones((batch, length), np.int64)}


def _ort_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _rows(workdir: Path, threads: int) -> dict[str, Callable[[dict[str, np.ndarray]], object]]:
    entry = zoo.load_model("minilm-l6")
    plain = workdir / "plain.onnx"
    ir.save(export_module(entry.module, entry.inputs, entry.dynamic_axes, entry.output_names), str(plain))
    optimized = ort_transformer_optimizer.optimize_model(
        str(plain),
        model_type="bert",
        num_heads=entry.architecture["num_heads"],
        hidden_size=entry.architecture["hidden_size"],
    )
    optimized.save_model_to_file(str(workdir / "ort_transformer_optimizer.onnx"))
    bundle = api.compile_model(
        "minilm-l6", "host", load_recipe(None), workdir / "bundle", backend_options={"threads": threads}
    )
    torch.set_num_threads(threads)
    module = entry.module.eval()
    sessions = {
        "plain": _ort_session(plain, threads),
        "optimizer": _ort_session(workdir / "ort_transformer_optimizer.onnx", threads),
    }
    redux = BundleSession(bundle.path, threads)

    def eager(feeds: dict[str, np.ndarray]) -> object:
        with torch.inference_mode():
            return module(*(torch.from_numpy(a) for a in feeds.values()))

    return {
        "PyTorch eager": eager,
        "ONNX Runtime, plain export": lambda feeds: sessions["plain"].run(None, feeds),
        "ONNX Runtime, transformer optimizer (bert)": lambda feeds: sessions["optimizer"].run(None, feeds),
        "redux-edge host bundle": redux.run,
    }


def measure(
    rows: dict[str, Callable], feeds: dict[str, np.ndarray], rounds: int, warmup: int
) -> dict[str, dict]:
    seconds: dict[str, list[float]] = {name: [] for name in rows}
    for order in (list(rows), list(rows)[::-1]):
        for name in order:
            run = rows[name]
            for _ in range(warmup):
                run(feeds)
            for _ in range(rounds // 2):
                started = time.perf_counter()
                run(feeds)
                seconds[name].append(time.perf_counter() - started)
    batch = feeds["input_ids"].shape[0]
    return {name: latency_stats(values, batch) for name, values in seconds.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--rounds", type=int, default=60, help="measured rounds at batch 1 (batch 8: a third)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    entry = zoo.load_model("minilm-l6")
    report = {"threads": args.threads, "cases": []}
    with tempfile.TemporaryDirectory() as workdir:
        rows = _rows(Path(workdir), args.threads)
        for batch, length in CASES:
            feeds = _sentences_to_length(entry, batch, length)
            rounds = args.rounds if batch == 1 else max(10, args.rounds // 3)
            stats = measure(rows, feeds, rounds, warmup=5)
            base = stats["ONNX Runtime, plain export"]
            for numbers in stats.values():
                numbers["latency_ratio"] = numbers["p50_ms"] / base["p50_ms"]
                numbers["throughput_ratio"] = numbers["throughput_per_s"] / base["throughput_per_s"]
            ours = stats["redux-edge host bundle"]["p50_ms"]
            theirs = stats["ONNX Runtime, transformer optimizer (bert)"]["p50_ms"]
            report["cases"].append(
                {
                    "batch": batch,
                    "sequence": length,
                    "rounds": rounds,
                    "rows": stats,
                    "redux_vs_optimizer": ours / theirs,
                }
            )
    passed = all(case["redux_vs_optimizer"] <= ALLOWED_RATIO_TO_OPTIMIZER for case in report["cases"])
    report["passed"] = passed
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0 if passed else 1


def _print(report: dict) -> None:
    print(
        f"minilm-l6, {report['threads']} threads, p50 over forward and reverse blocks; "
        "ratios to the plain export"
    )
    for case in report["cases"]:
        print(f"\nbatch {case['batch']}, sequence {case['sequence']} ({case['rounds']} rounds)")
        print(
            f"  {'row':<44} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'items/s':>9} {'lat ratio':>10} "
            f"{'thr ratio':>10}"
        )
        for name, s in case["rows"].items():
            print(
                f"  {name:<44} {s['p50_ms']:9.2f} {s['p90_ms']:9.2f} {s['p99_ms']:9.2f} "
                f"{s['throughput_per_s']:9.1f} {s['latency_ratio']:10.3f} {s['throughput_ratio']:10.3f}"
            )
        verdict = "ok" if case["redux_vs_optimizer"] <= ALLOWED_RATIO_TO_OPTIMIZER else "SLOWER"
        print(
            f"  redux-edge / transformer optimizer p50: {case['redux_vs_optimizer']:.3f} "
            f"(must be <= {ALLOWED_RATIO_TO_OPTIMIZER}: {verdict})"
        )


if __name__ == "__main__":
    sys.exit(main())
