"""What every command module shares: the consoles, progress display, JSON output and argument readers."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console

from redux_edge.errors import UserError
from redux_edge.files import human_bytes

__all__ = [
    "AT_LEAST_ONE",
    "DEVICES_OPTION",
    "FINITE",
    "NON_NEGATIVE",
    "SEED",
    "THREADS",
    "FiniteFloatRange",
    "emit_json",
    "err",
    "human_bytes",
    "out",
    "parse_shapes",
    "progress",
]


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange, refusing NaN and infinities (every comparison with NaN is false, so a range
    alone lets ``nan`` through)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


# The numbers the command line takes, checked where they come in (click prints the range on a mistake).
FINITE = FiniteFloatRange()
AT_LEAST_ONE = click.IntRange(min=1)
# numpy's generators take seeds from 0; torch's take 64 bits: one range both accept.
SEED = click.IntRange(0, 2**32 - 1)
NON_NEGATIVE = click.IntRange(min=0)
# More intra-op threads than any edge device or this machine has cores only slows a run down.
THREADS = click.IntRange(1, 256)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


def progress(message: str) -> contextlib.AbstractContextManager:
    @contextlib.contextmanager
    def step() -> Iterator[None]:
        started = time.perf_counter()
        with err.status(message):
            yield
        err.print(f"[green]✓[/] {message} [dim]({time.perf_counter() - started:.1f}s)[/]")

    return step()


def emit_json(payload: object) -> None:
    click.echo(json.dumps(payload, indent=2, default=_json_default))


def _json_default(value: object) -> object:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def parse_shapes(text: str | None) -> dict[str, list[int]]:
    """trtexec's form: ``name:1x128,other:1x3x28x28``."""
    shapes = {}
    for item in filter(None, (text or "").split(",")):
        name, sep, dims = item.rpartition(":")
        try:
            shapes[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            sep = ""
        if not sep or not name:
            raise UserError(
                f"cannot read shape '{item}'", "write --shapes input_ids:1x128,attention_mask:1x128"
            )
        if any(size < 1 for size in shapes[name]):
            raise UserError(
                f"--shapes {item}: every dimension must be at least 1",
                f"write --shapes {name}:" + "x".join(str(max(size, 1)) for size in shapes[name]),
            )
    return shapes


DEVICES_OPTION = click.option(
    "--devices",
    "registry_path",
    type=click.Path(path_type=Path),
    help="Device registry [$REDUX_EDGE_DEVICES or ~/.config/redux-edge/devices.toml].",
)
