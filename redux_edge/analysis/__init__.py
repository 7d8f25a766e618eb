"""Analyses that choose and judge compression: unit importance, exact references, task quality."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from redux_edge.errors import UserError

__all__ = ["in_memory_runner"]


def in_memory_runner(model: ir.Model) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    """``run(feeds) -> outputs`` of ``model`` under ONNX Runtime (CPU), without writing a file.

    A model exported with a static batch (a user's ONNX file fixed at batch 1, say) takes any number of
    rows: the analyses feed calibration and evaluation sets whole, so the runner slices them to the
    model's batch and joins the outputs.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    batch = _static_batch(model)
    if batch is None:
        return lambda feeds: session.run(None, feeds)
    return lambda feeds: _in_batches_of(batch, lambda chunk: session.run(None, chunk), feeds)


def _static_batch(model: ir.Model) -> int | None:
    """The batch every input fixes, or None where the first axis is free (or the inputs disagree)."""
    sizes = set()
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue  # an initializer listed as an input (IR version < 4) is not fed
        if value.shape is None or len(value.shape) == 0 or not isinstance(value.shape[0], int):
            return None
        sizes.add(value.shape[0])
    return sizes.pop() if len(sizes) == 1 else None


def _in_batches_of(
    batch: int, run: Callable[[dict[str, np.ndarray]], list[np.ndarray]], feeds: dict[str, np.ndarray]
) -> list[np.ndarray]:
    rows = len(next(iter(feeds.values())))
    if rows == batch:
        return run(feeds)
    parts = []
    for start in range(0, rows, batch):
        chunk = {name: value[start : start + batch] for name, value in feeds.items()}
        taken = min(batch, rows - start)
        if taken < batch:  # the last slice: padded with copies of its final row, whose outputs are cut off
            chunk = {
                name: np.concatenate([value, np.repeat(value[-1:], batch - taken, axis=0)])
                for name, value in chunk.items()
            }
        outputs = run(chunk)
        if any(output.ndim == 0 or output.shape[0] != batch for output in outputs):
            raise UserError(
                f"the model is fixed at batch {batch} and one of its outputs has no batch axis, so "
                f"{rows} rows cannot be run through it in slices",
                "export the model with a dynamic batch axis, or give data of exactly that batch",
            )
        parts.append([output[:taken] for output in outputs])
    return [np.concatenate(column) for column in zip(*parts, strict=True)]
