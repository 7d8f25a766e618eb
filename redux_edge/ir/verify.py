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
        hint = _HINTS.get(_kind(why), _HINTS["diverges"])
        if _kind(why) == "diverges" and (accepting := _accepting(report)):
            hint = f"{hint}: {accepting} would accept these outputs"
        raise VerificationError(f"{what}: {why}", hint)


def _accepting(report: dict) -> str:
    """The tolerance flags under which every output of ``report`` would have matched."""
    numbers = [entry for entry in report.values() if "max_abs" in entry]
    if not numbers:
        return ""
    atol = max(entry["max_abs"] / max(1.0, entry["ref_max_abs"]) for entry in numbers)
    cosine = min(entry["min_cosine"] for entry in numbers)
    return f"--tolerance-atol {atol * 1.001:.3g} --tolerance-cosine {max(cosine - 1e-6, 0.0):.6f}"


_HINTS = {
    "shape": "--debug",
    "no elements": "give every input dimension a size of at least 1 (--shapes NAME:DxD...)",
    "NaN/inf": "the compile was not written; the model computes NaN/inf on these inputs: check it, or give "
    "inputs it is meant for with --inputs FILE",
    "diverges": "the compile was not written; check the recipe, or relax the tolerance",
}


def _kind(why: str) -> str:
    return next((kind for kind in _HINTS if kind in why), "diverges")
