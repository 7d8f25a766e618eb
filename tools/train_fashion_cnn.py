"""Train the MACPruning evaluation's Fashion-MNIST CNN and cache its weights (never committed).

The architecture of the zoo's mnist-cnn (conv 1->32, conv 32->64, each ReLU + 2x2 max-pool, linear
3136->128->10), trained from scratch on the 60,000 training images of Debian's ``dataset-fashion-mnist``
(Adam, 3 epochs, batch 128, seed 0) and saved as a state dict (loaded back with ``weights_only=True``) to
``$REDUX_EDGE_CACHE`` (default ``~/.cache/redux-edge``)/fashion-cnn.pt. Usage:

    .venv/bin/python tools/train_fashion_cnn.py [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from redux_edge.datasets import images
from redux_edge.preprocess import ImagePreprocessor
from redux_edge.zoo.mnist_cnn import MnistCnn

# Fashion-MNIST's training-set pixel statistics (of x / 255).
PREPROCESSOR = ImagePreprocessor(28, 0.2860, 0.3530)


def cache_path() -> Path:
    return Path(os.environ.get("REDUX_EDGE_CACHE", Path.home() / ".cache" / "redux-edge")) / "fashion-cnn.pt"


def load_or_train(epochs: int = 3) -> MnistCnn:
    """The cached model, trained first if the cache is empty."""
    path = cache_path()
    if not path.is_file():
        train(epochs, path)
    module = MnistCnn().eval()
    module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return module


def train(epochs: int, path: Path) -> None:
    torch.manual_seed(0)
    data = images.fashion_mnist()
    inputs = torch.from_numpy(PREPROCESSOR.pixels(data.train_images)["image"])
    labels = torch.from_numpy(data.train_labels)
    module = MnistCnn()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    for epoch in range(epochs):
        started = time.perf_counter()
        module.train()
        for batch in np.array_split(rng.permutation(len(labels)), len(labels) // 128):
            loss = torch.nn.functional.cross_entropy(module(inputs[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        module.eval()
        with torch.no_grad():
            test = torch.from_numpy(PREPROCESSOR.pixels(data.test_images)["image"])
            accuracy = (module(test).argmax(1).numpy() == data.test_labels).mean()
        print(f"epoch {epoch + 1}: test accuracy {accuracy:.4f} ({time.perf_counter() - started:.0f} s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(module.state_dict(), partial)
    partial.replace(path)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    train(args.epochs, cache_path())


if __name__ == "__main__":
    main()
