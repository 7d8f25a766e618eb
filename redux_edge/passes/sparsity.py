"""sparsity: N:M semi-structured weight sparsity (2:4 by default) for NVIDIA sparse tensor cores.

Follows NVIDIA's 2:4 recipe (Mishra et al., 2021, "Accelerating Sparse Deep Neural Networks"): in every
group of M consecutive weights along the reduction dimension of a MatMul, Gemm or Conv weight, all but N are
zeroed. The mask is ``magnitude`` (keep the N largest of each group) or ``learned``: a MaskLLM plan
(Fang et al., 2024; ``redux-edge learn-masks``) naming the mask of every weight. Which weights qualify follows
NVIDIA's ASP library, the training side of TensorRT's sparse workflow: the reduction dimension divides by
16 and the output dimension by 8 (the sparse tensor-core tile), the weight is not shared, and it is large
enough to gain (``min_weights``); ``include``/``exclude`` regular expressions on the weight names narrow it
further. Shapes are unchanged and nothing runs faster on a CPU: the gain is on sparse tensor cores
(TensorRT ``--sparsity=enable`` on Orin/Ampere), and in bundle size, where the weights are stored packed.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import numpy as np
import onnx_ir as ir

from redux_edge.errors import UserError
from redux_edge.ir import nm
from redux_edge.ir.surgery import finish, new_initializer
from redux_edge.ir.weights import Weight, find_weights
from redux_edge.passes import WeightMaskPass

__all__ = ["SparsityPass", "load_mask_plan"]

logger = logging.getLogger(__name__)

MASKS = ("magnitude", "learned")


@dataclasses.dataclass
class SparsityPass(WeightMaskPass):
    name = "sparsity"
    summary = "N:M semi-structured sparsity (2:4) of MatMul/Gemm/Conv weights, magnitude or MaskLLM masks"

    pattern: str = "2:4"
    mask: str = "magnitude"
    plan: str = ""
    include: list = dataclasses.field(default_factory=list)
    exclude: list = dataclasses.field(default_factory=list)
    min_weights: int = 16384
    tensor_core_shapes: bool = True

    def __post_init__(self) -> None:
        """Check the parameters and read the plan when the recipe is built, before any model work."""
        nm.parse_pattern(self.pattern)
        if self.mask not in MASKS:
            raise UserError(f"sparsity: unknown mask '{self.mask}'", f"choose one of: {', '.join(MASKS)}")
        if self.mask == "learned" and not self.plan:
            raise UserError("sparsity with learned masks needs a plan", "run redux-edge learn-masks first")
        for pattern in (*self.include, *self.exclude):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise UserError(f"sparsity: bad pattern {pattern!r}: {exc}", "give a regex") from exc
        self.planned = load_mask_plan(self.plan) if self.mask == "learned" else {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        n, m = nm.parse_pattern(self.pattern)
        planned = self.planned
        weights = find_weights(model)
        if unknown := set(planned) - {w.name for w in weights}:
            raise UserError(
                f"mask plan {self.plan} names weights the model does not have: {sorted(unknown)[:3]}",
                "learn the masks on this model (redux-edge learn-masks)",
            )
        report, masks = [], {}
        for weight in weights:
            entry = {"weight": weight.name, "shape": list(weight.torch_layout.shape)}
            reason = self._ineligible(weight, m)
            if reason:
                report.append({**entry, "sparsified": False, "reason": reason})
                continue
            keep, source = self._mask(weight, planned, n, m)
            zeroed = weight.torch_layout * keep
            weight.node.replace_input_with(
                1, new_initializer(model.graph, weight.stored(zeroed), f"{weight.value.name}.sparse")
            )
            masks[weight.name] = keep
            report.append({**entry, "sparsified": True, "mask": source})
        if masks:
            finish(model)
        self.masks, self.report = masks, report
        logger.info("sparsity %s: %d of %d weights", self.pattern, len(masks), len(weights))
        return ir.passes.PassResult(model, modified=bool(masks))

    def _ineligible(self, weight: Weight, m: int) -> str:
        """Why ``weight`` is left dense; empty when it is sparsified."""
        shape = weight.torch_layout.shape
        if self.include and not any(re.search(p, weight.name) for p in self.include):
            return "not matched by include"
        if hit := next((p for p in self.exclude if re.search(p, weight.name)), None):
            return f"excluded by {hit!r}"
        if weight.shared:
            return "shared by several nodes"
        if shape[1] % m:
            return f"input dimension {shape[1]} is not a multiple of {m}"
        if self.tensor_core_shapes and (shape[1] % 16 or shape[0] % 8):
            return f"{shape[0]} outputs x {shape[1]} inputs do not fill sparse tensor-core tiles (8 x 16)"
        if weight.array.size < self.min_weights:
            return f"{weight.array.size} weights, below min_weights {self.min_weights}: too small to gain"
        return ""

    def _mask(self, weight: Weight, planned: dict, n: int, m: int) -> tuple[np.ndarray, str]:
        if weight.name not in planned:
            return nm.magnitude_mask(weight.torch_layout, n, m), "magnitude"
        keep = planned[weight.name]
        if keep.shape != weight.torch_layout.shape:
            raise UserError(
                f"mask plan {self.plan}: {weight.name} has shape {list(keep.shape)}, "
                f"the weight {list(weight.torch_layout.shape)}",
                "learn the masks on this model",
            )
        if nm.violations(keep, n, m):
            raise UserError(
                f"mask plan {self.plan}: the mask of {weight.name} is not {self.pattern}",
                "learn the masks with the same pattern",
            )
        return keep, "learned"


def load_mask_plan(path: str) -> dict[str, np.ndarray]:
    """Keep masks by weight name from a plan file (numpy ``.npz`` of boolean arrays; never unpickled)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name].astype(bool) for name in archive.files}
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read mask plan {path}: {exc}", "give the .npz learn-masks wrote") from exc
