"""adapters: put low-bit LoRA adapter packs into the graph, merged into the weights or swappable.

Follows LoRA (Hu et al., 2021) and the low-bit adapter paper (../shared/PAPERS.md): a pack from
``redux-edge train-adapter`` holds, per target weight, quantized factors ``down`` [rank, in] and ``up``
[out, rank], and a task head. ``merge = true`` (one pack) adds ``up @ down`` to each target weight and the
head as constants: one task, no extra work at run time. Otherwise every target projection gets a branch
``x @ down.T @ up.T`` added to its output and the graph gains a ``logits`` output from the head; the
factors and head are initializers holding the first pack, and the runner swaps in another pack's values
when a session opens (``redux-edge run BUNDLE --adapter TASK``), so many tasks share one compiled base.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from redux_edge.errors import UserError
from redux_edge.ir.surgery import finish, new_initializer
from redux_edge.ir.weights import Weight, find_weights
from redux_edge.passes import RecipePass
from redux_edge.runtime.runner import read_adapter_pack

__all__ = ["AdaptersPass"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class AdaptersPass(RecipePass):
    name = "adapters"
    summary = "low-bit LoRA adapter packs with task heads: merged into the weights, or swappable per task"

    packs: list = dataclasses.field(default_factory=list)
    merge: bool = False

    # The packs as read by task; after the pass, the initializer names the runner overrides.
    read: ClassVar[dict] = {}
    names: ClassVar[dict] = {}

    def __post_init__(self) -> None:
        """Check the parameters and read the packs when the recipe is built, before any model work."""
        if not self.packs:
            raise UserError("adapters: no packs given", "train one with redux-edge train-adapter")
        if self.merge and len(self.packs) != 1:
            raise UserError("adapters: merge takes exactly one pack", "drop --merge to keep several packs")
        self.read = _read_packs(self.packs)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        first = next(iter(self.read.values()))
        weights = {w.name: w for w in find_weights(model)}
        if missing := set(first["factors"]) - set(weights):
            raise UserError(
                f"adapter pack {self.packs[0]} targets weights this model lacks: {sorted(missing)[:2]}",
                "train the adapters on this model",
            )
        names = {"factors": {}}
        for weight_name, parts in first["factors"].items():
            weight = weights[weight_name]
            out_features, in_features = weight.torch_layout.shape[:2]
            if parts["down"].shape[1] != in_features or parts["up"].shape[0] != out_features:
                raise UserError(
                    f"the adapters for {weight_name} do not fit its {out_features}x{in_features} weight",
                    "adapters are trained on the dense model: compile them without pruning",
                )
            if self.merge:
                delta = parts["up"] @ parts["down"]  # [out, in], PyTorch layout
                merged = weight.torch_layout + delta
                weight.node.replace_input_with(
                    1, new_initializer(model.graph, weight.stored(merged), f"{weight.value.name}.adapted")
                )
            else:
                names["factors"][weight_name] = _add_branch(model.graph, weight, parts)
        names |= _add_head(model, first)
        finish(model)
        self.names = {} if self.merge else names
        logger.info("adapters: %s %s", "merged" if self.merge else "swappable", list(self.read))
        return ir.passes.PassResult(model, modified=True)


def _read_packs(paths: list[str]) -> dict[str, dict]:
    read = {}
    for path in paths:
        try:
            pack = read_adapter_pack(Path(path))
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(
                f"cannot read adapter pack {path}: {exc}", "give a pack from train-adapter"
            ) from exc
        task = pack["header"]["task"]
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", str(task)):
            raise UserError(
                f"adapter pack {path} has task name {task!r}", "task names are letters, digits, - and _"
            )
        if task in read:
            raise UserError(f"two adapter packs are for task '{task}'", "give one pack per task")
        read[task] = pack
    shapes = {
        task: (
            {w: {k: v.shape for k, v in p.items()} for w, p in pack["factors"].items()},
            pack["head_weight"].shape,
        )
        for task, pack in read.items()
    }
    if len({repr(s) for s in shapes.values()}) > 1:
        raise UserError(
            f"adapter packs {', '.join(read)} differ in targets, rank or classes",
            "packs that share a base are trained with the same --rank and targets, and as many classes",
        )
    return read


def _add_branch(graph: ir.Graph, weight: Weight, parts: dict) -> dict:
    """``output + (x @ down.T) @ up.T`` after the projection (and its bias); the initializer names."""
    output = weight.node.outputs[0]
    users = list(output.uses())
    if (
        len(users) == 1
        and users[0].node.op_type == "Add"
        and any(v is not None and v.const_value is not None for v in users[0].node.inputs)
    ):
        output = users[0].node.outputs[0]  # the bias Add
    base = weight.name.removesuffix(".weight")
    down = new_initializer(graph, np.ascontiguousarray(parts["down"].T), f"adapter.{base}.down")
    up = new_initializer(graph, np.ascontiguousarray(parts["up"].T), f"adapter.{base}.up")
    uses = list(output.uses())
    reduced = ir.node("MatMul", [weight.node.inputs[0], down], name=f"adapter_{base}_down")
    expanded = ir.node("MatMul", [reduced.outputs[0], up], name=f"adapter_{base}_up")
    summed = ir.node("Add", [output, expanded.outputs[0]], name=f"adapter_{base}_add")
    graph.insert_after(output.producer(), [reduced, expanded, summed])
    for use in uses:
        use.node.replace_input_with(use.idx, summed.outputs[0])
    return {"down": down.name, "up": up.name}


def _add_head(model: ir.Model, pack: dict) -> dict:
    """A ``logits`` output: the task head on the model's first output."""
    if any(output.name == "logits" for output in model.graph.outputs):
        raise UserError("the model already has a 'logits' output", "adapter heads are for encoder models")
    features = model.graph.outputs[0]
    weight = new_initializer(model.graph, np.ascontiguousarray(pack["head_weight"].T), "adapter.head.weight")
    bias = new_initializer(model.graph, pack["head_bias"], "adapter.head.bias")
    product = ir.node("MatMul", [features, weight], name="adapter_head")
    logits = ir.node("Add", [product.outputs[0], bias], name="adapter_head_bias")
    logits.outputs[0].name = "logits"
    logits.outputs[0].dtype = ir.DataType.FLOAT
    model.graph.extend([product, logits])
    model.graph.outputs.append(logits.outputs[0])
    return {"head_weight": weight.name, "head_bias": bias.name}
