"""How far a pass that changes numerics on purpose moved a model's outputs, and the gate it must pass.

The shift is measured between the float model (the model before the first such pass) and the compiled
one, on the inputs the compile verifies with, with numbers that see every kind of output:

- ``rel_l2``: the norm of the difference over the whole batch, relative to the float outputs' norm. It
  sees a scalar per sample (a probability that moved from 0.66 to 0.97) that a per-sample cosine, always
  1 for one number, cannot;
- ``min_cosine``: the smallest per-sample cosine, for outputs with a feature axis (one wrecked sample
  among good ones);
- ``top1``: the share of samples whose arg-max is unchanged, for class logits;
- ``equal``: the share of elements unchanged, for integer and boolean outputs (ids, masks).

The defaults are in ``GATES``, one per kind of change, read off the zoo's and the corpus's compiles (see
docs/QUALITY.md): loose enough for what INT8 or 2:4 normally costs, tight enough that a model whose text
recognizer reads nothing, or whose probability flips, is refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["GATES", "Gate", "failures", "output_shift"]


@dataclass(frozen=True)
class Gate:
    """The most an output may move: relative L2 over the batch, the smallest per-sample cosine, the
    share of unchanged top-1 classes (and of unchanged integer elements)."""

    max_rel_l2: float
    min_cosine: float
    min_top1: float

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def loosest(gates: Iterable[Gate]) -> Gate:
        """Stacked changes may move as far as the most lenient of them alone is allowed to."""
        chosen = list(gates)
        return Gate(
            max(gate.max_rel_l2 for gate in chosen),
            min(gate.min_cosine for gate in chosen),
            min(gate.min_top1 for gate in chosen),
        )


# The defaults, by kind of change (what a pass's ``gate()`` names).
GATES = {
    "int8": Gate(max_rel_l2=0.25, min_cosine=0.9, min_top1=0.9),
    "int8-dynamic": Gate(max_rel_l2=0.25, min_cosine=0.9, min_top1=0.9),
    "fp16": Gate(max_rel_l2=0.02, min_cosine=0.999, min_top1=0.98),
    "bf16": Gate(max_rel_l2=0.05, min_cosine=0.995, min_top1=0.95),
    "tables-fp16": Gate(max_rel_l2=0.02, min_cosine=0.999, min_top1=0.98),
    "tables-int8": Gate(max_rel_l2=0.1, min_cosine=0.98, min_top1=0.95),
    "sparsity": Gate(max_rel_l2=0.5, min_cosine=0.8, min_top1=0.8),
    # Every run draws which pixels to drop (and, with hiding, what to fill them with): one sample's logits
    # may point elsewhere while the classes hold (hiding on MNIST: min cosine 0.48, top-1 kept 0.92).
    "mac-prune": Gate(max_rel_l2=1.0, min_cosine=0.0, min_top1=0.8),
}


def output_shift(
    before: list[np.ndarray], after: list[np.ndarray], names: list[str], logits: Iterable[str] = ()
) -> dict[str, dict]:
    """Per output, the numbers above (only those that apply to its kind)."""
    logits = set(logits)
    shift: dict[str, dict] = {}
    for name, old, new in zip(names, before, after, strict=True):
        old, new = np.asarray(old), np.asarray(new)
        if old.shape != new.shape:
            shift[name] = {"shape_mismatch": [list(old.shape), list(new.shape)]}
            continue
        if old.dtype.kind in "iub":
            shift[name] = {"equal": float(np.mean(old == new)) if old.size else 1.0}
            continue
        old64, new64 = old.astype(np.float64), new.astype(np.float64)
        numbers: dict = {"rel_l2": _relative_l2(old64, new64)}
        if old64.ndim >= 2 and old64[0].size > 1:
            numbers["min_cosine"] = _min_cosine(old64, new64)
        if name in logits and old64.ndim == 2 and old64.shape[1] > 1:
            numbers["top1"] = float(np.mean(old64.argmax(axis=1) == new64.argmax(axis=1)))
        shift[name] = numbers
    return shift


def failures(shift: dict[str, dict], gate: Gate) -> list[str]:
    """What moved beyond ``gate``, one phrase per number; empty when every output is within it."""
    found = []
    for name, numbers in shift.items():
        if "shape_mismatch" in numbers:
            found.append(f"output '{name}' changed shape")
            continue
        checks = (
            ("rel_l2", numbers.get("rel_l2"), lambda v: v > gate.max_rel_l2, f"> {gate.max_rel_l2}"),
            ("min_cosine", numbers.get("min_cosine"), lambda v: v < gate.min_cosine, f"< {gate.min_cosine}"),
            ("top1", numbers.get("top1"), lambda v: v < gate.min_top1, f"< {gate.min_top1}"),
            ("equal", numbers.get("equal"), lambda v: v < gate.min_top1, f"< {gate.min_top1}"),
        )
        for label, value, beyond, bound in checks:
            if value is not None and (not np.isfinite(value) or beyond(value)):
                found.append(f"output '{name}' {label} {value:.4g} {bound}")
    return found


def _relative_l2(old: np.ndarray, new: np.ndarray) -> float:
    finite = np.isfinite(old) & np.isfinite(new)
    if not finite.all():
        return float("inf")
    scale = np.linalg.norm(old)
    difference = np.linalg.norm(new - old)
    return float(difference / scale) if scale > 0 else (0.0 if difference == 0 else float("inf"))


def _min_cosine(old: np.ndarray, new: np.ndarray) -> float:
    rows_old, rows_new = old.reshape(old.shape[0], -1), new.reshape(new.shape[0], -1)
    norms = np.linalg.norm(rows_old, axis=1) * np.linalg.norm(rows_new, axis=1)
    dots = (rows_old * rows_new).sum(axis=1)
    cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 1.0)
    return float(cosine.min(initial=1.0))
