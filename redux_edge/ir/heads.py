"""Where the attention heads are: the head count and head size followed as factors through the reshapes and
transposes between a projection and the attention MatMuls, whatever layout the exporter chose.

Exporters write one attention in many ways. torch dynamo with dynamic shapes splits the heads with a shape
built at run time; with static shapes it folds batch and heads into one axis around the key's transpose
([2, 4, 16, 16] -> [8, 16, 16] -> [2, 4, 16, 16], every shape a constant); the TorchScript exporter reads
sizes back with Shape and assembles shapes with Concat. Rather than one node sequence per exporter, a head
factor is tracked in the tensor's flattened (row-major) index as ``extent`` values ``stride`` apart: a
Reshape keeps every factor's stride, a Transpose moves it. Concrete dims come from ONNX shape inference with
data propagation on the graph with its symbolic input dims set to distinct small numbers.

At every Reshape on the way, the target-shape element that holds the heads is recorded when it is a
constant (alone, or a constant piece of a Concat), so that pruning can rescale it; an inferred (-1) or copied
(0) element, or one read from a tensor's shape at run time, follows the pruned tensor by itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

__all__ = [
    "Factor",
    "HeadLayout",
    "ShapeSlot",
    "Shapes",
    "Unmatched",
    "concrete_shapes",
    "const_array",
    "input_of",
    "merge_heads",
    "split_heads",
]

Shapes = dict[ir.Value, tuple[int, ...]]
# Ops that move or scale a head factor without mixing heads; anything else on the path is not followed.
FOLLOWED = frozenset({"Transpose", "Reshape", "Mul", "Div", "Cast", "Identity"})
# How a target-shape element can be read from a tensor's shape at run time (so it follows pruning).
_SHAPE_READING = frozenset({"Shape", "Gather", "Unsqueeze", "Squeeze", "Cast", "Slice", "Concat", "Identity"})
# Distinct sizes for symbolic input dims, so that no two unrelated dims look alike.
_PROBE_SIZES = (3, 5, 7, 11, 13, 17, 19, 23)
_KEPT_INITIALIZER_BYTES = 1024


class Unmatched(Exception):
    """A block the passes cannot follow: which node, and why."""

    def __init__(self, node: ir.Node, reason: str) -> None:
        super().__init__(f"node '{node.name}' ({node.op_type}): {reason}")
        self.node = node


def input_of(node: ir.Node, index: int) -> ir.Value:
    """Input ``index`` of ``node``, which every op the blocks are matched through has."""
    value = node.inputs[index]
    if value is None:
        raise Unmatched(node, f"input {index} is omitted")
    return value


def const_array(value: ir.Value | None) -> np.ndarray | None:
    # TorchScript exports pass shared parameters through Identity nodes; the cleanup pass folds them.
    while value is not None and (producer := value.producer()) is not None and producer.op_type == "Identity":
        value = producer.inputs[0]
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


@contextmanager
def _probe_inputs(model: ir.Model) -> Iterator[None]:
    """The graph inputs with concrete dims, and big initializers detached (shape inference needs their
    shapes, not their data); restored afterwards."""
    original_shapes = [value.shape for value in model.graph.inputs]
    sizes: dict[object, int] = {}
    for value in model.graph.inputs:
        if value.shape is not None:
            dims = [
                dim
                if isinstance(dim, int)
                else sizes.setdefault(dim.value or id(dim), _probe_size(len(sizes)))
                for dim in value.shape
            ]
            value.shape = ir.Shape(dims)
    tensors = {
        value: value.const_value
        for value in model.graph.initializers.values()
        if value.const_value is not None and value.const_value.nbytes > _KEPT_INITIALIZER_BYTES
    }
    for value, tensor in tensors.items():
        value.shape, value.dtype = ir.Shape([int(dim) for dim in tensor.shape.numpy()]), tensor.dtype
        model.graph.initializers.pop(str(value.name))
        value.const_value = None
        if value not in model.graph.inputs:
            model.graph.inputs.append(value)
    try:
        yield
    finally:
        # clear() and extend(), not del: the graph's input list keeps each value's graph-input mark.
        inputs = list(model.graph.inputs[: len(original_shapes)])
        model.graph.inputs.clear()
        model.graph.inputs.extend(inputs)
        for value, shape in zip(model.graph.inputs, original_shapes, strict=True):
            value.shape = shape
        for value, tensor in tensors.items():
            value.const_value = tensor
            model.graph.register_initializer(value)


def _probe_size(index: int) -> int:
    return _PROBE_SIZES[index] if index < len(_PROBE_SIZES) else _PROBE_SIZES[-1] + 2 * index


def concrete_shapes(model: ir.Model) -> Shapes:
    """Concrete dims of every value shape inference can size, with symbolic input dims set to distinct
    small numbers. Values left unknown are absent."""
    with _probe_inputs(model):
        proto = ir.serde.serialize_model(model)
        values = ir.convenience.create_value_mapping(model.graph)
    try:
        inferred = onnx.shape_inference.infer_shapes(
            proto, check_type=False, strict_mode=False, data_prop=True
        )
    except onnx.shape_inference.InferenceError:
        return {}
    shapes: Shapes = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor_type = info.type.tensor_type
        if info.name in values and tensor_type.HasField("shape"):
            dims = tensor_type.shape.dim
            if all(dim.HasField("dim_value") for dim in dims):
                shapes[values[info.name]] = tuple(dim.dim_value for dim in dims)
    for value in values.values():
        if value not in shapes and (array := const_array(value)) is not None:
            shapes[value] = tuple(array.shape)
    return shapes


@dataclass(frozen=True)
class Factor:
    """A factor of a tensor's flattened index: ``extent`` values, ``stride`` apart."""

    stride: int
    extent: int


