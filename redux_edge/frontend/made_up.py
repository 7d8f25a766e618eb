"""Made-up inputs for a model that came without any: plausible values, and a record of what was filled.

Without ``--inputs`` an ONNX file is verified on inputs drawn from its signature. They should be inputs
the model is meant for, or the verification says little: a text detector checked on a 1x1 image, a
decoder on token id 1, an attention mask full of holes. So:

- token ids (an integer input that indexes a constant table through ``Gather``) are drawn over the rows
  that table holds; masks (inputs named ``*mask*``, and boolean inputs) are all ones; other integers are
  small non-negative numbers (valid indices for almost any model); floats are standard normal;
- a dimension without a size (a name, ``?``, ``-1``) takes ``--shapes``, else: 2 for the batch (a name
  that is some input's first axis), 224 for the height and width of an image (a 4-D float input with 1 or
  3 channels), 16 for any other (a sequence, a feature axis).

Every fill is described, and the compile report prints it beside the verification.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from redux_edge.errors import UserError

__all__ = ["BATCH", "IMAGE_SIDE", "OTHER", "made_up_inputs"]

BATCH, IMAGE_SIDE, OTHER = 2, 224, 16


def made_up_inputs(
    model: ir.Model, shapes: dict[str, list[int]], check_size
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Feeds for every graph input and one phrase per input saying what it holds. ``check_size(name,
    shape, dtype)`` refuses a shape too large to hold, before it is allocated."""
    rng = np.random.default_rng(0)
    names = [str(value.name) for value in model.graph.inputs]
    if unknown := set(shapes) - set(names):
        raise UserError(f"--shapes names unknown inputs {sorted(unknown)}", f"the model's inputs are {names}")
    batch_names = {
        str(value.shape[0]) for value in model.graph.inputs if value.shape and _symbolic(value.shape[0])
    }
    feeds: dict[str, np.ndarray] = {}
    filled: list[str] = []
    for value in model.graph.inputs:
        name = str(value.name)
        dtype = np.dtype(value.dtype.numpy()) if value.dtype is not None else np.dtype(np.float32)
        shape = tuple(shapes[name]) if name in shapes else _sizes(value, dtype, batch_names)
        check_size(name, shape, dtype)
        array, holds = _values(value, shape, dtype, rng)
        feeds[name] = array
        filled.append(f"{name} {list(shape)} {holds}")
    return feeds, filled


def _symbolic(dim: object) -> bool:
    return not isinstance(dim, int) or dim < 1


def _sizes(value: ir.Value, dtype: np.dtype, batch_names: set[str]) -> tuple[int, ...]:
    dims = list(value.shape or ())
    image = len(dims) == 4 and dtype.kind == "f" and dims[1] in (1, 3)
    sizes = []
    for axis, dim in enumerate(dims):
        if isinstance(dim, int) and dim >= 1:
            sizes.append(dim)
        elif axis == 0 or (isinstance(dim, ir.SymbolicDim) and dim.value and str(dim) in batch_names):
            sizes.append(BATCH)
        elif image and axis in (2, 3):
            sizes.append(IMAGE_SIDE)
        else:
            sizes.append(OTHER)
    return tuple(sizes)


def _values(
    value: ir.Value, shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator
) -> tuple[np.ndarray, str]:
    if "mask" in str(value.name).lower() or dtype.kind == "b":
        return np.ones(shape, dtype), "ones"
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype), "standard normal"
    rows = _table_rows(value)
    if rows is not None:
        return rng.integers(0, rows, shape).astype(dtype), f"ids in 0..{rows - 1} (its table's rows)"
    return rng.integers(0, 2, shape).astype(dtype), "0 or 1"


def _table_rows(value: ir.Value) -> int | None:
    """The rows of the constant table an input indexes through Gather (a vocabulary, a position table)."""
    for node, index in value.uses():
        table = node.inputs[0] if node.op_type == "Gather" and index == 1 else None
        if table is not None and table.const_value is not None and table.shape:
            axis = node.attributes.get_int("axis", 0)
            rows = table.shape[axis]
            return int(rows) if isinstance(rows, int) else None
    return None
