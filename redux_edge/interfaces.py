"""The small types every layer shares, in a module that imports nothing of the package: a compile's
progress steps (``Step``), input feeds (``Feeds``) and the ``compile`` flags that stand for parameters of
passes and backends (``Flag``). Frontends, backends, training and the passes all use them, so they sit
below all of those (the layer contracts are in pyproject.toml, ``[tool.importlinter]``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Feeds", "Flag", "Step", "no_progress"]

# ``with step("what is being done"):`` around each stage of a compile; the CLI shows it as a progress line.
Step = Callable[[str], contextlib.AbstractContextManager]
Feeds = dict[str, np.ndarray]


def no_progress(_: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Flag:
    """A ``compile`` option that stands for a pass parameter. ``enables``: giving it adds the pass;
    otherwise it only sets a parameter of the pass another flag adds (``alone`` is the error when it is
    given without one; empty: it is then ignored). ``convert`` turns the value into parameters."""

    option: str
    help: str
    parameter: str = ""
    type: Any = str
    metavar: str | None = None
    multiple: bool = False
    enables: bool = True
    alone: tuple[str, str] | None = None
    convert: Callable[[Any], dict] | None = None

    @property
    def dest(self) -> str:
        return self.option.lstrip("-").replace("-", "_")

    def given(self, values: Mapping[str, Any]) -> bool:
        value = values.get(self.dest)
        return bool(value) if self.multiple or self.type is bool else value is not None

    def parameters(self, value: Any) -> dict:
        if self.multiple:
            value = [str(item) for item in value]
        elif isinstance(value, Path):
            value = str(value)
        return self.convert(value) if self.convert else {self.parameter: value}
