"""Graph passes on the IR, in the style of ``onnx_ir.passes``: one small class per file.

Every redux-edge pass is an ``onnx_ir.passes.InPlacePass`` and a frozen dataclass of its parameters,
so that a recipe step is exactly ``(pass name, parameters)`` and the manifest can record it and a later
compile can rebuild it. ``PASSES`` maps recipe names to pass classes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, ClassVar

import onnx_ir as ir

from redux_edge.errors import UserError

if TYPE_CHECKING:
    import numpy as np

    from redux_edge.ir.blocks import Structure

__all__ = ["PASSES", "RecipePass", "StructuralPass", "UnitPruningPass", "WeightMaskPass", "build_pass"]

logger = logging.getLogger(__name__)


class RecipePass(ir.passes.InPlacePass):
    """Base of the passes a recipe can name: subclasses are dataclasses whose fields are the parameters."""

    name: ClassVar[str]
    summary: ClassVar[str]

    def parameters(self) -> dict:
        return dataclasses.asdict(self)


class WeightMaskPass(RecipePass):
    """A pass that zeroes weights on purpose without changing shapes. Afterwards ``masks`` maps each
    changed weight's name (``redux_edge.ir.weights``) to its keep mask in PyTorch layout, from which the
    exact reference is built, and ``report`` says per weight what was done and why."""

    masks: ClassVar[dict] = {}
    report: ClassVar[list] = []


class StructuralPass(RecipePass):
    """A pass that removes heads, neurons or layers. Before it runs, the pipeline gives it real
    ``calibration`` inputs; afterwards ``removed`` says what went, in original indices (the plan that
    the exact reference is built from)."""

    unit: ClassVar[str]
    calibration: dict | None = None
    removed: ClassVar[dict] = {}

    def requires(self, model: ir.Model) -> None:
        from redux_edge.analysis.importance import IMPORTANCE

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
            raise UserError(
                f"{self.name} cannot follow a {kind} block, {problems[0]}; the model is left unchanged",
                "export with torch.onnx.export(dynamo=True); docs/ARCHITECTURE.md shows the matched pattern",
            )
        if not blocks:
            raise UserError(
                f"{self.name}: the model has no {kind} blocks", "this pass is for transformer models"
            )
        return blocks

    def planned(self, sizes: dict[int, int]) -> dict[int, list[int]]:
        """The plan file's units per layer, checked against the layers and their sizes."""
        from redux_edge.analysis.importance import load_plan

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


@dataclasses.dataclass
class UnitPruningPass(StructuralPass):
    """A structural pass that removes units (heads, neurons) inside layers, with the shared budget knobs:
    ``fraction`` removed per layer (``scope = "global"``: ranked across layers), or ``per_layer`` counts,
    chosen by ``importance``, or named by a ``plan`` file."""

    fraction: float = 0.0
    per_layer: list = dataclasses.field(default_factory=list)
    importance: str = "magnitude"
    plan: str = ""
    seed: int = 0
    scope: str = "layer"

    kind: ClassVar[str]

    def blocks_of(self, structure: Structure) -> list:
        """The blocks whose units this pass removes."""
        raise NotImplementedError

    def size(self, block: object) -> int:
        """How many units ``block`` has."""
        raise NotImplementedError

    def scores(self, model: ir.Model, blocks: list) -> dict[int, np.ndarray]:
        """Importance of every unit per layer, lower = removed first."""
        raise NotImplementedError

    def remove(self, graph: ir.Graph, block: object, units: list[int]) -> None:
        """Slice ``units`` out of ``block``."""
        raise NotImplementedError

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from redux_edge.analysis.importance import select_lowest
        from redux_edge.ir.blocks import number_layers
        from redux_edge.ir.surgery import finish

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
        self.removed = {self.unit: {str(k): v for k, v in removed.items() if v}}
        logger.info("%s removed %s", self.name, {k: len(v) for k, v in self.removed[self.unit].items()})
        return ir.passes.PassResult(model, modified=bool(self.removed[self.unit]))


def _registry() -> dict[str, type[RecipePass]]:
    from redux_edge.passes.adapters import AdaptersPass
    from redux_edge.passes.cleanup import CleanupPass
    from redux_edge.passes.ffn_prune import PruneFfnPass
    from redux_edge.passes.head_prune import PruneHeadsPass
    from redux_edge.passes.layer_drop import DropLayersPass
    from redux_edge.passes.mac_prune import MacPrunePass
    from redux_edge.passes.sparsity import SparsityPass

    passes = (
        CleanupPass,
        PruneHeadsPass,
        PruneFfnPass,
        DropLayersPass,
        SparsityPass,
        AdaptersPass,
        MacPrunePass,
    )
    return {cls.name: cls for cls in passes}


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