def _strides(dims: Sequence[int]) -> list[int]:
    """Row-major stride of every axis."""
    return [math.prod(dims[axis + 1 :]) for axis in range(len(dims))]


def _axis_of(dims: Sequence[int], factor: Factor) -> int | None:
    """The axis that holds ``factor`` whole; None where it is spread over several axes."""
    for axis, stride in enumerate(_strides(dims)):
        span = stride * dims[axis]
        if factor.stride % stride == 0 and span % (factor.stride * factor.extent) == 0:
            return axis
    return None


@dataclass
class ShapeSlot:
    """One element of a Reshape's target shape that holds the head count (alone or times other dims), and
    where it is set: a constant shape, or a constant piece of a Concat that builds the shape at run time."""

    reshape: ir.Node
    position: int
    value: int
    concat: ir.Node | None = None
    piece: int = 0
    offset: int = 0


def _static_length(value: ir.Value, shapes: Shapes) -> int | None:
    array = const_array(value)
    if array is not None:
        return int(array.size)
    if value.shape is not None and len(value.shape) == 1 and isinstance(value.shape[0], int):
        return value.shape[0]
    inferred = shapes.get(value)
    return inferred[0] if inferred is not None and len(inferred) == 1 else None


def _reads_shape_at_run_time(value: ir.Value, limit: int = 16) -> bool:
    """Whether ``value`` is a tensor's dims read at run time (Shape, Gather, Concat, ...), no arithmetic."""
    stack, seen = [value], 0
    while stack and seen < limit:
        current = stack.pop()
        if const_array(current) is not None:
            continue
        producer = current.producer()
        if producer is None or producer.op_type not in _SHAPE_READING:
            return False
        seen += 1
        if producer.op_type != "Shape":
            stack.extend(v for v in producer.inputs if v is not None)
    return not stack


def _shape_slot(reshape: ir.Node, position: int, shapes: Shapes) -> ShapeSlot | None:
    """Where element ``position`` of the Reshape's target shape is set; None where it follows by itself."""
    shape = input_of(reshape, 1)
    copies_zero = not reshape.attributes.get_int("allowzero", 0)
    array = const_array(shape)
    if array is not None:
        value = int(array[position])
        return None if value == -1 or (value == 0 and copies_zero) else ShapeSlot(reshape, position, value)
    producer = shape.producer()
    if producer is None or producer.op_type != "Concat":
        if _reads_shape_at_run_time(shape):
            return None
        raise Unmatched(reshape, "its target shape is computed at run time, not from constant pieces")
    offset = 0
    for index in range(len(producer.inputs)):
        piece = input_of(producer, index)
        length = _static_length(piece, shapes)
        if length is None:
            raise Unmatched(reshape, f"piece {index} of its target shape has no static length")
        if offset <= position < offset + length:
            array = const_array(piece)
            if array is None:
                if _reads_shape_at_run_time(piece):
                    return None
                raise Unmatched(reshape, f"element {position} of its target shape is computed at run time")
            value = int(array.reshape(-1)[position - offset])
            if value == -1 or (value == 0 and copies_zero):
                return None
            return ShapeSlot(reshape, position, value, producer, index, offset)
        offset += length
    raise Unmatched(reshape, f"its target shape has no element {position}")


def _dims(value: ir.Value, node: ir.Node, shapes: Shapes) -> tuple[int, ...]:
    dims = shapes.get(value)
    if dims is None:
        raise Unmatched(node, f"the shape of {value.name} cannot be inferred")
    return dims


