"""Cleanup: constant folding and dead-code removal with the onnxscript optimizer.

Follows the ONNX Script optimizer (``onnxscript.optimizer.optimize``): it folds subgraphs whose inputs
are all constants, inlines local functions, and removes nodes, initializers and functions that no output
depends on. Exact by construction; it runs first in every recipe so that later passes match a
canonical graph, and may run again last to drop what they left unused.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir
import onnxscript.optimizer

from redux_edge.errors import UserError
from redux_edge.passes.contract import PassOutcome, RecipePass, parameter

__all__ = ["CleanupPass"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CleanupPass(RecipePass):
    name = "cleanup"
    summary = "constant folding, function inlining and dead-code removal (onnxscript optimizer)"
    exact = True

    iterations: int = parameter(2, "rounds of folding and dead-code removal", minimum=1)

    def call(self, model: ir.Model) -> PassOutcome:
        before = _graph_size(model)
        onnxscript.optimizer.optimize(model, num_iterations=self.iterations)
        _drop_newer_reshape_attribute(model)
        after = _graph_size(model)
        logger.info("cleanup: %d nodes, %d initializers -> %d, %d", *before, *after)
        return PassOutcome(model, modified=before != after)


def _graph_size(model: ir.Model) -> tuple[int, int]:
    return len(model.graph), len(model.graph.initializers)


def _drop_newer_reshape_attribute(model: ir.Model) -> None:
    """onnxscript 0.7.2's rewrites write Reshape(allowzero=1) at any opset, and the attribute exists from 14
    on: an ORT-quantized opset-12 CNN became a model ONNX Runtime refused. Before 14 a zero in the shape
    copies the input's dimension; where the shape is a constant without zeros both readings agree."""
    if model.opset_imports.get("", 0) >= _ALLOWZERO_OPSET:
        return
    for node in model.graph:
        if node.op_type != "Reshape" or "allowzero" not in node.attributes:
            continue
        target = node.inputs[1] if len(node.inputs) > 1 else None
        shape = ir.convenience.get_const_tensor(target) if target is not None else None
        if node.attributes.get_int("allowzero", 0) and (shape is None or not shape.numpy().all()):
            raise UserError(
                f"cleanup made Reshape {node.name} with allowzero, which opset "
                f"{model.opset_imports['']} lacks",
                "compile with --pass cleanup:iterations=1 or report the model",
            )
        del node.attributes["allowzero"]


_ALLOWZERO_OPSET = 14
