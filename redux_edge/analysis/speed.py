"""Latency of artifacts compared in one process: the same inputs and threads, calls in alternating blocks.

Blocks of consecutive calls, in forward then reverse order, as ``tools/bench.py`` measures: interleaving
one call at a time would let each ONNX Runtime session's spinning threads slow the other's calls, and a
slow phase of a shared machine lands on every artifact rather than on one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir

from redux_edge.frontend.source import Source, fit_inputs
from redux_edge.interfaces import Feeds

__all__ = ["BLOCKS", "CALLS", "alternating_p50", "timing_feeds"]

BLOCKS, CALLS = 4, 10


def timing_feeds(model: ir.Model, source: Source) -> Feeds:
    """Real inputs at the model's static shape where it has one, else batch 1 (text: sequence 128)."""
    text = source.preprocessor is not None and source.preprocessor.kind == "text"
    shapes = {}
    for value in model.graph.inputs:
        name, sample = str(value.name), source.inputs[str(value.name)]
        shapes[name] = [
            dim if isinstance(dim, int) else 1 if axis == 0 else 128 if text else sample.shape[axis]
            for axis, dim in enumerate(value.shape or sample.shape)
        ]
    return fit_inputs({name: array[: shapes[name][0]] for name, array in source.inputs.items()}, shapes)


def alternating_p50(runs: Mapping[str, Callable[[Feeds], object]], feeds: Feeds) -> dict[str, float]:
    """The p50 latency in milliseconds of each ``run`` on ``feeds``, ``BLOCKS`` x ``CALLS`` calls each."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for block in range(BLOCKS):
        for name in list(runs)[:: 1 if block % 2 == 0 else -1]:
            run_once = runs[name]
            run_once(feeds)
            for _ in range(CALLS):
                started = time.perf_counter()
                run_once(feeds)
                seconds[name].append(time.perf_counter() - started)
    return {name: float(np.median(values) * 1000.0) for name, values in seconds.items()}
