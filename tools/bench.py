"""Side-by-side latency of minilm-l6 in one process: PyTorch eager, ONNX Runtime on a plain export,
ONNX Runtime after its transformer optimizer, and the peer a user would pick for speed, ONNX Runtime's
one-line dynamic INT8 quantization of that optimizer's output; and redux-edge bundles for this machine:
ONNX Runtime (the ``host`` default) dense, INT8 (static and dynamic) and after the ``edge`` structural
recipe (models/minilm-l6/edge.toml) in fp32 and INT8, OpenVINO in fp32, INT8 and bf16 (where the CPU has
it), and TVM untuned and tuned with a small MetaSchedule budget. The cosine column is each row's sentence
embeddings against the plain export's on 64 real held-out sentences (Rotten Tomatoes).

Every row gets the same inputs (real sentences, tokenised to the benchmarked length) and the same thread
count. Rows are measured in blocks (warm-up, then consecutive calls), in forward and then reverse order,
so that drift in machine load hits all rows alike; calls are not interleaved one by one because each
ONNX Runtime session keeps its own spinning thread pool, and the previous row's spinning threads would
steal the two cores from the next row. Ratios are to the plain export: latency ratio < 1 and throughput
ratio > 1 are better. The redux-edge row must not be slower than the transformer-optimizer row
(ratio <= 1.05); the edge recipe's throughput goal is 2.5x the dense bundle's. Quantization goals: the INT8
dense bundle at cosine >= 0.99 and no slower than the peer; edge + INT8 at 5x the dense bundle's
throughput; bf16 at cosine >= 0.999 and faster than fp32.

    python tools/bench.py [--threads 2] [--rounds 60] [--tvm-trials 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers import optimizer as ort_transformer_optimizer

from redux_edge import api, zoo
from redux_edge.backends import BACKENDS
from redux_edge.datasets import rotten_tomatoes
from redux_edge.frontend.torch import export_module
from redux_edge.recipe import load_recipe, passes_from_flags
from redux_edge.runtime.session import BundleSession, latency_stats
from redux_edge.targets import load_target

CASES = ((1, 128), (8, 128))
ALLOWED_RATIO_TO_OPTIMIZER = 1.05
PLAIN = "ONNX Runtime, plain export"
OPTIMIZER = "ONNX Runtime, transformer optimizer (bert)"
REDUX = "redux-edge host bundle (ONNX Runtime)"
EDGE = "redux-edge host bundle, edge recipe (ONNX Runtime)"
EDGE_RECIPE = Path(__file__).resolve().parent.parent / "models" / "minilm-l6" / "edge.toml"
EDGE_GOAL = 2.5
PEER = "ONNX Runtime quantize_dynamic (QInt8) of the optimizer's output"
INT8 = "redux-edge INT8 bundle (static QDQ, ONNX Runtime)"
INT8_DYNAMIC = "redux-edge INT8-dynamic bundle (ONNX Runtime)"
EDGE_INT8 = "redux-edge edge recipe + INT8 (ONNX Runtime)"
BF16 = "redux-edge OpenVINO bundle (bf16)"
INT8_COSINE_GOAL, BF16_COSINE_GOAL, EDGE_INT8_GOAL = 0.99, 0.999, 5.0


@dataclass
class Row:
    run: Callable[[dict[str, np.ndarray]], object]
    # rows that take seconds per call (untuned TVM) are measured fewer times
    max_rounds: int = 1_000_000


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


def _rows(workdir: Path, threads: int) -> dict[str, Row]:
    """The rows that take any shape: PyTorch, ONNX Runtime two ways, and the dynamic-shape bundles."""
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
    # The peer: ONNX Runtime's documented one line for a faster transformer on a CPU.
    quantize_dynamic(
        workdir / "ort_transformer_optimizer.onnx", workdir / "peer_int8.onnx", weight_type=QuantType.QInt8
    )
    sessions = {
        "plain": _ort_session(plain, threads),
        "optimizer": _ort_session(workdir / "ort_transformer_optimizer.onnx", threads),
        "peer": _ort_session(workdir / "peer_int8.onnx", threads),
    }
    torch.set_num_threads(threads)
    module = entry.module.eval()

    def eager(feeds: dict[str, np.ndarray]) -> object:
        with torch.inference_mode():
            return module(*(torch.from_numpy(a) for a in feeds.values()))

    rows = {
        "PyTorch eager": Row(eager),
        PLAIN: Row(lambda feeds: sessions["plain"].run(None, feeds)),
        OPTIMIZER: Row(lambda feeds: sessions["optimizer"].run(None, feeds)),
        PEER: Row(lambda feeds: sessions["peer"].run(None, feeds)),
        REDUX: Row(_bundle(workdir / "ort", threads).run),
        INT8: Row(_bundle(workdir / "int8", threads, quantize="int8").run),
        INT8_DYNAMIC: Row(_bundle(workdir / "int8-dynamic", threads, quantize="int8-dynamic").run),
        EDGE: Row(_bundle(workdir / "edge", threads, recipe=EDGE_RECIPE).run),
        EDGE_INT8: Row(_bundle(workdir / "edge-int8", threads, recipe=EDGE_RECIPE, quantize="int8").run),
        "redux-edge OpenVINO bundle (fp32)": Row(_bundle(workdir / "ov", threads, backend="openvino").run),
        "redux-edge OpenVINO bundle (INT8)": Row(
            _bundle(workdir / "ov-int8", threads, backend="openvino", quantize="int8").run
        ),
    }
    if not BACKENDS["openvino"].precision_refusal("bf16", load_target("host")):
        rows[BF16] = Row(_bundle(workdir / "ov-bf16", threads, backend="openvino", quantize="bf16").run)
    return rows


def _tvm_rows(workdir: Path, threads: int, shapes: dict[str, list[int]], trials: int) -> dict[str, Row]:
    """TVM bundles for one static shape: untuned, and tuned with a small MetaSchedule budget."""
    tag = "x".join(str(d) for d in shapes["input_ids"])
    untuned = _bundle(
        workdir / f"tvm-{tag}", threads, backend="tvm", shapes=shapes, tuning_db=workdir / "no-tuning"
    )
    rows = {"redux-edge TVM bundle, untuned": Row(untuned.run, max_rounds=4)}
    if trials:
        tuned = _bundle(
            workdir / f"tvm-tuned-{tag}",
            threads,
            backend="tvm",
            shapes=shapes,
            tune=trials,
            tuning_db=workdir / "tuning",
        )
        rows[f"redux-edge TVM bundle, tuned ({trials} trials)"] = Row(tuned.run, max_rounds=10)
    return rows


def _bundle(
    out: Path,
    threads: int,
    backend: str | None = None,
    shapes: dict | None = None,
    recipe: Path | None = None,
    quantize: str | None = None,
    **options,
) -> BundleSession:
    api.compile_model(
        "minilm-l6",
        "host",
        load_recipe(recipe).extended(passes_from_flags({"quantize": quantize})),
        out,
        backend_name=backend,
        shapes=shapes,
        backend_options={"threads": threads, **options},
    )
    return BundleSession(out, threads)


def cosines(rows: dict[str, Row], entry: zoo.ZooModel) -> dict[str, float | None]:
    """Each row's mean cosine to the plain export's sentence embeddings on 64 real held-out sentences
    (None for static-shape rows, which take one shape only)."""
    feeds = entry.preprocessor(rotten_tomatoes.load().test_texts[:64])
    reference = np.asarray(rows[PLAIN].run(feeds)[0])
    found: dict[str, float | None] = {}
    for name, row in rows.items():
        if row.max_rounds < 1_000_000 or name == "PyTorch eager":
            found[name] = None
            continue
        got = np.asarray(row.run(feeds)[0])  # type: ignore[index]
        dots = (got * reference).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))
        found[name] = float(dots.mean())
    return found


def measure(
    rows: dict[str, Row], feeds: dict[str, np.ndarray], rounds: int, warmup: int, blocks: int = 6
) -> dict[str, dict]:
    """Each row's calls in ``blocks`` blocks, rows in forward then reverse order, alternating: a slow
    phase of a shared machine then lands on every row rather than on the one that happened to run."""
    seconds: dict[str, list[float]] = {name: [] for name in rows}
    for block in range(blocks):
        for name in list(rows) if block % 2 == 0 else list(rows)[::-1]:
            row = rows[name]
            calls = min(rounds, row.max_rounds) // blocks
            if calls == 0 and block >= 2:
                continue  # a row too slow for every block gets one call in each of the first two
            for _ in range(min(warmup, row.max_rounds) if block < 2 else 0):
                row.run(feeds)
            for _ in range(calls or 1):
                started = time.perf_counter()
                row.run(feeds)
                seconds[name].append(time.perf_counter() - started)
    batch = feeds["input_ids"].shape[0]
    return {name: latency_stats(values, batch) for name, values in seconds.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--rounds", type=int, default=60, help="measured rounds at batch 1 (batch 8: a third)"
    )
    parser.add_argument(
        "--tvm-trials", type=int, default=8, help="MetaSchedule budget per shape (0: no tuned row)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    entry = zoo.load_model("minilm-l6")
    report = {"threads": args.threads, "cases": []}
    with tempfile.TemporaryDirectory() as workdir:
        with api.native_output_to_stderr():
            rows = _rows(Path(workdir), args.threads)
        similarity = cosines(rows, entry)
        for batch, length in CASES:
            feeds = _sentences_to_length(entry, batch, length)
            shapes = {name: list(array.shape) for name, array in feeds.items()}
            with api.native_output_to_stderr():
                case_rows = rows | _tvm_rows(Path(workdir), args.threads, shapes, args.tvm_trials)
            rounds = args.rounds if batch == 1 else max(10, args.rounds // 3)
            stats = measure(case_rows, feeds, rounds, warmup=5)
            base = stats[PLAIN]
            for name, numbers in stats.items():
                numbers["latency_ratio"] = numbers["p50_ms"] / base["p50_ms"]
                numbers["throughput_ratio"] = numbers["throughput_per_s"] / base["throughput_per_s"]
                numbers["cosine"] = similarity.get(name)
            # The goal's pair again on its own, so that no other row's threads sit between them.
            pair = measure({name: case_rows[name] for name in (REDUX, EDGE)}, feeds, rounds, warmup=5)
            ours = stats[REDUX]["p50_ms"]
            theirs = stats[OPTIMIZER]["p50_ms"]
            report["cases"].append(
                {
                    "batch": batch,
                    "sequence": length,
                    "rounds": rounds,
                    "rows": stats,
                    "redux_vs_optimizer": ours / theirs,
                    "edge_vs_dense_throughput": stats[EDGE]["throughput_per_s"]
                    / stats[REDUX]["throughput_per_s"],
                    "edge_vs_dense_throughput_pair": pair[EDGE]["throughput_per_s"]
                    / pair[REDUX]["throughput_per_s"],
                    "quantization_goals": _quantization_goals(stats),
                }
            )
    passed = all(case["redux_vs_optimizer"] <= ALLOWED_RATIO_TO_OPTIMIZER for case in report["cases"])
    report["passed"] = passed
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0 if passed else 1


def _quantization_goals(stats: dict[str, dict]) -> dict[str, dict]:
    """Each quantization goal of docs/QUANTIZATION.md's table: the measured figure and whether it is met."""
    goals = {}
    for name in (INT8, INT8_DYNAMIC):
        ratio = stats[name]["p50_ms"] / stats[PEER]["p50_ms"]
        cosine = stats[name]["cosine"]
        goals[name] = {
            "p50_vs_peer": ratio,
            "cosine": cosine,
            "met": ratio <= 1.0 and cosine >= INT8_COSINE_GOAL,
            "goal": f"p50 <= the peer's, cosine >= {INT8_COSINE_GOAL}",
        }
    edge = stats[EDGE_INT8]["throughput_per_s"] / stats[REDUX]["throughput_per_s"]
    goals[EDGE_INT8] = {
        "throughput_vs_dense": edge,
        "met": edge >= EDGE_INT8_GOAL,
        "goal": f">= {EDGE_INT8_GOAL}x the dense bundle's throughput",
    }
    if BF16 in stats:
        ratio = stats[BF16]["p50_ms"] / stats[REDUX]["p50_ms"]
        cosine = stats[BF16]["cosine"]
        goals[BF16] = {
            "p50_vs_fp32": ratio,
            "cosine": cosine,
            "met": ratio < 1.0 and cosine >= BF16_COSINE_GOAL,
            "goal": f"faster than the fp32 bundle, cosine >= {BF16_COSINE_GOAL}",
        }
    return goals


