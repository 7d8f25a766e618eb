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
import onnx_ir as ir

from redux_edge.analysis import in_memory_runner
from redux_edge.ir.batch import Batches
from redux_edge.ir.surgery import copy_model

__all__ = ["GATES", "Gate", "failures", "output_shift", "weights_that_move_most"]


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


# Samples the per-node comparison runs on: every intermediate tensor of both models is kept in memory.
MOVER_SAMPLES = 8


def weights_that_move_most(
    before: ir.Model, after: ir.Model, feeds: dict[str, np.ndarray], count: int = 3
) -> list[tuple[str, float]]:
    """The weights of the nodes at which the outputs start to move: per node of ``before`` whose output
    ``after`` still computes (a quantizer keeps the names it wraps), the relative L2 shift of that output
    less the largest shift of the node's inputs, ranked; each with the node's weights (its initializers).
    Returns up to ``count`` (weight name, jump) pairs, largest jump first."""
    batches = Batches.of(before)  # a scalar input, or a batch on axis 1, is cut along its own axis
    rows = {name: batches.first(name, array, MOVER_SAMPLES) for name, array in feeds.items()}
    produced_after = {str(v.name) for node in after.graph for v in node.outputs}
    watched = [
        value
        for node in before.graph
        for value in node.outputs
        if value.name in produced_after and value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16)
    ]
    names = [str(value.name) for value in watched]
    shifts = dict(zip(names, _intermediate_shifts(before, after, names, rows), strict=True))
    jumps: dict[str, float] = {}
    for node in before.graph:
        moved = [shifts[v.name] for v in node.outputs if v.name in shifts]
        weights = [v.name for v in node.inputs if v is not None and v.is_initializer() and v.name]
        if not moved or not weights:
            continue
        incoming = max((shifts.get(str(v.name), 0.0) for v in node.inputs if v is not None), default=0.0)
        jump = max(moved) - incoming
        for weight in weights:
            if jump > jumps.get(weight, 0.0):
                jumps[weight] = jump
    return sorted(jumps.items(), key=lambda item: -item[1])[:count]


def _intermediate_shifts(
    before: ir.Model, after: ir.Model, names: list[str], feeds: dict[str, np.ndarray]
) -> list[float]:
    """The relative L2 shift of each named tensor between the two models (infinite where not finite)."""
    outputs = []
    for model in (before, after):
        exposed = copy_model(model)
        values = {str(v.name): v for node in exposed.graph for v in node.outputs}
        exposed.graph.outputs.clear()
        exposed.graph.outputs.extend(values[name] for name in names)
        outputs.append(in_memory_runner(exposed)(feeds))
    return [
        _relative_l2(np.asarray(old, np.float64), np.asarray(new, np.float64))
        if old.shape == new.shape
        else 0.0
        for old, new in zip(*outputs, strict=True)
    ]
