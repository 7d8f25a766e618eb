"""drop-layers: remove whole transformer layers; the residual stream passes straight through.

Follows the layer-dropping results summarised in docs/PAPERS.md (selective layer dropping in the LLaVA
efficiency study; DAS, dynamic architecture skipping) with block influence (ShortGPT) as the measured
importance. A dropped layer's output is replaced by its input, so every node of the layer becomes dead and
is removed; entry and exit have the same shape by construction of a transformer layer. The result equals
the dense model run with those layers skipped, which the compile verifies.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from redux_edge.analysis import importance
from redux_edge.errors import UserError
from redux_edge.interfaces import Flag
from redux_edge.ir.blocks import number_layers
from redux_edge.ir.surgery import bypass, finish
from redux_edge.passes.compression import UnitsRemoved
from redux_edge.passes.contract import parameter
from redux_edge.passes.structural import SHARED_FLAGS, StructuralPass

__all__ = ["DropLayersPass"]

logger = logging.getLogger(__name__)


def _count_or_layers(value: str) -> dict:
    """``--drop-layers N`` (chosen by block influence) or ``--drop-layers I,J`` (these layers)."""
    if value.isdigit():
        return {"count": int(value), "importance": "calibration"}
    try:
        return {"layers": [int(i) for i in value.split(",")]}
    except ValueError as exc:
        raise UserError(f"cannot read --drop-layers {value}", "give N or I,J,...") from exc


@dataclasses.dataclass
class DropLayersPass(StructuralPass):
    name = "drop-layers"
    summary = "remove whole transformer layers (residual stream passes through)"
    unit = "layers"
    flags = (
        Flag(
            "--drop-layers",
            "Drop N layers by block influence, or the listed layers.",
            metavar="N|I,J,...",
            convert=_count_or_layers,
        ),
        *SHARED_FLAGS,
    )

    count: int = parameter(0, "how many layers to drop, the least influential (importance)", minimum=0)
    layers: list[int] = parameter([], "the layers to drop, by original index (instead of count)")
    importance: str = parameter("calibration", "how layers are chosen: calibration, random or plan")
    plan: str = parameter("", "plan JSON naming the layers (importance = plan)")

    def call(self, model: ir.Model) -> UnitsRemoved:
        structure = number_layers(model)
        found = self.require_blocks(structure.layers, structure.problems, "transformer layer")
        indices = [layer.index for layer in found]
        chosen = self._choose(model, found)
        if unknown := set(chosen) - set(indices):
            raise UserError(
                f"drop-layers: no layers {sorted(unknown)}; the model has {indices}", "fix the list"
            )
        if len(chosen) >= len(found):
            raise UserError(
                f"drop-layers would remove all {len(found)} layers",
                "keep at least one: lower count or the list",
            )
        # Last first, so that a dropped layer's entry is never a value an earlier replacement removed.
        for layer in sorted((layer for layer in found if layer.index in chosen), key=lambda lay: -lay.index):
            bypass(model.graph, layer.exit, layer.entry)
        finish(model)
        return self.outcome(model, {"layers": sorted(chosen)})

    def _choose(self, model: ir.Model, found: list) -> list[int]:
        if self.layers:
            return sorted(set(self.layers))
        if self.importance == "plan":
            return sorted(set(importance.load_plan(self.plan, "layers")["layers"]))
        if self.count <= 0:
            return []
        if self.count >= len(found):
            raise UserError(
                f"drop-layers count {self.count} would remove all {len(found)} layers", "lower the count"
            )
        scores = importance.layer_scores(model, found, self.importance, self.calibration)
        return sorted(sorted(scores, key=lambda layer: scores[layer])[: self.count])