def _print(report: dict) -> None:
    print(
        f"minilm-l6, {report['threads']} threads, p50 over 6 alternating forward and reverse blocks; "
        "ratios to the plain export"
    )
    for case in report["cases"]:
        print(
            f"\nbatch {case['batch']}, sequence {case['sequence']} ({case['rounds']} rounds; "
            "untuned TVM: 2, tuned TVM: 6)"
        )
        print(
            f"  {'row':<66} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'items/s':>9} {'lat ratio':>10} "
            f"{'thr ratio':>10} {'cosine':>8}"
        )
        for name, s in case["rows"].items():
            cosine = f"{s['cosine']:8.4f}" if s.get("cosine") is not None else f"{'-':>8}"
            print(
                f"  {name:<66} {s['p50_ms']:9.2f} {s['p90_ms']:9.2f} {s['p99_ms']:9.2f} "
                f"{s['throughput_per_s']:9.1f} {s['latency_ratio']:10.3f} {s['throughput_ratio']:10.3f} "
                f"{cosine}"
            )
        verdict = "ok" if case["redux_vs_optimizer"] <= ALLOWED_RATIO_TO_OPTIMIZER else "SLOWER"
        print(
            f"  redux-edge / transformer optimizer p50: {case['redux_vs_optimizer']:.3f} "
            f"(must be <= {ALLOWED_RATIO_TO_OPTIMIZER}: {verdict})"
        )
        for label, edge in (
            ("among all rows", case["edge_vs_dense_throughput"]),
            ("measured as a pair", case["edge_vs_dense_throughput_pair"]),
        ):
            print(
                f"  edge recipe / dense, same backend, throughput, {label}: {edge:.2f}x "
                f"(goal >= {EDGE_GOAL}: {'met' if edge >= EDGE_GOAL else 'NOT MET'})"
            )
        for name, goal in case["quantization_goals"].items():
            figures = ", ".join(
                f"{key} {value:.3f}" for key, value in goal.items() if isinstance(value, float)
            )
            print(f"  {name}: {figures} (goal {goal['goal']}: {'met' if goal['met'] else 'NOT MET'})")


if __name__ == "__main__":
    sys.exit(main())
