"""adapters: put low-bit LoRA adapter packs into the graph, merged into the weights or swappable.

Follows LoRA (Hu et al., 2021) and the low-bit adapter paper (docs/PAPERS.md): a pack from
``redux-edge train-adapter`` holds, per target weight, quantized factors ``down`` [rank, in] and ``up``
[out, rank], and a task head. ``merge = true`` (one pack) adds ``up @ down`` to each target weight and the
head as constants: one task, no extra work at run time. Otherwise every target projection gets a branch
``x @ down.T @ up.T`` added to its output and the graph gains a ``logits`` output from the head; the
factors and head are initializers holding the first pack, and the runner swaps in another pack's values
when a session opens (``redux-edge run BUNDLE --adapter TASK``), so many tasks share one compiled base.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from redux_edge.errors import UserError
from redux_edge.ir.surgery import finish, new_initializer
from redux_edge.ir.verify import compare, require_match
from redux_edge.ir.weights import Weight, find_weights
from redux_edge.passes.contract import (
    CompileContext,
    Flag,
    PassOutcome,
    RecipePass,
    ReferenceChange,
    Section,
    parameter,
)
from redux_edge.runtime.adapter_pack import read_adapter_pack
from redux_edge.runtime.session import BundleSession

if TYPE_CHECKING:
    from torch import nn

    from redux_edge.backends.base import Backend
    from redux_edge.targets import Target

__all__ = ["AdaptersPass"]

logger = logging.getLogger(__name__)

_NEEDS_THE_MODULE = (
    "adapter packs are verified against the PyTorch model they were trained on",
    "compile the zoo model the packs were trained for",
)


class AdaptersSection(Section):
    key = "adapters"

    def __init__(self, outcomes: list[PassOutcome]) -> None:
        super().__init__(outcomes)
        outcome = outcomes[0]
        assert isinstance(outcome, AdaptersAdded) and len(outcomes) == 1  # the recipe takes one adapters pass
        self.outcome = outcome

    def check(self, context: CompileContext) -> None:
        if context.source.module is None:
            raise UserError(*_NEEDS_THE_MODULE)
        if any(section is not self and section.reference() for section in context.sections):
            raise UserError(
                "adapters with structural or sparsity passes in one compile are not supported",
                "adapters are trained on the dense model: compile them without pruning or sparsity",
            )

    def reference(self) -> ReferenceChange:
        task, pack = next(iter(self.outcome.read.items()))
        return _WithPack(task, pack)

    def stage(self, context: CompileContext) -> dict:
        """Copy the packs to ``adapters/<task>.bin``; the manifest entry listing them."""
        assert context.stage is not None
        (context.stage / "adapters").mkdir()
        packs = []
        for (task, pack), path in zip(self.outcome.read.items(), self.outcome.packs, strict=True):
            copy = context.stage / "adapters" / f"{task}.bin"
            shutil.copyfile(path, copy)
            header = pack["header"]
            packs.append(
                {
                    "task": task,
                    "file": f"adapters/{task}.bin",
                    "labels": header["labels"],
                    "bits": header["bits"],
                    "rank": header["rank"],
                    "bytes": copy.stat().st_size,
                    **header["metrics"],
                }
            )
        entry = {
            "merged": self.outcome.merge,
            "default": packs[0]["task"],
            "initializers": self.outcome.names,
            "packs": packs,
        }
        return {self.key: entry}

    def verify(self, context: CompileContext) -> None:
        """Open the artifact with each pack swapped in, as a device does, and compare with PyTorch."""
        from redux_edge.analysis.adapted import PackedAdapters
        from redux_edge.frontend.module_run import run_module

        if self.outcome.merge:
            return
        source, stage = context.source, context.stage
        assert stage is not None and source.module is not None
        with context.step(
            f"verifying every adapter pack swapped into the artifact ({', '.join(self.outcome.read)})"
        ):
            for entry in context.manifest[self.key]["packs"]:
                outputs = BundleSession(stage, adapter=entry["task"]).run(source.inputs)
                expected = run_module(
                    PackedAdapters(source.module, self.outcome.read[entry["task"]]), source.inputs
                )
                entry["verify"] = compare(expected, outputs, source.output_names)
                require_match(
                    entry["verify"],
                    context.tolerance,
                    f"the artifact with the adapter pack '{entry['task']}'",
                )

    @staticmethod
    def render(section: dict, manifest: Mapping[str, Any]) -> list[str]:
        how = "merged into the weights" if section["merged"] else "swap with run --adapter TASK"
        lines = []
        for pack in section["packs"]:
            checked = pack.get("verify", {}).get("logits", {}).get("max_abs")
            verified = f", verified swapped in (logits max abs {checked:.1e})" if checked is not None else ""
            default = " (default)" if pack["task"] == section["default"] and not section["merged"] else ""
            lines.append(
                f"  adapter  {pack['task']}{default}: {pack['bits']}-bit rank {pack['rank']}, "
                f"{pack['bytes']:,} bytes, test accuracy {pack['accuracy']:.3f} ({pack['test_sentences']} "
                f"sentences){verified}; {how}"
            )
        return lines


@dataclasses.dataclass
class AdaptersAdded(PassOutcome):
    """The packs as read, by task; the initializer names the runner overrides (swappable packs)."""

    read: dict[str, dict]
    names: dict
    merge: bool
    packs: list[str]

    section = AdaptersSection


class _WithPack(ReferenceChange):
    def __init__(self, task: str, pack: dict) -> None:
        self.pack = pack
        self.describes = f", with the adapter pack '{task}' (dequantized from its file)"

    def on_module(self, module: nn.Module, architecture: dict, stack: contextlib.ExitStack) -> nn.Module:
        from redux_edge.analysis.adapted import PackedAdapters

        return PackedAdapters(module, self.pack)

    def on_graph(self, model: ir.Model) -> None:
        raise UserError(*_NEEDS_THE_MODULE)


@dataclasses.dataclass
class AdaptersPass(RecipePass):
    name = "adapters"
    summary = "low-bit LoRA adapter packs with task heads: merged into the weights, or swappable per task"
    flags = (
        Flag(
            "--adapters",
            "Adapter pack from train-adapter (repeatable; the first is the default task).",
            "packs",
            type="path",
            multiple=True,
        ),
        Flag(
            "--merge-adapters",
            "Merge the (one) adapter pack into the weights.",
            "merge",
            type=bool,
            enables=False,
            alone=("--merge-adapters needs --adapters PACK", "give the pack to merge"),
        ),
    )

    packs: list[str] = parameter([], "adapter pack files from train-adapter; the first is the default task")
    merge: bool = parameter(False, "merge the one pack into the weights instead of swappable branches")

    def refuses(self, backend: Backend, target: Target) -> str:
        from redux_edge.backends import backends_with

        if self.merge or backend.swaps_initializers:
            return ""
        able = " or ".join(other.name for other in backends_with("swaps_initializers"))
        return (
            f"swappable adapter packs need the {able} backend, not {backend.name} "
            "(or merge one pack: --merge-adapters)"
        )

    def __post_init__(self) -> None:
        """Check the parameters and read the packs when the recipe is built, before any model work."""
        if not self.packs:
            raise UserError("adapters: no packs given", "train one with redux-edge train-adapter")
        if self.merge and len(self.packs) != 1:
            raise UserError("adapters: merge takes exactly one pack", "drop --merge to keep several packs")
        self.read = _read_packs(self.packs)

    def call(self, model: ir.Model) -> AdaptersAdded:
        first = next(iter(self.read.values()))
        weights = {w.name: w for w in find_weights(model)}
        if missing := set(first["factors"]) - set(weights):
            raise UserError(
                f"adapter pack {self.packs[0]} targets weights this model lacks: {sorted(missing)[:2]}",
                "train the adapters on this model",
            )
        names: dict = {"factors": {}}
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
        logger.info("adapters: %s %s", "merged" if self.merge else "swappable", list(self.read))
        return AdaptersAdded(model, True, self.read, {} if self.merge else names, self.merge, self.packs)


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
    producer = output.producer()
    assert producer is not None, "a weight's projection produces its output"
    graph.insert_after(producer, [reduced, expanded, summed])
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
