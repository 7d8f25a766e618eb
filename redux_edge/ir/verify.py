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
        hint = (
            "--debug"
            if "shape" in why
            else "the compile was not written; check the recipe, or relax --tolerance-cosine/--tolerance-atol"
        )
        raise VerificationError(f"{what}: {why}", hint)
