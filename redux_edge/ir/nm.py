"""N:M semi-structured sparsity arithmetic: in every group of M consecutive weights along the reduction
(input) dimension, at most N are non-zero.

This is the layout of NVIDIA's sparse tensor cores, 2:4 on Ampere and later (Mishra et al., 2021,
"Accelerating Sparse Deep Neural Networks"); the groups run along axis 1 of a weight in PyTorch layout
(a Linear's input features, a Conv's input channels at each kernel position).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

from redux_edge.errors import UserError

__all__ = ["Eligibility", "candidates", "groups", "magnitude_mask", "parse_pattern", "ungroup", "violations"]


def parse_pattern(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not match or not 0 < int(match[1]) < int(match[2]) <= 16:
        raise UserError(f"sparsity pattern '{text}' is not N:M with 0 < N < M <= 16", "use 2:4")
    return int(match[1]), int(match[2])


def groups(torch_layout: np.ndarray, m: int) -> np.ndarray:
    """[groups, m]: the weight cut into runs of ``m`` along axis 1 (which must divide by ``m``)."""
    return np.moveaxis(torch_layout, 1, -1).reshape(-1, m)


def ungroup(grouped: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of ``groups`` for a weight of ``shape`` (PyTorch layout)."""
    moved = (shape[0], *shape[2:], shape[1])
    return np.moveaxis(grouped.reshape(moved), -1, 1)


def magnitude_mask(torch_layout: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the ``n`` largest magnitudes of every group (ties go to the earlier position)."""
    grouped = np.abs(groups(torch_layout, m))
    order = np.argsort(-grouped, axis=1, kind="stable")[:, :n]
    keep = np.zeros(grouped.shape, bool)
    np.put_along_axis(keep, order, True, axis=1)
    return ungroup(keep, torch_layout.shape)


def violations(torch_layout: np.ndarray, n: int, m: int) -> int:
    """How many groups hold more than ``n`` non-zeros."""
    return int(((groups(torch_layout, m) != 0).sum(axis=1) > n).sum())


def candidates(n: int, m: int) -> np.ndarray:
    """[C(m, n), m]: every way to keep ``n`` of ``m`` (the 6 masks of 2:4), as 0/1 floats."""
    rows = [[1.0 if i in kept else 0.0 for i in range(m)] for kept in itertools.combinations(range(m), n)]
    return np.array(rows, np.float32)


@dataclass(frozen=True)
class Eligibility:
    """Which weights are worth N:M sparsity, following NVIDIA's ASP (the training side of TensorRT's sparse
    workflow): the reduction dimension divides by 16 and the output dimension by 8 (the sparse
    tensor-core tile), the weight is not shared, and it is large enough to gain (``min_weights``);
    ``include``/``exclude`` regular expressions on the weight names narrow it further. The sparsity pass
    and MaskLLM training share this rule, so that learned masks cover exactly what the pass sparsifies."""

    m: int
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_weights: int = 16384
    tensor_core_shapes: bool = True

    def why_not(self, name: str, shape: tuple[int, ...], shared: bool = False) -> str:
        """Why the weight ``name`` of ``shape`` (PyTorch layout) stays dense; empty when it qualifies."""
        if self.include and not any(re.search(p, name) for p in self.include):
            return "not matched by include"
        if hit := next((p for p in self.exclude if re.search(p, name)), None):
            return f"excluded by {hit!r}"
        if shared:
            return "shared by several nodes"
        if shape[1] % self.m:
            return f"input dimension {shape[1]} is not a multiple of {self.m}"
        if self.tensor_core_shapes and (shape[1] % 16 or shape[0] % 8):
            return f"{shape[0]} outputs x {shape[1]} inputs do not fill sparse tensor-core tiles (8 x 16)"
        size = int(np.prod(shape))
        if size < self.min_weights:
            return f"{size} weights, below min_weights {self.min_weights}: too small to gain"
        return ""
