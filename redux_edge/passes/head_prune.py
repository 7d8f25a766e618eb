"""prune-heads: remove whole attention heads from every matched attention block.

Follows SHRP ("Specialized Head Routing and Pruning", see docs/PAPERS.md), whose deployment step is a
deterministic decision to drop the heads that are rarely used, and Michel et al. (2019) for choosing them by
importance. A removed head is gone for real: its columns of the query, key and value weights and biases, its
rows of the output projection, and the head count in every reshape of the block, so the saved model is
smaller and faster. The result equals the dense model with those heads' outputs zeroed, which is exactly
what the compile verifies against.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from redux_edge.analysis.importance import head_scores
from redux_edge.interfaces import Flag
from redux_edge.ir.blocks import AttentionBlock, Structure
from redux_edge.ir.surgery import head_columns, replace_linear, replace_shape_slot
from redux_edge.passes.structural import SHARED_FLAGS, UnitPruningPass

__all__ = ["PruneHeadsPass"]


@dataclasses.dataclass
class PruneHeadsPass(UnitPruningPass):
    name = "prune-heads"
    summary = "remove attention heads: Q/K/V columns, output-projection rows and head counts (SHRP)"
    unit = "heads"
    kind = "attention"
    flags = (
        Flag("--prune-heads", "Remove this fraction of attention heads (prune-heads).", "fraction", float),
        *SHARED_FLAGS,
    )

    def blocks_of(self, structure: Structure) -> list[AttentionBlock]:
        return structure.attention

    def size(self, block: AttentionBlock) -> int:
        return block.heads

    def scores(self, model: ir.Model, blocks: list[AttentionBlock]) -> dict[int, np.ndarray]:
        return head_scores(model, blocks, self.importance, self.calibration, self.seed)

    def remove(self, graph: ir.Graph, block: AttentionBlock, heads: list[int]) -> None:
        kept = [h for h in range(block.heads) if h not in heads]
        columns = head_columns(kept, block.head_dim)
        for projection in (block.query, block.key, block.value):
            bias = None if projection.bias is None else projection.bias[columns]
            replace_linear(graph, projection, projection.weight[:, columns], bias)
        replace_linear(graph, block.output, block.output.weight[columns], block.output.bias)
        for slot in block.shape_slots:
            # The element holds the heads times other dims (batch, head size): only the head count changes.
            replace_shape_slot(graph, slot, slot.value // block.heads * len(kept))
