"""The pass contract: everything a pass tells the compile pipeline, so that the pipeline names no pass.

A pass is an ``onnx_ir`` in-place pass whose dataclass fields are its parameters (``parameter``: default
and help text in one place, checked against the real type hints when a recipe is read). Around its
transformation it declares:

- ``flags``: the ``compile`` shortcuts that stand for it (``--sparsity 2:4``), as data (``Flag``);
- ``check(context)``: compatibility with the recipe, backend and target, before any model work;
- ``prepare(context)``: what it needs from the compile before it runs (real calibration data);
- ``compares_with_dense``: whether the pipeline keeps the model as it was before this pass (the dense
  model that exactness references, quality and speed are measured against);
- ``call(model)`` returns a typed ``PassOutcome`` (an ``onnx_ir`` ``PassResult``), never results set on
  the pass itself. An outcome names its ``Section``: the manifest section, files and checks that the
  outcomes of one kind of pass add to a bundle, how the exactness reference changes for them
  (``ReferenceChange``), and how the CLI prints the section.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np
import onnx_ir as ir

from redux_edge.errors import UserError
from redux_edge.interfaces import Feeds, Flag, Step, no_progress

if TYPE_CHECKING:
    from torch import nn

    from redux_edge.backends.base import Backend
    from redux_edge.frontend.source import Source
    from redux_edge.ir.verify import Tolerance
    from redux_edge.targets import Target

__all__ = [
    "CompileContext",
    "Flag",
    "PassOutcome",
    "Rebase",
    "RecipePass",
    "ReferenceChange",
    "Section",
    "Step",
    "check_parameters",
    "configure",
    "gathered",
    "no_progress",
    "parameter",
    "parameter_fields",
    "parameter_help",
]


def parameter(default: Any, help: str, minimum: float | None = None) -> Any:
    """A pass parameter: its default and the help text that ``redux-edge passes`` and recipes show, and
    for a number the smallest value it takes (ranges that depend on other parameters are ``check``'s)."""
    metadata = {"help": help, "minimum": minimum}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class RecipePass(ir.passes.InPlacePass):
    """Base of the passes a recipe can name: subclasses are dataclasses whose fields are the parameters."""

    name: ClassVar[str]
    summary: ClassVar[str]
    flags: ClassVar[tuple[Flag, ...]] = ()
    # A pass run by flags that leaves dead nodes asks for this pass after the last of them.
    followed_by: ClassVar[str] = ""
    compares_with_dense: ClassVar[bool] = False
    # Exact by construction (a cleanup): it changes how the graph computes, never what.
    exact: ClassVar[bool] = False
    # Changes numerics on purpose, checked by rebasing (``Rebase``): passes after it are exact or rebase too.
    rebases: ClassVar[bool] = False
    # Each may appear once per recipe: what it reports is numbered by the model as one such pass sees it.
    once_per_recipe: ClassVar[bool] = False

    def parameters(self) -> dict:
        return {f.name: getattr(self, f.name) for f in parameter_fields(type(self))}

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> list[RecipePass]:
        """The passes that the given ``compile`` flags stand for: none, or this pass configured."""
        given = [flag for flag in cls.flags if flag.given(values)]
        if not any(flag.enables for flag in given):
            for flag in given:
                if flag.alone:
                    raise UserError(*flag.alone)
            return []
        parameters: dict = {}
        for flag in given:
            parameters |= flag.parameters(values[flag.dest])
        return [configure(cls, parameters)]

    def refuses(self, backend: Backend, target: Target) -> str:
        """Why this pass cannot work with ``backend`` for ``target`` (empty: it can). The pipeline asks
        before it chooses the backend, so a target's next backend serves when its first one cannot."""
        return ""

    def gate(self) -> str | None:
        """The kind of change (a key of ``analysis.shift.GATES``) when this pass, as configured, changes
        numerics on purpose: the compile then measures how far the outputs moved from the float model
        and refuses a result beyond that kind's gate. None for passes that keep numerics."""
        return None

    def check(self, context: CompileContext) -> None:
        """Refuse (UserError) a recipe, backend or target this pass cannot work with."""

    def backend_options(self, context: CompileContext) -> dict[str, Any]:
        """What this pass asks of the backend (the precision it computes in), after every check passed."""
        return {}

    def prepare(self, context: CompileContext) -> dict[str, Any]:
        """What the pass gathers from the compile (real data, the target's forms) right before it runs:
        values for its ``gathered`` fields. The pipeline runs ``prepared(...)`` of them, a new pass: a
        pass never keeps per-compile results on itself."""
        return {}

    def prepared(self, values: Mapping[str, Any]) -> RecipePass:
        """This pass with ``values`` in its ``gathered`` fields (itself when there are none)."""
        # Every registered pass is a dataclass (its fields are its parameters).
        return dataclasses.replace(cast(Any, self), **values) if values else self

    def call(self, model: ir.Model) -> PassOutcome:
        raise NotImplementedError


def gathered(default: Any = None) -> Any:
    """A field that ``prepare`` fills from the compile (calibration data, the target's INT8 form): part of
    the pass as it runs, never a recipe parameter."""
    return field(default=default, repr=False, compare=False, kw_only=True, metadata={"gathered": True})


def parameter_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def configure(cls: type[RecipePass], parameters: dict) -> RecipePass:
    check_parameters(cls, parameters)
    return cls(**parameters)


def check_parameters(cls: type[RecipePass], parameters: dict) -> None:
    """Refuse parameters the pass does not have, or values that do not fit its type hints."""
    fields = {f.name: f for f in parameter_fields(cls)}
    if unknown := set(parameters) - set(fields):
        valid = ", ".join(sorted(fields)) or "none"
        raise UserError(
            f"pass '{cls.name}' has no parameter {', '.join(sorted(unknown))}", f"its parameters: {valid}"
        )
    hints = typing.get_type_hints(cls)
    for key, value in parameters.items():
        if not _fits(value, hints[key]):
            raise UserError(
                f"pass '{cls.name}' parameter '{key}' must be {_type_name(hints[key])}, got {value!r}",
                "fix the recipe",
            )
        minimum = fields[key].metadata.get("minimum")
        if minimum is not None and isinstance(value, int | float) and value < minimum:
            raise UserError(
                f"pass '{cls.name}' parameter '{key}' must be at least {minimum}, got {value!r}",
                "fix the recipe",
            )


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, option) for option in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_fits(element, item) for element in value)
    if hint is Any:
        return True
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    return str(getattr(hint, "__name__", hint)) if typing.get_origin(hint) is None else str(hint)


