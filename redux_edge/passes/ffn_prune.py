"""prune-ffn: remove intermediate neurons of every matched transformer feed-forward block.

Structured neuron pruning of the feed-forward network (as in CoFi, Xia et al., 2022, and the FFN part of
SHRP's expander, see docs/PAPERS.md): a removed neuron loses its column of the first projection and its
bias, and its row of the second projection. Two thirds of a BERT layer's multiply-accumulates are in this
block, so this is where most of the speed comes from. The result equals the dense model with those neurons'
activations zeroed, which the compile verifies.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from redux_edge.analysis.importance import neuron_scores
from redux_edge.interfaces import Flag
from redux_edge.ir.blocks import FeedForwardBlock, Structure
from redux_edge.ir.surgery import replace_linear
from redux_edge.passes.structural import SHARED_FLAGS, UnitPruningPass

__all__ = ["PruneFfnPass"]


@dataclasses.dataclass
class PruneFfnPass(UnitPruningPass):
    name = "prune-ffn"
    summary = "remove feed-forward neurons: first-projection columns, second-projection rows"
    unit = "ffn"
    kind = "feed-forward"
    flags = (
        Flag("--prune-ffn", "Remove this fraction of feed-forward neurons (prune-ffn).", "fraction", float),
        *SHARED_FLAGS,
    )

    def blocks_of(self, structure: Structure) -> list[FeedForwardBlock]:
        return structure.feed_forward

    def size(self, block: FeedForwardBlock) -> int:
        return block.width

    def scores(self, model: ir.Model, blocks: list[FeedForwardBlock]) -> dict[int, np.ndarray]:
        return neuron_scores(model, blocks, self.importance, self.calibration, self.seed)

    def remove(self, graph: ir.Graph, block: FeedForwardBlock, neurons: list[int]) -> None:
        kept = np.setdiff1d(np.arange(block.width), neurons)
        bias = None if block.up.bias is None else block.up.bias[kept]
        replace_linear(graph, block.up, block.up.weight[:, kept], bias)
        replace_linear(graph, block.down, block.down.weight[kept], block.down.bias)
