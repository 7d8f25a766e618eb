"""How much do 1-bit adapters lose against the same adapters in fp32? Two Rotten Tomatoes tasks.

Trains rank-4 LoRA adapters (attention query and value of every layer) and a task head on the frozen
minilm-l6, once quantization-aware at each requested bit width and once in fp32, for each task
(``sentiment``: fresh vs rotten; ``plot``: plot summary vs review), and reports the test accuracy measured
through each pack as the device reads it, and the pack's size. Usage:

    .venv/bin/python tools/adapter_bits.py [--bits 1 32] [--sentences 1000] [--epochs 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from redux_edge import api


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--tasks", nargs="+", default=["sentiment", "plot"])
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for task in args.tasks:
            for bits in args.bits:
                started = time.perf_counter()
                report = api.train_adapter_pack(
                    "minilm-l6",
                    task,
                    Path(scratch) / f"{task}-{bits}.bin",
                    bits=bits,
                    sentences=args.sentences,
                    epochs=args.epochs,
                )
                report["seconds"] = time.perf_counter() - started
                print(report, file=sys.stderr, flush=True)
                rows.append(report)
    print(
        f"rank-4 LoRA on query and value of the 6 layers of minilm-l6 + linear head, {args.sentences} train "
        f"sentences, {args.epochs} epochs; accuracy on the test split through the pack file\n"
    )
    print("| task | bits | pack bytes | test accuracy | test sentences | vs fp32 |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        fp32 = next((r["accuracy"] for r in rows if r["task"] == row["task"] and r["bits"] == 32), None)
        delta = f"{(row['accuracy'] - fp32) * 100:+.1f} points" if fp32 is not None else "-"
        print(
            f"| {row['task']} | {row['bits']} | {row['bytes']:,} | {row['accuracy']:.3f} | "
            f"{row['test_sentences']} | {delta} |"
        )


if __name__ == "__main__":
    main()
