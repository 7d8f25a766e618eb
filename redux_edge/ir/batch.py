"""Which axis of a model's inputs and outputs holds the batch, for cutting samples and static batches.

The batch is the named dimension at axis 0 of the first input that has one; every input and output holds
it where that name appears (a recurrent state ``[layers, batch, width]`` at axis 1), and a scalar or an
input without that name has none. A model whose dimensions are all fixed has no batch to cut: its
inputs are taken whole. An output whose dimensions were not named after the input's holds it at axis 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

__all__ = ["Batches"]


@dataclass(frozen=True)
class Batches:
    axes: dict[str, int | None]

    @classmethod
    def of(cls, model: ir.Model) -> Batches:
        symbol = next(
            (
                str(value.shape[0])
                for value in model.graph.inputs
                if value.shape and not isinstance(value.shape[0], int) and value.shape[0].value
            ),
            None,
        )
        axes: dict[str, int | None] = {}
        for value in model.graph.inputs:
            axes[str(value.name)] = _axis_of(value, symbol)
        for value in model.graph.outputs:
            rank = len(value.shape) if value.shape is not None else 1
            found = _axis_of(value, symbol)
            axes[str(value.name)] = found if found is not None or symbol is None or not rank else 0
        return cls(axes)

    def size(self, shapes: dict[str, list[int]]) -> int | None:
        """The batch size of inputs of ``shapes``; None when no input has a batch axis."""
        for name, shape in shapes.items():
            axis = self.axes.get(name)
            if axis is not None and axis < len(shape):
                return int(shape[axis])
        return None

    def first(self, name: str, array: np.ndarray, count: int | None) -> np.ndarray:
        """The first ``count`` samples of ``array`` along its batch axis (all of it when it has none)."""
        axis = self.axes.get(name)
        if count is None or axis is None or axis >= array.ndim:
            return array
        return np.take(array, range(min(count, array.shape[axis])), axis=axis)

    def take(self, feeds: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
        cut = {}
        for name, array in feeds.items():
            axis = self.axes.get(name)
            cut[name] = array if axis is None else np.take(array, range(start, stop), axis=axis)
        return cut

    def join(self, name: str, parts: tuple[np.ndarray, ...]) -> np.ndarray:
        """One output from its per-batch parts: along its batch axis, or the first part for an output
        that holds no batch (the same for every batch of a static-shape run)."""
        axis = self.axes.get(name)
        return parts[0] if axis is None else np.concatenate(parts, axis=axis)


def _axis_of(value: ir.Value, symbol: str | None) -> int | None:
    if symbol is None:
        return None
    return next((axis for axis, dim in enumerate(value.shape or ()) if str(dim) == symbol), None)
