"""Graph passes on the IR, in the style of ``onnx_ir.passes``: one small class per file.

Every redux-edge pass is an ``onnx_ir.passes.InPlacePass`` and a frozen dataclass of its parameters,
so that a recipe step is exactly ``(pass name, parameters)`` and the manifest can record it and a later
compile can rebuild it. ``PASSES`` maps recipe names to pass classes.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import onnx_ir as ir

from redux_edge.errors import UserError

__all__ = ["PASSES", "RecipePass", "build_pass"]


class RecipePass(ir.passes.InPlacePass):
    """Base of the passes a recipe can name: subclasses are dataclasses whose fields are the parameters."""

    name: ClassVar[str]
    summary: ClassVar[str]

    def parameters(self) -> dict:
        return dataclasses.asdict(self)


def _registry() -> dict[str, type[RecipePass]]:
    from redux_edge.passes.cleanup import CleanupPass

    return {cls.name: cls for cls in (CleanupPass,)}


PASSES = _registry()


def build_pass(name: str, parameters: dict) -> RecipePass:
    if name not in PASSES:
        raise UserError(f"unknown pass '{name}'", f"choose one of: {', '.join(sorted(PASSES))}")
    cls = PASSES[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if unknown := set(parameters) - set(fields):
        valid = ", ".join(sorted(fields)) or "none"
        raise UserError(
            f"pass '{name}' has no parameter {', '.join(sorted(unknown))}", f"its parameters: {valid}"
        )
    for key, value in parameters.items():
        expected = fields[key].type
        if type(value).__name__ != expected and not (expected == "float" and isinstance(value, int)):
            raise UserError(
                f"pass '{name}' parameter '{key}' must be {expected}, got {value!r}", "fix the recipe"
            )
    return cls(**parameters)
