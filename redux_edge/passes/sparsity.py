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
from pathlib import Path

import numpy as np
import onnx_ir as ir

from redux_edge.errors import UserError
from redux_edge.interfaces import Flag
from redux_edge.ir import nm
from redux_edge.ir.surgery import finish, new_initializer
from redux_edge.ir.weights import Weight, find_weights
from redux_edge.passes.compression import WeightsMasked
from redux_edge.passes.contract import RecipePass, parameter
from redux_edge.untrusted import npy_members

__all__ = ["SparsityPass", "load_mask_plan"]

logger = logging.getLogger(__name__)

MASKS = ("magnitude", "learned")


@dataclasses.dataclass
class SparsityPass(RecipePass):
    name = "sparsity"
    summary = "N:M semi-structured sparsity (2:4) of MatMul/Gemm/Conv weights, magnitude or MaskLLM masks"
    flags = (
        Flag(
            "--sparsity",
            "Semi-structured weight sparsity, e.g. 2:4 (sparsity pass).",
            "pattern",
            metavar="N:M",
        ),
        Flag(
            "--sparsity-masks",
            "Learned N:M masks from `redux-edge learn-masks` (.npz) [default: magnitude].",
            type="path",
            convert=lambda path: {"mask": "learned", "plan": path},
        ),
    )
    compares_with_dense = True

    pattern: str = parameter("2:4", "N:M: at most N non-zeros in every M consecutive weights")
    mask: str = parameter("magnitude", "magnitude (keep the N largest) or learned (a MaskLLM plan)")
    plan: str = parameter("", "the .npz of learned masks (mask = learned), from learn-masks")
    include: list[str] = parameter([], "regular expressions: only weights whose names match")
    exclude: list[str] = parameter([], "regular expressions: weights whose names match stay dense")
    min_weights: int = parameter(16384, "weights smaller than this stay dense: too small to gain", minimum=0)
    tensor_core_shapes: bool = parameter(True, "only weights that fill sparse tensor-core tiles (8 x 16)")

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

    def gate(self) -> str | None:
        return "sparsity"

    def eligibility(self) -> nm.Eligibility:
        m = nm.parse_pattern(self.pattern)[1]
        return nm.Eligibility(
            m, tuple(self.include), tuple(self.exclude), self.min_weights, self.tensor_core_shapes
        )

    def call(self, model: ir.Model) -> WeightsMasked:
        n, m = nm.parse_pattern(self.pattern)
        planned = self.planned
        weights = find_weights(model)
        if unknown := set(planned) - {w.name for w in weights}:
            raise UserError(
                f"mask plan {self.plan} names weights the model does not have: {sorted(unknown)[:3]}",
                "learn the masks on this model (redux-edge learn-masks)",
            )
        eligibility = self.eligibility()
        report, masks = [], {}
        for weight in weights:
            entry = {"weight": weight.name, "shape": list(weight.torch_layout.shape)}
            reason = eligibility.why_not(weight.name, weight.torch_layout.shape, weight.shared)
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
        logger.info("sparsity %s: %d of %d weights", self.pattern, len(masks), len(weights))
        return WeightsMasked(model, bool(masks), masks, report, self.pattern)

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
    hint = "give the .npz learn-masks wrote"
    if not Path(path).is_file():
        raise UserError(f"cannot read mask plan {path}: no such file", hint)
    npy_members(Path(path), hint)
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name].astype(bool) for name in archive.files}
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read mask plan {path}: {exc}", hint) from exc
