"""A user's own data, for ``--eval-data`` (labelled) and ``--calibration-data`` (labels optional).

Text: a CSV file with a header row, or JSON Lines (one object per line), with a ``text`` column and a
``label`` column. Any model (an ONNX file has no reader): an ``.npz`` with one array per model input and
``labels``. Images: a folder with one subfolder per class (PNG/JPEG files in each), or an ``.npz``
with ``images`` (uint8, [n, height, width] or [n, height, width, channels]) and ``labels``. A label is a
class index or a class name; names are the model's own (a Hugging Face checkpoint's ``id2label``) where it
has them, else the sorted distinct names are numbered. Files are untrusted: CSV and JSON are parsed as
data, ``.npz`` without pickles, images by Pillow.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from redux_edge.errors import UserError
from redux_edge.preprocess import read_arrays

if TYPE_CHECKING:
    from redux_edge.preprocess import ImagePreprocessor

__all__ = ["UserData", "read_feeds", "read_images", "read_texts"]

_TEXT_SUFFIXES = (".csv", ".jsonl", ".json")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_INDEX = re.compile(r"-?[0-9]+")
# Class indices a label may be: far more classes than any classifier has, and within int64.
_MOST_CLASSES = 1 << 31
_FORMATS = "a CSV/JSONL file with text and label columns, a folder of class subfolders, or an .npz"


@dataclass
class UserData:
    """Samples (texts, uint8 images at the model's size, or model inputs) and int64 labels (None where
    not given)."""

    described: str
    texts: list[str] | None = None
    images: np.ndarray | None = None
    feeds: dict[str, np.ndarray] | None = None
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        if self.texts is not None:
            return len(self.texts)
        samples = self.images if self.images is not None else next(iter((self.feeds or {}).values()))
        return len(samples)


def _rows(path: Path) -> list[dict]:
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}", "give a UTF-8 CSV or JSON Lines file") from exc
    if path.suffix.lower() == ".csv":
        try:
            return list(csv.DictReader(content.splitlines()))
        except csv.Error as exc:
            raise UserError(
                f"{path} is not a readable CSV file: {exc}", "write a header row, then rows"
            ) from exc
    rows = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{path}, line {number}: not JSON ({exc.msg})", "write one JSON object per line"
            ) from exc
        if not isinstance(row, dict):
            raise UserError(f"{path}, line {number}: not a JSON object", 'write {"text": ..., "label": ...}')
        rows.append(row)
    return rows


def _label_ids(values: list[object], classes: dict[str, str] | None, path: Path) -> np.ndarray:
    """Class indices for labels given as indices or names; checked against the model's classes."""
    if classes is not None:
        names = {str(name): int(index) for index, name in classes.items()}
    elif all(_INDEX.fullmatch(str(v).strip()) for v in values):
        names = {}  # indices already
    else:
        names = {name: index for index, name in enumerate(sorted({str(v).strip() for v in values}))}
    ids = []
    for value in values:
        text = str(value).strip()
        if text in names:
            ids.append(names[text])
        elif _INDEX.fullmatch(text):
            if not 0 <= int(text) < _MOST_CLASSES:
                raise UserError(
                    f"{path}: label {text} is not a class index", f"labels are 0 to {_MOST_CLASSES - 1}"
                )
            ids.append(int(text))
        else:
            raise UserError(
                f"{path}: label {text!r} is not one of the model's classes", f"use one of: {', '.join(names)}"
            )
    labels = np.asarray(ids, dtype=np.int64)
    if classes is not None and (unknown := sorted(set(labels.tolist()) - {int(i) for i in classes})):
        raise UserError(
            f"{path}: labels {unknown} are not classes of the model (it has {len(classes)})",
            "relabel the data with the model's class indices or names",
        )
    return labels


def read_texts(path: Path, labels_required: bool, classes: dict[str, str] | None = None) -> UserData:
    """Texts and labels from a CSV or JSON Lines table."""
    if path.suffix.lower() not in _TEXT_SUFFIXES:
        raise UserError(f"{path} is not a text table", f"give {_FORMATS}")
    rows = _rows(path)
    if not rows:
        raise UserError(f"{path} holds no rows", "write a header row and one row per sample")
    needed = ("text", "label") if labels_required else ("text",)
    for number, row in enumerate(rows, start=1):
        if missing := [column for column in needed if row.get(column) in (None, "")]:
            raise UserError(
                f"{path}: row {number} has no {' or '.join(missing)} column (it has {sorted(row)})",
                "name the columns text and label",
            )
    texts = [str(row["text"]) for row in rows]
    has_labels = all(row.get("label") not in (None, "") for row in rows)
    labels = _label_ids([row["label"] for row in rows], classes, path) if has_labels else None
    return UserData(f"{len(texts)} rows of {path.name}", texts=texts, labels=labels)


def read_images(
    path: Path, preprocessor: ImagePreprocessor, labels_required: bool, classes: dict[str, str] | None = None
) -> UserData:
    """Images (at the model's size and channels) and labels from a class-folder tree or an .npz."""
    if path.is_dir():
        folders = sorted(child for child in path.iterdir() if child.is_dir())
        files = [
            (file, folder.name)
            for folder in folders
            for file in sorted(folder.iterdir())
            if file.suffix.lower() in _IMAGE_SUFFIXES
        ]
        if not files:
            raise UserError(
                f"{path} has no class subfolders with images", "put each class's images in its own folder"
            )
        pixels = preprocessor.pixels_of([file for file, _ in files])
        labels = _label_ids([name for _, name in files], classes, path)
        return UserData(
            f"{len(files)} images of {path.name} ({len(folders)} classes)", images=pixels, labels=labels
        )
    if path.suffix.lower() != ".npz":
        raise UserError(f"{path} is not an image folder or an .npz", f"give {_FORMATS}")
    arrays = read_arrays(path)
    images: np.ndarray | None = arrays.get("images")
    if images is None or images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise UserError(
            f"{path} has no uint8 'images' array [n, height, width(, channels)]", "save images and labels"
        )
    given: np.ndarray | None = arrays.get("labels")
    if given is None and labels_required:
        raise UserError(f"{path} has no 'labels' array", "save the class index of every image as labels")
    if given is not None and len(given) != len(images):
        raise UserError(f"{path}: {len(images)} images but {len(given)} labels", "give one label per image")
    resized = preprocessor.resized(images)
    ids = None if given is None else _label_ids(given.tolist(), classes, path)
    return UserData(f"{len(images)} images of {path.name}", images=resized, labels=ids)


def read_feeds(path: Path, input_names: list[str], labels_required: bool) -> UserData:
    """Model inputs (one array per input name) and labels from an .npz."""
    if path.suffix.lower() != ".npz":
        raise UserError(
            f"{path}: this model has no text or image reader", f"give an .npz with {input_names} and labels"
        )
    arrays = read_arrays(path)
    if missing := [name for name in input_names if name not in arrays]:
        raise UserError(f"{path} lacks the model's inputs {missing}", f"save {input_names} and labels")
    feeds = {name: arrays[name] for name in input_names}
    labels = arrays.get("labels")
    if labels is None and labels_required:
        raise UserError(f"{path} has no 'labels' array", "save the class index of every sample as labels")
    if len({len(array) for array in [*feeds.values(), *([] if labels is None else [labels])]}) != 1:
        raise UserError(f"{path}: its arrays hold different numbers of samples", "one row per sample in each")
    ids = None if labels is None else _label_ids(labels.tolist(), None, path)
    return UserData(f"{len(next(iter(feeds.values())))} samples of {path.name}", feeds=feeds, labels=ids)
