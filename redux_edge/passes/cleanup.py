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
        after = _graph_size(model)
        logger.info("cleanup: %d nodes, %d initializers -> %d, %d", *before, *after)
        return PassOutcome(model, modified=before != after)


def _graph_size(model: ir.Model) -> tuple[int, int]:
    return len(model.graph), len(model.graph.initializers)
