"""Numerical verification: does a transformed or lowered model compute what its reference computes?

The comparison and the tolerance rule are the runner's (``redux_edge.runtime.tolerance``), so that a
compile and a device's health check judge outputs alike; here a mismatch is a ``VerificationError``.
"""

from __future__ import annotations

from redux_edge.errors import VerificationError
from redux_edge.runtime.tolerance import Tolerance, compare, mismatch

__all__ = ["Tolerance", "compare", "require_match"]


def require_match(report: dict, tolerance: Tolerance, what: str) -> None:
    if why := mismatch(report, tolerance):
        raise VerificationError(f"{what}: {why}", _HINTS.get(_kind(why), _HINTS["diverges"]))


_HINTS = {
    "shape": "--debug",
    "no elements": "give every input dimension a size of at least 1 (--shapes NAME:DxD...)",
    "NaN/inf": "the compile was not written; the model computes NaN/inf on these inputs: check it, or give "
    "inputs it is meant for with --inputs FILE",
    "diverges": "the compile was not written; check the recipe, or relax --tolerance-cosine/--tolerance-atol",
}


def _kind(why: str) -> str:
    return next((kind for kind in _HINTS if kind in why), "diverges")
