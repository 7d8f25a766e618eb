"""Test Vector Leakage Assessment: fixed-vs-random Welch t-test per sample (Goodwill et al., NIST NIAT
2011; Schneider and Moradi, CHES 2015). |t| above 4.5 at a sample rejects "no data-dependent leakage" there
with confidence ~1 - 1e-5. The t statistics are computed by ``scared`` (``TTestAnalysis``) on the two sets
held in memory as estraces trace header sets (the attack, not the t-test, is the part that streams)."""

from __future__ import annotations

import numpy as np

from redux_edge.errors import UserError
from redux_edge.leakage.traces import TraceSet

__all__ = ["THRESHOLD", "welch_t"]

THRESHOLD = 4.5


def welch_t(fixed: TraceSet, random: TraceSet, chunk: int = 2000) -> dict:
    import estraces
    import scared

    if fixed.length != random.length:
        raise UserError(
            f"the fixed set has {fixed.length} samples per trace, the random set {random.length}",
            "capture both sets with the same window",
        )
    sets = [
        estraces.read_ths_from_ram(np.concatenate([samples for samples, _ in trace_set.chunks(chunk)]))
        for trace_set in (fixed, random)
    ]
    analysis = scared.TTestAnalysis(precision="float64")
    analysis.run(scared.TTestContainer(*sets))
    t = np.abs(np.asarray(analysis.result, dtype=np.float64))
    flagged = np.flatnonzero(t > THRESHOLD)
    return {
        "traces": {"fixed": len(fixed), "random": len(random)},
        "threshold": THRESHOLD,
        "max_abs_t": float(t.max()),
        "at_sample": int(t.argmax()),
        "samples_over_threshold": len(flagged),
        "leaks": bool(len(flagged)),
        "t": t.tolist(),
    }
