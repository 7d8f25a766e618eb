"""Edits the structural passes share: new weights for a projection, new shape constants, clean-up after.

Initializers are never changed in place: exporters deduplicate equal tensors (every zero bias of a
randomly initialised model becomes one initializer) and share shape constants between layers, so an edit
for one block always writes new values and re-points only that block's nodes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

from redux_edge.ir.blocks import Linear
from redux_edge.ir.heads import ShapeSlot, const_array

__all__ = [
    "bypass",
    "copy_model",
    "finish",
    "head_columns",
    "new_initializer",
    "replace_linear",
    "replace_shape_slot",
]


def copy_model(model: ir.Model) -> ir.Model:
    """An independent deep copy, through the protobuf form."""
    return ir.from_proto(ir.to_proto(model))


def new_initializer(graph: ir.Graph, array: np.ndarray, hint: str) -> ir.Value:
    names = set(graph.initializers)
    name, suffix = hint, 0
    while name in names:
        suffix += 1
        name = f"{hint}_{suffix}"
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(value)
    return value


def replace_linear(graph: ir.Graph, linear: Linear, weight: np.ndarray, bias: np.ndarray | None) -> None:
    """Point the projection at new weight [in, out] and bias initializers."""
    base = linear.matmul.name or "linear"
    linear.matmul.replace_input_with(
        1, new_initializer(graph, weight.astype(linear.weight.dtype), f"{base}.weight")
    )
    if linear.bias_add is not None and bias is not None:
        index = 0 if const_array(linear.bias_add.inputs[0]) is not None else 1
        linear.bias_add.replace_input_with(index, new_initializer(graph, bias, f"{base}.bias"))
    linear.weight, linear.bias = weight, bias


def replace_shape_slot(graph: ir.Graph, slot: ShapeSlot, value: int) -> None:
    """Give one Reshape a target shape whose element ``slot.position`` is ``value``."""
    hint = f"{slot.reshape.name}.shape"
    if slot.concat is None:
        array = _constant(slot.reshape.inputs[1])
        array[slot.position] = value
        slot.reshape.replace_input_with(1, new_initializer(graph, array, hint))
        return
    pieces = list(slot.concat.inputs)
    piece = _constant(pieces[slot.piece])
    piece.reshape(-1)[slot.position - slot.offset] = value
    pieces[slot.piece] = new_initializer(graph, piece, hint)
    concat = ir.node("Concat", pieces, {"axis": 0}, name=f"{slot.reshape.name}_shape")
    graph.insert_before(slot.reshape, concat)
    slot.reshape.replace_input_with(1, concat.outputs[0])


def finish(model: ir.Model) -> None:
    """Drop what the edits left unused and infer intermediate shapes afresh: a value annotated
    [batch, seq, 12, 32] before pruning would contradict the graph, and the next pass matches on shapes."""
    RemoveUnusedNodesPass()(model)
    graph_values = {*model.graph.inputs, *model.graph.outputs}
    for node in model.graph:
        for output in node.outputs:
            if output not in graph_values:
                output.shape = None
    ShapeInferencePass()(model)


def head_columns(heads: list[int], head_dim: int) -> np.ndarray:
    """The feature indices of ``heads`` in a [.., heads * head_dim] projection."""
    return (np.asarray(heads, dtype=np.int64)[:, None] * head_dim + np.arange(head_dim)).reshape(-1)


def bypass(graph: ir.Graph, exit_value: ir.Value, entry: ir.Value) -> None:
    """Use ``entry`` wherever ``exit_value`` was used; a graph output keeps its name through an Identity."""
    if exit_value.is_graph_output():
        name = exit_value.name
        exit_value.name = f"{name}_dropped"
        identity = ir.node("Identity", [entry], name=f"{name}_passthrough")
        identity.outputs[0].name = name
        if exit_value.dtype is not None:
            identity.outputs[0].dtype = exit_value.dtype
        identity.outputs[0].shape = exit_value.shape
        graph.append(identity)
        entry = identity.outputs[0]
    ir.convenience.replace_all_uses_with(exit_value, entry, replace_graph_outputs=True)


def _constant(value: ir.Value | None) -> np.ndarray:
    """A copy of the constant ``value``, which the matched block guarantees."""
    array = const_array(value)
    if array is None:
        raise ValueError(f"{value} is not a constant")
    return array.copy()