def parameter_help(cls: type[RecipePass]) -> list[dict]:
    """Name, type, default and help of every parameter of ``cls`` (``redux-edge passes``)."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in parameter_fields(cls):
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        rows.append(
            {
                "name": f.name,
                "type": _type_name(hints[f.name]),
                "default": default,
                "help": f.metadata["help"],
            }
        )
    return rows


@dataclass
class PassOutcome(ir.passes.PassResult):
    """What a pass returns: the model, whether it changed, and its results for the pipeline."""

    section: ClassVar[type[Section] | None] = None

    def log(self) -> dict:
        """Extra entries for the manifest's per-pass log."""
        return {}


class ReferenceChange:
    """How an outcome changes the computation the compiled model must equal, so that the check is exact:
    on the source's PyTorch module (``on_module``), else on the dense ONNX graph (``on_graph``), and per
    run for randomised passes (``per_run``: the run's outputs say what it drew)."""

    describes: str = ""
    per_run_outputs: bool = False

    def applies_to_module(self, architecture: dict) -> bool:
        return True

    def on_module(self, module: nn.Module, architecture: dict, stack: contextlib.ExitStack) -> nn.Module:
        return module

    def on_graph(self, model: ir.Model) -> None:
        """Change the dense graph in place; UserError when the change needs the PyTorch model."""

    def per_run(self, feeds: Feeds, run_outputs: list[np.ndarray]) -> tuple[Feeds, list[np.ndarray]]:
        """The feeds the reference takes for a run that gave ``run_outputs``, and outputs to append."""
        return feeds, []


class Rebase(ReferenceChange):
    """The change of a pass that alters numerics on purpose (quantization): no reference computes what
    it computes, so the model before it (``before``) is checked against the reference of the changes
    that came earlier, and from then on ONNX Runtime running the changed model is the reference that the
    artifact must equal. Its section reports what the change cost in quality."""

    def __init__(self, before: ir.Model, describes: str) -> None:
        self.before, self.describes = before, describes

    def applies_to_module(self, architecture: dict) -> bool:
        return False


class Section:
    """A manifest section and everything behind it, made from the outcomes of the passes that report
    into it (in recipe order). The pipeline calls, in order: ``check`` once every pass has run,
    ``backend_options``, ``reference``, ``stage`` (files into the bundle before its artifact is opened),
    ``verify`` (checks through the built artifact), ``report`` (the manifest entries). ``render`` is how
    the CLI prints ``manifest[key]``."""

    key: ClassVar[str]
    # Every section by manifest key, in definition order: what the compile report and inspect print.
    known: ClassVar[dict[str, type[Section]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Section.known[cls.key] = cls

    def __init__(self, outcomes: list[PassOutcome]) -> None:
        self.outcomes = outcomes

    def check(self, context: CompileContext) -> None:
        """Refuse combinations the outcomes cannot be verified or deployed with."""

    def backend_options(self) -> dict:
        return {}

    def reference(self) -> ReferenceChange | None:
        return None

    def random_outputs(self, output_names: list[str]) -> list[str]:
        """Outputs that differ run by run even with the same inputs (health checks compare shapes)."""
        return []

    def stage(self, context: CompileContext) -> dict:
        """Write files into ``context.stage``; manifest entries the artifact needs to be opened."""
        return {}

    def verify(self, context: CompileContext) -> None:
        """Checks through the built and verified artifact (``context.stage``)."""

    def report(self, context: CompileContext) -> dict:
        """The manifest entries of this section (usually ``{key: ...}``)."""
        return {}

    @staticmethod
    def render(section: dict, manifest: Mapping[str, Any]) -> list[str]:
        """Lines (rich markup) that the compile report and ``inspect`` print for ``section``."""
        return []


@dataclass
class CompileContext:
    """What a compile knows, handed to passes and sections: the source, target, backend and options;
    after the passes the dense model; while the bundle is built its folder and manifest."""

    source: Source
    target: Target
    backend: Backend
    options: dict
    tolerance: Tolerance
    passes: list[RecipePass]
    step: Step = no_progress
    sections: list[Section] = field(default_factory=list)
    dense: ir.Model | None = None
    # The model before the first pass that changes numerics on purpose: what the shift is measured from.
    float_model: ir.Model | None = None
    stage: Path | None = None
    manifest: dict = field(default_factory=dict)
    # The outputs of the verified run of the artifact (or of model.onnx when it cannot run here).
    verified_outputs: list[np.ndarray] = field(default_factory=list)