def _follow(
    node: ir.Node, factors: list[Factor], shapes: Shapes, slots: list[ShapeSlot], tracked: Factor | None
) -> list[Factor]:
    """The factors after ``node``; the Reshape element holding ``tracked`` is added to ``slots``."""
    if node.op_type == "Transpose":
        before = _dims(input_of(node, 0), node, shapes)
        after = _dims(node.outputs[0], node, shapes)
        perm = list(node.attributes.get_ints("perm", list(range(len(before)))[::-1]))
        moved = []
        for factor in factors:
            axis = _axis_of(before, factor)
            if axis is None:
                raise Unmatched(node, "it transposes heads that are spread over several axes")
            inner = factor.stride // _strides(before)[axis]
            moved.append(Factor(_strides(after)[perm.index(axis)] * inner, factor.extent))
        return moved
    if node.op_type == "Reshape" and tracked is not None:
        after = _dims(node.outputs[0], node, shapes)
        axis = _axis_of(after, tracked)
        if axis is None:
            raise Unmatched(node, "it spreads the heads over several axes")
        slot = _shape_slot(node, axis, shapes)
        if slot is not None:
            if slot.value != after[axis]:
                raise Unmatched(
                    node, f"its shape element {axis} is {slot.value}, shape inference says {after[axis]}"
                )
            slots.append(slot)
    return factors


@dataclass
class HeadLayout:
    """A projection's heads where they reach an attention MatMul: the split, the factors, the slots."""

    split: ir.Node
    heads: int
    head_dim: int
    head_factor: Factor
    head_dim_factor: Factor
    slots: list[ShapeSlot]

    def batch_position(self, dims: Sequence[int]) -> tuple[int, int]:
        """(axis from the end, stride inside the axis) of the heads in a MatMul operand's batch axes."""
        if self.heads == 1:
            return 0, 0  # a single head (left by pruning) is on no axis in particular
        axis = _axis_of(dims, self.head_factor)
        if axis is None or axis >= len(dims) - 2:
            raise Unmatched(self.split, "the heads do not reach the attention MatMul as a batch axis")
        return axis - len(dims), self.head_factor.stride // _strides(dims)[axis]


def split_heads(chain: list[ir.Node], width: int, shapes: Shapes, role: str, anchor: ir.Node) -> HeadLayout:
    """Follow a projection's output of ``width`` features through ``chain`` (its nodes up to the attention
    MatMul, in order): the first Reshape that cuts the width in two is the head split."""
    width_factor = Factor(1, width)
    slots: list[ShapeSlot] = []
    for index, node in enumerate(chain):
        if node.op_type == "Reshape":
            after = _dims(node.outputs[0], node, shapes)
            if _axis_of(after, width_factor) is None:
                return _after_split(chain, index, after, width_factor, shapes, slots, role)
        factors = _follow(node, [width_factor], shapes, slots, width_factor)
        width_factor = factors[0]
    # No Reshape cuts the width: one head (what pruning leaves of a layer at least), as wide as the width.
    return HeadLayout(anchor, 1, width, Factor(width_factor.stride * width, 1), width_factor, slots)


def _after_split(
    chain: list[ir.Node],
    index: int,
    dims: tuple[int, ...],
    width: Factor,
    shapes: Shapes,
    slots: list[ShapeSlot],
    role: str,
) -> HeadLayout:
    split = chain[index]
    strides = _strides(dims)
    inner = [axis for axis, stride in enumerate(strides) if stride == width.stride]
    if (
        not inner
        or inner[0] == 0
        or strides[inner[0] - 1] * dims[inner[0] - 1] != width.stride * width.extent
    ):
        raise Unmatched(split, f"it does not cut the {role} projection into [heads, head size]")
    axis = inner[0] - 1
    heads, head_dim = dims[axis], dims[axis + 1]
    head, size = Factor(width.stride * head_dim, heads), Factor(width.stride, head_dim)
    if (slot := _shape_slot(split, axis, shapes)) is not None:
        slots.append(slot)
    for node in chain[index + 1 :]:
        head, size = _follow(node, [head, size], shapes, slots, head)
    return HeadLayout(split, heads, head_dim, head, size, slots)


def merge_heads(
    chain: list[ir.Node], context: ir.Node, layout: HeadLayout, shapes: Shapes
) -> list[ShapeSlot]:
    """Follow the heads from the context MatMul's output through ``chain`` to the output projection, which
    must see them merged into its last axis as [heads, head size]; the Reshape slots on the way."""
    dims = _dims(context.outputs[0], context, shapes)
    value_dims = _dims(input_of(context, 1), context, shapes)
    if dims[-1] != layout.head_dim:
        raise Unmatched(context, "its output's last axis is not the head size")
    size = Factor(1, layout.head_dim)
    slots: list[ShapeSlot] = []
    if layout.heads == 1:
        for node in chain:
            (size,) = _follow(node, [size], shapes, slots, None)
        head = Factor(layout.head_dim, 1)
    else:
        from_end, inner = layout.batch_position(value_dims)
        head = Factor(_strides(dims)[len(dims) + from_end] * inner, layout.heads)
        for node in chain:
            head, size = _follow(node, [head, size], shapes, slots, head)
    last = chain[-1] if chain else context
    merged_width = _dims(last.outputs[0], last, shapes)[-1]
    expected = (Factor(layout.head_dim, layout.heads), Factor(1, layout.head_dim))
    if (head, size) != expected or merged_width != layout.heads * layout.head_dim:
        raise Unmatched(last, "it does not merge the heads into the last axis as [heads, head size]")
    return slots
