"""Analyses that choose and judge compression: unit importance, exact references, task quality."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

__all__ = ["in_memory_runner"]


def in_memory_runner(model: ir.Model) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    """``run(feeds) -> outputs`` of ``model`` under ONNX Runtime (CPU), without writing a file."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return lambda feeds: session.run(None, feeds)
