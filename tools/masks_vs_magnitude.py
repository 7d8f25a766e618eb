"""Do learned 2:4 masks (MaskLLM) keep more of MiniLM than magnitude masks? Rotten Tomatoes, fixed split.

Exports minilm-l6, sparsifies every eligible weight 2:4 with magnitude masks and with masks learned by
``redux-edge learn-masks`` (trained here unless --masks names a plan), and reports for each: the embedding
cosine to dense on the test sentences, the accuracy of a linear probe refit on its own embeddings, and of
the dense model's probe applied unchanged: the quality report's numbers, on a larger split than the
compile report's (by default the whole training split, 10,478 snippets, and the whole test split, 2,273),
since the refit probes of the two masks differ by less than the small split's noise. Usage:

    .venv/bin/python tools/masks_vs_magnitude.py [--masks plan.npz] [--steps 300] [--sentences 4096] \
        [--train 2000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import onnx_ir as ir

from redux_edge import api
from redux_edge.analysis.quality import text_quality
from redux_edge.datasets import rotten_tomatoes
from redux_edge.passes import build_pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", type=Path, help="a learned plan (default: learn one now)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sentences", type=int, default=4096)
    parser.add_argument("--train", type=int, default=100_000, help="training snippets (default: all)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        plan = args.masks
        if plan is None:
            plan = Path(scratch) / "masks.npz"
            started = time.perf_counter()
            learned = api.learn_mask_plan("minilm-l6", plan, steps=args.steps, sentences=args.sentences)
            print(f"learned in {time.perf_counter() - started:.0f} s: {learned}", file=sys.stderr)
        source = api.load_source("minilm-l6")
        build_pass("cleanup", {})(source.model)
        dense = ir.to_proto(source.model)
        data = rotten_tomatoes.load(train=args.train, test=100_000)
        rows = {}
        for label, parameters in (
            ("magnitude", {}),
            ("learned (MaskLLM)", {"mask": "learned", "plan": str(plan)}),
        ):
            model = ir.from_proto(dense)
            build_pass("sparsity", parameters)(model)
            rows[label] = text_quality(ir.from_proto(dense), model, source.preprocessor, data)
            print(f"{label}: {rows[label]}", file=sys.stderr, flush=True)

    first = next(iter(rows.values()))
    print(
        f"2:4 sparsity of every eligible weight of minilm-l6 (36 projections); Rotten Tomatoes, "
        f"{first['train_sentences']} train / {first['test_sentences']} test snippets; dense probe "
        f"{first['probe_accuracy']['dense']:.3f}\n"
    )
    print("| masks | embedding cosine to dense (mean / min) | probe refit | dense probe, unchanged |")
    print("|---|---|---|---|")
    for label, quality in rows.items():
        cosine, probe = quality["embedding_cosine"], quality["probe_accuracy"]
        print(
            f"| {label} | {cosine['mean']:.3f} / {cosine['min']:.3f} | {probe['compressed']:.3f} | "
            f"{probe['dense_probe_on_compressed']:.3f} |"
        )


if __name__ == "__main__":
    main()
