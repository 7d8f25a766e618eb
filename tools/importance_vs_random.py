"""At the same head budget, does measured importance beat chance? Linear-probe accuracy on Rotten Tomatoes.

Exports minilm-l6 once, removes the same share of heads in every layer chosen by calibration (head ablation
on Rotten Tomatoes training sentences), by magnitude, and at random (several seeds), and refits a linear
probe on each pruned model's embeddings: the table behind issue 4's acceptance point 4. Usage:

    .venv/bin/python tools/importance_vs_random.py [--fraction 0.5] [--seeds 5]
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx_ir as ir

from redux_edge import api
from redux_edge.analysis.quality import embed, probe_accuracy
from redux_edge.datasets import rotten_tomatoes
from redux_edge.passes import build_pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()

    source = api.load_source("minilm-l6")
    build_pass("cleanup", {})(source.model)
    dense = ir.to_proto(source.model)
    data = rotten_tomatoes.load()
    calibration = source.preprocessor(rotten_tomatoes.calibration_texts())

    def accuracy(model: ir.Model) -> float:
        train, test = (
            embed(model, source.preprocessor, texts) for texts in (data.train_texts, data.test_texts)
        )
        return probe_accuracy(train, data.train_labels, test, data.test_labels)

    rows = [("dense (no pruning)", accuracy(ir.from_proto(dense)))]
    variants = [("calibration", 0), ("magnitude", 0)] + [("random", seed) for seed in range(args.seeds)]
    for method, seed in variants:
        model = ir.from_proto(dense)
        configured = build_pass(
            "prune-heads", {"fraction": args.fraction, "importance": method, "seed": seed}
        )
        configured.calibration = calibration
        configured(model)
        label = f"{method} (seed {seed})" if method == "random" else method
        rows.append((label, accuracy(model)))
        print(f"{label}: {rows[-1][1]:.3f}", flush=True)

    random = np.array([value for label, value in rows if label.startswith("random")])
    print(f"\nprune-heads {args.fraction:.0%} of heads per layer, minilm-l6, Rotten Tomatoes linear probe")
    print(f"({len(data.train_texts)} train / {len(data.test_texts)} test sentences)\n")
    print("| heads chosen by | probe accuracy |\n|---|---|")
    for label, value in rows:
        print(f"| {label} | {value:.3f} |")
    print(f"| random, mean ± std of {len(random)} | {random.mean():.3f} ± {random.std():.3f} |")


if __name__ == "__main__":
    main()
