"""Recipes: the ordered, declarative list of passes that a compile applies, as Olive and SparseML write them.

A recipe is a TOML file::

    name = "minilm-default"
    [[passes]]
    pass = "cleanup"
    iterations = 2

or the same steps given on the command line (``--pass cleanup:iterations=2``), or the ``recipe`` a bundle's
``manifest.json`` recorded, so that ``compile --recipe build/minilm/manifest.json`` rebuilds that bundle.
Every key is checked: a misspelt pass or parameter is an error, never silently ignored.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redux_edge.errors import UserError
from redux_edge.passes import PASSES, RecipePass, build_pass
from redux_edge.untrusted import read_json, read_toml

__all__ = ["DEFAULT_RECIPE", "Recipe", "load_recipe", "parse_pass_flag", "passes_from_flags"]

_RECIPE_KEYS = {"name", "description", "passes"}


@dataclass
class Recipe:
    name: str
    passes: list[RecipePass]

    def __post_init__(self) -> None:
        # A plan's unit indices refer to the model as one pass of each kind sees it; a second pass of the
        # same kind would renumber them under the exact reference.
        names = [p.name for p in self.passes if p.once_per_recipe]
        if repeated := sorted({name for name in names if names.count(name) > 1}):
            raise UserError(
                f"the recipe runs {', '.join(repeated)} more than once", "give each structural pass once"
            )

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "passes": [{"pass": step.name, **step.parameters()} for step in self.passes],
        }

    def extended(self, extra: list[RecipePass]) -> Recipe:
        return Recipe(self.name if not extra else f"{self.name}+cli", [*self.passes, *extra])


DEFAULT_RECIPE = {"name": "default", "passes": [{"pass": "cleanup"}]}


def recipe_from_dict(spec: object, origin: str) -> Recipe:
    if not isinstance(spec, dict):
        raise UserError(
            f"the recipe in {origin} is {type(spec).__name__ if spec is not None else 'null'}, not a table",
            'write name = "..." and [[passes]] blocks (see models/*/edge.toml)',
        )
    if unknown := set(spec) - _RECIPE_KEYS:
        raise UserError(
            f"unknown recipe key {', '.join(sorted(unknown))} in {origin}",
            f"a recipe has only {', '.join(sorted(_RECIPE_KEYS))}",
        )
    steps = spec.get("passes", [])
    if not isinstance(steps, list):
        raise UserError(f"'passes' in {origin} must be a list of tables", "write [[passes]] blocks")
    passes = []
    for index, step in enumerate(steps):
        if not isinstance(step, dict) or "pass" not in step:
            raise UserError(f"step {index} of {origin} names no pass", 'add pass = "<name>" to the step')
        parameters = {key: value for key, value in step.items() if key != "pass"}
        passes.append(build_pass(step["pass"], parameters))
    return Recipe(spec.get("name", Path(origin).stem), passes)


def load_recipe(path: Path | None) -> Recipe:
    """The recipe in a TOML file or a bundle manifest; the default recipe when ``path`` is None."""
    if path is None:
        return recipe_from_dict(DEFAULT_RECIPE, "default")
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist", "give a recipe .toml or a bundle's manifest.json")
    hint = "give a recipe .toml or a manifest.json"
    if path.suffix == ".json":
        document = read_json(path, hint)
        # A bundle's manifest records its recipe; a JSON recipe file is the recipe itself.
        spec = document.get("recipe", document) if isinstance(document, dict) else document
    else:
        spec = read_toml(path, hint)
    return recipe_from_dict(spec, str(path))


def parse_pass_flag(flag: str) -> RecipePass:
    """``name`` or ``name:key=value,key=value`` (values parsed as TOML scalars) into a configured pass."""
    name, _, rest = flag.partition(":")
    parameters = {}
    # Commas inside [...] belong to a list value: per_layer=[2,2,0].
    for item in filter(None, re.split(r",(?![^\[]*\])", rest)):
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"cannot read pass parameter '{item}' in '{flag}'", "write --pass name:key=value")
        try:
            parameters[key.strip()] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            parameters[key.strip()] = raw.strip()
    return build_pass(name.strip(), parameters)


def passes_from_flags(values: Mapping[str, Any]) -> list[RecipePass]:
    """The passes that ``compile``'s shortcut flags stand for, in registry order; a pass that asks to be
    followed by another (structural passes: a cleanup) gets it after the last pass that asks."""
    chosen = [configured for cls in PASSES.values() for configured in cls.from_flags(values)]
    for follower in dict.fromkeys(p.followed_by for p in chosen if p.followed_by):
        last = max(i for i, p in enumerate(chosen) if p.followed_by == follower)
        chosen.insert(last + 1, build_pass(follower, {}))
    return chosen
