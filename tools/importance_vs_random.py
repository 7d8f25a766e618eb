"""At the same head budget, does measured importance beat chance? Linear probes on Rotten Tomatoes.

Exports minilm-l6 once, removes the same share of heads in every layer chosen by calibration (head ablation
on 32 Rotten Tomatoes training sentences), by magnitude, and at random (several seeds), and reports for
each pruned model: the accuracy of a linear probe refit on its own embeddings (the quality report's number),
the accuracy of the dense model's probe applied to its embeddings unchanged (how much of the dense
representation a downstream head could keep using), and the embedding cosine to dense. The evaluation set
is larger than the compile report's (by default the whole training split, 10,478 snippets, and the whole
test split, 2,273) because the refit probe's differences between reasonable head choices are about one
point, and a probe fitted on fewer snippets adds noise of that size. ``--plan FILE`` adds a row for a
head plan (e.g. the one `redux-edge train models/minilm-l6/train-shrp.toml` writes). Usage:

    .venv/bin/python tools/importance_vs_random.py [--fraction 0.5] [--seeds 8] [--train 4000] [--plan P]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnx_ir as ir

from redux_edge import api
from redux_edge.analysis.quality import embed, make_probe, probe_accuracy
from redux_edge.datasets import rotten_tomatoes
from redux_edge.passes import build_pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--train", type=int, default=100_000, help="training snippets (default: all)")
    parser.add_argument("--plan", action="append", default=[], help="also a head plan JSON (repeatable)")
    args = parser.parse_args()

    source = api.load_source("minilm-l6")
    build_pass("cleanup", {})(source.model)
    dense = ir.to_proto(source.model)
    data = rotten_tomatoes.load(train=args.train, test=100_000)
    calibration = source.preprocessor(rotten_tomatoes.calibration_texts())

    def embeddings(model: ir.Model) -> tuple[np.ndarray, np.ndarray]:
        return tuple(
            embed(model, source.preprocessor, texts) for texts in (data.train_texts, data.test_texts)
        )

    dense_train, dense_test = embeddings(ir.from_proto(dense))
    dense_probe = make_probe().fit(dense_train, data.train_labels)

    def measure(label: str, model: ir.Model) -> dict:
        train, test = embeddings(model)
        cosine = (test * dense_test).sum(1) / (
            np.linalg.norm(test, axis=1) * np.linalg.norm(dense_test, axis=1)
        )
        row = {
            "label": label,
            "refit": probe_accuracy(train, data.train_labels, test, data.test_labels),
            "dense_probe": float(dense_probe.score(test, data.test_labels)),
            "cosine": float(cosine.mean()),
        }
        print(f"{label}: {row}", file=sys.stderr, flush=True)
        return row

    rows = [measure("dense (no pruning)", ir.from_proto(dense))]
    variants = [("calibration", 0), ("magnitude", 0)] + [("random", seed) for seed in range(args.seeds)]
    variants += [("plan", plan) for plan in args.plan]
    for method, choice in variants:
        model = ir.from_proto(dense)
        parameters = {"fraction": args.fraction, "importance": method}
        parameters |= {"plan": choice} if method == "plan" else {"seed": choice}
        configured = build_pass("prune-heads", parameters).prepared({"calibration": calibration})
        configured(model)
        label = {"random": f"random (seed {choice})", "plan": f"plan {choice}"}.get(method, method)
        rows.append(measure(label, model))

    random = [row for row in rows if row["label"].startswith("random")]
    print(
        f"prune-heads: {args.fraction:.0%} of the heads of every layer of minilm-l6; Rotten Tomatoes, ",
        end="",
    )
    print(f"{len(data.train_texts)} train / {len(data.test_texts)} test snippets\n")
    print("| heads chosen by | probe refit | dense probe, unchanged | embedding cosine to dense |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['label']} | {row['refit']:.3f} | {row['dense_probe']:.3f} | {row['cosine']:.3f} |")
    if not random:
        return
    columns = {key: np.array([row[key] for row in random]) for key in ("refit", "dense_probe", "cosine")}
    print(
        f"| random, mean ± std of {len(random)} | "
        + " | ".join(f"{v.mean():.3f} ± {v.std():.3f}" for v in columns.values())
        + " |"
    )
    calibrated = rows[1]
    beaten = {key: int((calibrated[key] > values).sum()) for key, values in columns.items()}
    print(f"\ncalibration is above {beaten} of the {len(random)} random choices (refit, dense probe, cosine)")


if __name__ == "__main__":
    main()
