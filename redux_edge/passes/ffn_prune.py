"""prune-ffn: remove intermediate neurons of every matched transformer feed-forward block.

Structured neuron pruning of the feed-forward network (as in CoFi, Xia et al., 2022, and the FFN part of
SHRP's expander, see ../shared/PAPERS.md): a removed neuron loses its column of the first projection and its
bias, and its row of the second projection. Two thirds of a BERT layer's multiply-accumulates are in this
block, so this is where most of the speed comes from. The result equals the dense model with those neurons'
activations zeroed, which the compile verifies.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from redux_edge.analysis.importance import neuron_scores
from redux_edge.ir.blocks import number_layers
from redux_edge.ir.surgery import finish, replace_linear
from redux_edge.passes import UnitPruningPass

__all__ = ["PruneFfnPass"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PruneFfnPass(UnitPruningPass):
    name = "prune-ffn"
    summary = "remove feed-forward neurons: first-projection columns, second-projection rows"
    unit = "ffn"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        structure = number_layers(model)
        blocks = self.require_blocks(structure.feed_forward, structure.problems, "feed-forward")
        removed = self.choose(model, blocks, {b.layer: b.width for b in blocks}, neuron_scores)
        for block in blocks:
            if removed.get(block.layer):
                kept = np.setdiff1d(np.arange(block.width), removed[block.layer])
                bias = None if block.up.bias is None else block.up.bias[kept]
                replace_linear(model.graph, block.up, block.up.weight[:, kept], bias)
                replace_linear(model.graph, block.down, block.down.weight[kept], block.down.bias)
        finish(model)
        self.removed = {"ffn": {str(k): v for k, v in removed.items() if v}}
        logger.info("prune-ffn removed %s neurons", {k: len(v) for k, v in self.removed["ffn"].items()})
        return ir.passes.PassResult(model, modified=bool(self.removed["ffn"]))
