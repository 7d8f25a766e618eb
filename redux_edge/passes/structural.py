"""What the structural passes share: the flags ``--importance`` and ``--plan``, calibration inputs, budget
knobs, plan files, and the ``UnitsRemoved`` outcome that the compression section merges into one plan."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import onnx_ir as ir

from redux_edge.analysis.importance import IMPORTANCE, load_plan, select_lowest
from redux_edge.errors import UserError
from redux_edge.interfaces import Flag
from redux_edge.ir.blocks import number_layers
from redux_edge.ir.surgery import finish
from redux_edge.passes.compression import UnitsRemoved
from redux_edge.passes.contract import CompileContext, RecipePass, configure, gathered, parameter

if TYPE_CHECKING:
    from redux_edge.ir.blocks import Structure

__all__ = ["SHARED_FLAGS", "StructuralPass", "UnitPruningPass"]

logger = logging.getLogger(__name__)

# Every structural pass's flags end with these; the pass itself is added by its first flag.
SHARED_FLAGS = (
    Flag(
        "--importance",
        "How the structural flags choose units [magnitude; --drop-layers N: calibration].",
        type=("magnitude", "calibration", "random", "plan"),
        enables=False,
    ),
    Flag("--plan", "Plan JSON naming heads/neurons/layers.", type="path", enables=False),
)


@dataclasses.dataclass
class StructuralPass(RecipePass):
    """A pass that removes heads, neurons or layers. Before it runs it takes real calibration inputs from
    the compile (when it chooses by calibration); its outcome says what went, in original indices."""

    unit: ClassVar[str]
    followed_by = "cleanup"
    compares_with_dense = True
    once_per_recipe = True

    if TYPE_CHECKING:  # each pass declares them as parameters, in its own order
        importance: str
        plan: str
    # Gathered by prepare when units are chosen by calibration.
    calibration: dict[str, np.ndarray] | None = gathered()
    calibrated_on: str | None = gathered()

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> list[RecipePass]:
        adding = cls.flags[0]
        if not adding.given(values):
            return []
        importance, plan = values.get("importance"), values.get("plan")
        if importance == "plan" and plan is None:
            raise UserError("--importance plan needs --plan FILE", "give the plan JSON")
        chosen = importance or ("plan" if plan else None)
        if chosen == "plan":
            parameters = {"importance": "plan", "plan": str(plan)}
        else:
            parameters = adding.parameters(values[adding.dest])
            if chosen is not None:
                parameters["importance"] = chosen
        return [configure(cls, parameters)]

    def prepare(self, context: CompileContext) -> dict[str, Any]:
        if self.importance != "calibration":
            return {}
        calibration = context.source.calibration()
        return {"calibration": calibration.feeds, "calibrated_on": calibration.described}

    def requires(self, model: ir.Model) -> None:

        if self.importance not in IMPORTANCE:
            raise UserError(
                f"{self.name}: unknown importance '{self.importance}'",
                f"choose one of: {', '.join(IMPORTANCE)}",
            )
        if getattr(self, "scope", "layer") not in ("layer", "global"):
            raise UserError(
                f"{self.name}: scope must be 'layer' or 'global'", "layer: the same share per layer"
            )
        fraction = getattr(self, "fraction", 0.0)
        if not 0.0 <= fraction < 1.0:
            raise UserError(f"{self.name}: fraction {fraction} is not in [0, 1)", "give the share to remove")

    def require_blocks(self, blocks: list, problems: list[str], kind: str) -> list:
        if problems:
            article = "an" if kind[0] in "aeiou" else "a"
            raise UserError(
                f"{self.name} cannot follow {article} {kind} block, {problems[0]}; "
                "the model is left unchanged",
                "the BERT, DistilBERT, RoBERTa and ViT layouts are followed (docs/USING.md: Your own model); "
                "compile without this pass",
            )
        if not blocks:
            raise UserError(
                f"{self.name}: the model has no {kind} blocks", "this pass is for transformer models"
            )
        return blocks

    def outcome(self, model: ir.Model, removed: dict) -> UnitsRemoved:
        logger.info("%s removed %s", self.name, removed)
        return UnitsRemoved(model, bool(next(iter(removed.values()))), removed, self.calibrated_on)


@dataclasses.dataclass
class UnitPruningPass(StructuralPass):
    """A structural pass that removes units (heads, neurons) inside layers, with the shared budget knobs:
    ``fraction`` removed per layer (``scope = "global"``: ranked across layers), or ``per_layer`` counts,
    chosen by ``importance``, or named by a ``plan`` file."""

    fraction: float = parameter(0.0, "share of the units removed in every layer (or overall: scope)")
    per_layer: list[int] = parameter([], "units removed per layer, one count per layer (instead of fraction)")
    importance: str = parameter("magnitude", "how units are chosen: magnitude, calibration, random or plan")
    plan: str = parameter("", "plan JSON naming the units (importance = plan)")
    seed: int = parameter(0, "seed of the random choice")
    scope: str = parameter("layer", "layer: the same share per layer; global: ranked across layers")

    kind: ClassVar[str]

    def blocks_of(self, structure: Structure) -> list:
        """The blocks whose units this pass removes."""
        raise NotImplementedError

    def size(self, block: Any) -> int:
        """How many units ``block`` has."""
        raise NotImplementedError

    def scores(self, model: ir.Model, blocks: list) -> dict[int, np.ndarray]:
        """Importance of every unit per layer, lower = removed first."""
        raise NotImplementedError

    def remove(self, graph: ir.Graph, block: Any, units: list[int]) -> None:
        """Slice ``units`` out of ``block``."""
        raise NotImplementedError

    def call(self, model: ir.Model) -> UnitsRemoved:

        structure = number_layers(model)
        blocks = self.require_blocks(self.blocks_of(structure), structure.problems, self.kind)
        if self.importance == "plan":
            removed = self.planned({block.layer: self.size(block) for block in blocks})
        else:
            rated = self.scores(model, blocks)
            removed = select_lowest(rated, self.fraction, self.per_layer, self.scope == "global")
        for block in blocks:
            if removed.get(block.layer):
                self.remove(model.graph, block, removed[block.layer])
        finish(model)
        return self.outcome(model, {self.unit: {str(k): v for k, v in removed.items() if v}})

    def planned(self, sizes: dict[int, int]) -> dict[int, list[int]]:
        """The plan file's units per layer, checked against the layers and their sizes."""

        plan = load_plan(self.plan, self.unit)
        for layer, units in plan.items():
            if layer not in sizes:
                raise UserError(
                    f"plan {self.plan} names layer {layer}, the model has {sorted(sizes)}", "fix the plan"
                )
            if any(not 0 <= unit < sizes[layer] for unit in units):
                raise UserError(
                    f"plan {self.plan}: layer {layer} has {sizes[layer]} {self.unit}, the plan names {units}",
                    "fix the plan",
                )
            if len(units) >= sizes[layer]:
                raise UserError(
                    f"plan {self.plan} removes all {sizes[layer]} {self.unit} of layer {layer}",
                    "keep at least one per layer, or drop the layer with drop-layers",
                )
        return plan
