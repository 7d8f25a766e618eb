"""Transformer blocks found in an ONNX graph by following its values: attention, feed-forward, layers.

Follows the BERT-family layer (Vaswani et al., 2017; Devlin et al., 2019) as exporters write it in ONNX:
Q/K/V projections (MatMul with a constant weight, optional bias Add) -> reshape to [batch, seq, heads,
head_dim] -> scores MatMul -> scale, mask, Softmax -> context MatMul with V -> merge heads -> output
projection -> residual Add (-> LayerNormalization in post-LN models); the feed-forward block is a projection,
an elementwise activation and a projection back, with its own residual Add. Matching anchors on Softmax and
follows dataflow, not node names, so it finds the blocks of torch dynamo exports of our zoo and of Hugging
Face BertModel, DistilBert and Roberta alike. An attention-like Softmax that cannot be followed is reported
with its node and the reason; the structural passes then change nothing.

Without attention, the removable blocks are CNN residual blocks (an Add of a value and a branch computed
from it alone, equal shapes). Layers are numbered once, in graph order, and the number is written into
node metadata (``redux_edge.layer``), so that a plan's layer indices keep meaning the original layers
after others were dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

__all__ = [
    "AttentionBlock",
    "FeedForwardBlock",
    "Layer",
    "Linear",
    "ShapeSlot",
    "Structure",
    "Unmatched",
    "find_structure",
    "number_layers",
]

LAYER_KEY = "redux_edge.layer"
_ELEMENTWISE = frozenset(
    {"Gelu", "Relu", "Erf", "Mul", "Add", "Div", "Sub", "Sigmoid", "Tanh", "Pow", "Sqrt", "Neg", "Softplus"}
    | {"Elu", "LeakyRelu", "Clip", "HardSigmoid", "HardSwish", "Mish", "FastGelu", "QuickGelu"}
)
# Ops between a head-split reshape and the scores/context MatMul that do not change which head is where.
_HEAD_PATH = frozenset({"Transpose", "Reshape", "Mul", "Div", "Cast", "Identity"})
# Ops between the scores MatMul, Softmax and the context MatMul: scaling, masking, NaN guards.
_SCORE_PATH = frozenset({"Add", "Div", "Mul", "Where", "Cast", "Sub", "IsNaN", "Identity", "Dropout"})


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
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _is_scalar_const(value: ir.Value | None) -> bool:
    array = const_array(value)
    return array is not None and array.size == 1


@dataclass
class Linear:
    """``x @ weight (+ bias)`` with a constant weight [in, out], possibly stored transposed."""

    matmul: ir.Node
    weight: np.ndarray
    bias_add: ir.Node | None
    bias: np.ndarray | None

    @property
    def output(self) -> ir.Value:
        return (self.bias_add or self.matmul).outputs[0]

    @property
    def input(self) -> ir.Value:
        return input_of(self.matmul, 0)


def _weight(value: ir.Value | None) -> np.ndarray | None:
    array = const_array(value)
    if array is not None:
        return array if array.ndim == 2 else None
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type == "Transpose":
        inner = const_array(producer.inputs[0])
        perm = producer.attributes.get_ints("perm", [1, 0])
        if inner is not None and inner.ndim == 2 and list(perm) == [1, 0]:
            return inner.T
    return None


def _linear_ending_at(value: ir.Value | None) -> Linear | None:
    """The Linear whose output is ``value``, if ``value`` is one."""
    producer = value.producer() if value is not None else None
    if producer is None:
        return None
    bias_add = bias = None
    if producer.op_type == "Add":
        for index in (0, 1):
            array = const_array(producer.inputs[index])
            if array is not None and array.ndim == 1:
                bias_add, bias = producer, array
                producer = input_of(producer, 1 - index).producer()
                break
        else:
            return None
    if producer is None or producer.op_type != "MatMul" or const_array(producer.inputs[0]) is not None:
        return None
    weight = _weight(producer.inputs[1])
    if weight is None or (bias is not None and bias.shape[0] != weight.shape[1]):
        return None
    return Linear(producer, weight, bias_add, bias)


def _linear_starting_at(value: ir.Value) -> Linear | None:
    """The one Linear that consumes ``value`` as its data input."""
    consumers = value.consumers()
    if len(consumers) != 1 or consumers[0].op_type != "MatMul" or consumers[0].inputs[0] is not value:
        return None
    matmul = consumers[0]
    after = matmul.outputs[0].consumers()
    if len(after) == 1 and after[0].op_type == "Add":
        linear = _linear_ending_at(after[0].outputs[0])
        if linear is not None and linear.matmul is matmul:
            return linear
    weight = _weight(matmul.inputs[1])
    return None if weight is None else Linear(matmul, weight, None, None)


@dataclass
class ShapeSlot:
    """One element of a Reshape's shape input that holds a head count or width, and where it comes from:
    a constant shape, or a constant piece of a Concat that builds the shape at run time."""

    reshape: ir.Node
    position: int
    value: int
    concat: ir.Node | None = None
    piece: int = 0
    offset: int = 0


def _shape_slot(reshape: ir.Node, position: int) -> ShapeSlot | None:
    """Where element ``position`` of the Reshape's target shape is set; None where it is -1 (inferred)."""
    shape = input_of(reshape, 1)
    if position < 0:
        length = _static_length(shape)
        if length is None:
            raise Unmatched(reshape, "its target shape has no static length")
        position += length
    array = const_array(shape)
    if array is not None:
        return None if array[position] == -1 else ShapeSlot(reshape, position, int(array[position]))
    producer = shape.producer()
    if producer is None or producer.op_type != "Concat":
        raise Unmatched(reshape, "its target shape is computed at run time, not from constant pieces")
    offset = 0
    for index in range(len(producer.inputs)):
        length = _static_length(input_of(producer, index))
        if length is None:
            raise Unmatched(reshape, f"piece {index} of its target shape has no static length")
        if offset <= position < offset + length:
            array = const_array(input_of(producer, index))
            if array is None:
                raise Unmatched(reshape, f"element {position} of its target shape is computed at run time")
            value = int(array.reshape(-1)[position - offset])
            return None if value == -1 else ShapeSlot(reshape, position, value, producer, index, offset)
        offset += length
    raise Unmatched(reshape, f"its target shape has no element {position}")


def _static_length(value: ir.Value) -> int | None:
    array = const_array(value)
    if array is not None:
        return int(array.size)
    if value.shape is not None and len(value.shape) == 1 and isinstance(value.shape[0], int):
        return value.shape[0]
    return None


@dataclass
class AttentionBlock:
    query: Linear
    key: Linear
    value: Linear
    output: Linear
    heads: int
    head_dim: int
    context: ir.Node
    head_slots: list[ShapeSlot]
    width_slots: list[ShapeSlot]
    entry: ir.Value | None
    residual: ir.Node | None
    layer: int = -1


@dataclass
class FeedForwardBlock:
    up: Linear
    down: Linear
    activation: list[ir.Node]
    entry: ir.Value | None
    residual: ir.Node | None
    layer: int = -1

    @property
    def width(self) -> int:
        return self.up.weight.shape[1]


@dataclass
class Layer:
    """A removable block: a transformer layer (attention + feed-forward), or a CNN residual block
    ``exit = act(entry + f(entry))`` whose blocks are then None."""

    index: int
    attention: AttentionBlock | None
    feed_forward: FeedForwardBlock | None
    entry: ir.Value
    exit: ir.Value


@dataclass
class Structure:
    attention: list[AttentionBlock] = field(default_factory=list)
    feed_forward: list[FeedForwardBlock] = field(default_factory=list)
    layers: list[Layer] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """Heads and feed-forward width per (original) layer: what ``inspect`` shows."""
        heads = {str(block.layer): block.heads for block in self.attention}
        widths = {str(block.layer): block.width for block in self.feed_forward}
        return {
            "layers": len(self.layers) or len(self.attention),
            "heads_per_layer": heads,
            "ffn_width_per_layer": widths,
        }


def _walk(value: ir.Value, allowed: frozenset[str], limit: int = 32) -> Iterator[ir.Node]:
    """Producers reachable backwards from ``value`` through ``allowed`` ops (non-constant inputs only)."""
    stack: list[ir.Node | None] = [value.producer()]
    seen: set[ir.Node] = set()
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        if node.op_type in allowed:
            stack.extend(v.producer() for v in node.inputs if v is not None and const_array(v) is None)


def _projection(value: ir.Value, anchor: ir.Node, role: str) -> tuple[Linear, ir.Node]:
    """The projection feeding one side of the attention, and the Reshape that splits it into heads."""
    node = value.producer()
    while node is not None and node.op_type in _HEAD_PATH:
        data = node.inputs[0]
        if node.op_type in ("Mul", "Div"):
            data, *scales = sorted(node.inputs, key=lambda v: const_array(v) is not None)
            if not all(_is_scalar_const(scale) for scale in scales):
                raise Unmatched(node, f"the {role} path is scaled by a non-scalar")
        if node.op_type == "Reshape":
            linear = _linear_ending_at(node.inputs[0])
            if linear is not None:
                return linear, node
            if const_array(node.inputs[1]) is not None:
                raise Unmatched(node, f"a constant reshape on the {role} path would not follow pruned heads")
        node = data.producer() if data is not None else None
    raise Unmatched(anchor, f"no projection with a constant weight feeds the {role} side")


def _head_geometry(split: ir.Node, width: int) -> tuple[int, int]:
    shape = split.outputs[0].shape
    if shape is None or len(shape) != 4:
        raise Unmatched(split, "the head split does not produce a 4-D [batch, seq, heads, head_dim] value")
    heads: int | ir.SymbolicDim | None = shape[2]
    head_dim: int | ir.SymbolicDim | None = shape[3]
    if not isinstance(head_dim, int):
        slot = _shape_slot(split, 3)
        head_dim = slot.value if slot else None
    if not isinstance(heads, int) and isinstance(head_dim, int):
        heads = width // head_dim
    if not isinstance(heads, int) or not isinstance(head_dim, int) or heads * head_dim != width:
        raise Unmatched(split, f"cannot tell heads and head size of a width-{width} projection")
    return heads, head_dim


def _match_attention(softmax: ir.Node) -> AttentionBlock:
    contexts = [
        node
        for node in _consumers_through(softmax.outputs[0], _SCORE_PATH)
        if node.op_type == "MatMul" and const_array(node.inputs[1]) is None
    ]
    if len(contexts) != 1:
        raise Unmatched(softmax, "its probabilities do not reach exactly one context MatMul")
    context = contexts[0]
    scores = [
        node
        for node in _walk(input_of(softmax, 0), _SCORE_PATH)
        if node.op_type == "MatMul" and all(const_array(v) is None for v in node.inputs)
    ]
    if not scores:
        raise Unmatched(softmax, "no scores MatMul (query x key) feeds it")
    query, query_split = _projection(input_of(scores[0], 0), scores[0], "query")
    key, key_split = _projection(input_of(scores[0], 1), scores[0], "key")
    value, value_split = _projection(input_of(context, 1), context, "value")
    width = query.weight.shape[1]
    if key.weight.shape[1] != width or value.weight.shape[1] != width:
        raise Unmatched(scores[0], "query, key and value projections differ in width")
    heads, head_dim = _head_geometry(query_split, width)
    merge = _single_consumer(context.outputs[0], "Transpose", context)
    merge = _single_consumer(merge.outputs[0], "Reshape", merge)
    output = _linear_starting_at(merge.outputs[0])
    if output is None or output.weight.shape[0] != width:
        raise Unmatched(merge, "the merged heads do not feed one output projection with a constant weight")
    head_slots = [
        slot for split in (query_split, key_split, value_split) if (slot := _shape_slot(split, 2)) is not None
    ]
    width_slots = [slot for slot in (_shape_slot(merge, -1),) if slot is not None]
    for slot in head_slots + width_slots:
        expected = heads if slot in head_slots else width
        if slot.value != expected:
            raise Unmatched(
                slot.reshape, f"its shape element {slot.position} is {slot.value}, not {expected}"
            )
    entry, residual = _residual(output.output)
    return AttentionBlock(
        query, key, value, output, heads, head_dim, context, head_slots, width_slots, entry, residual
    )


def _consumers_through(value: ir.Value, allowed: frozenset[str], limit: int = 12) -> list[ir.Node]:
    found: list[ir.Node] = []
    frontier, seen = [value], set[ir.Node]()
    while frontier and len(seen) < limit:
        for node in frontier.pop().consumers():
            if node in seen:
                continue
            seen.add(node)
            if node.op_type in allowed:
                frontier.extend(node.outputs)
            else:
                found.append(node)
    return found


def _single_consumer(value: ir.Value, op_type: str, after: ir.Node) -> ir.Node:
    consumers = value.consumers()
    if len(consumers) != 1 or consumers[0].op_type != op_type:
        raise Unmatched(after, f"its output should feed exactly one {op_type} (merging heads)")
    return consumers[0]


def _residual(value: ir.Value) -> tuple[ir.Value | None, ir.Node | None]:
    """The residual Add that ``value`` joins, and the stream it is added to."""
    for node in value.consumers():
        if node.op_type == "Add" and all(const_array(v) is None for v in node.inputs):
            other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
            return other, node
    return None, None


def _match_feed_forward(down_matmul: ir.Node) -> FeedForwardBlock | None:
    """The feed-forward block whose second projection is ``down_matmul``, or None if it is not one."""
    down = _linear_starting_at(input_of(down_matmul, 0))
    if down is None or down.matmul is not down_matmul:
        return None
    region: list[ir.Node] = []
    up, stack = None, [input_of(down_matmul, 0).producer()]
    while stack:
        node = stack.pop()
        if node is None or node.op_type not in _ELEMENTWISE or len(region) > 24:
            return None
        if node in region:
            continue
        region.append(node)
        for value in node.inputs:
            if value is None or _is_scalar_const(value):
                continue
            linear = _linear_ending_at(value)
            if linear is not None and (up is None or up.output is value):
                up = linear
            else:
                stack.append(value.producer())
    if up is None or up.weight.shape[1] != down.weight.shape[0]:
        return None
    inside = set(region) | {down_matmul}
    if any(user not in inside for node in [up.bias_add or up.matmul, *region] for user in _users(node)):
        return None
    entry, residual = _residual(down.output)
    return FeedForwardBlock(up, down, region, entry, residual)


def _users(node: ir.Node) -> list[ir.Node]:
    return [user for output in node.outputs for user in output.consumers()]


def _layer_index(block: AttentionBlock | FeedForwardBlock, position: int) -> int:
    anchor = block.output.matmul if isinstance(block, AttentionBlock) else block.down.matmul
    return int(anchor.metadata_props.get(LAYER_KEY, position))


def find_structure(model: ir.Model) -> Structure:
    """Every attention and feed-forward block of the main graph, paired into layers where they alternate."""
    structure = Structure()
    order = {node: index for index, node in enumerate(model.graph)}
    for node in model.graph:
        if node.op_type == "Softmax":
            try:
                structure.attention.append(_match_attention(node))
            except Unmatched as exc:
                structure.problems.append(str(exc))
        elif node.op_type == "MatMul" and (block := _match_feed_forward(node)) is not None:
            structure.feed_forward.append(block)
    for position, attention in enumerate(structure.attention):
        attention.layer = _layer_index(attention, position)
    for position, feed_forward in enumerate(structure.feed_forward):
        feed_forward.layer = _layer_index(feed_forward, position)
    # A transformer's feed-forward sub-block is also "x + f(x)": residual blocks only count without attention.
    structure.layers = (
        _pair_layers(structure, order) if structure.attention else _residual_blocks(model.graph)
    )
    return structure


def _pair_layers(structure: Structure, order: dict[ir.Node, int]) -> list[Layer]:
    attention, feed_forward = structure.attention, structure.feed_forward
    if not attention or len(attention) != len(feed_forward):
        return []
    layers = []
    for attn, ffn in zip(attention, feed_forward, strict=True):
        if order[attn.output.matmul] > order[ffn.up.matmul] or attn.entry is None or ffn.residual is None:
            return []
        exit_value = ffn.residual.outputs[0]
        users = exit_value.consumers()
        if len(users) == 1 and users[0].op_type == "LayerNormalization":
            exit_value = users[0].outputs[0]
        layers.append(Layer(attn.layer, attn, ffn, attn.entry, exit_value))
    return layers


def _residual_blocks(graph: ir.Graph) -> list[Layer]:
    """Residual blocks of a CNN: an Add of a value and a branch computed from that value alone, with
    equal static shapes, optionally followed by the block's activation (ResNet's ReLU after the sum)."""
    blocks: list[Layer] = []
    for node in graph:
        if node.op_type != "Add" or any(const_array(v) is not None for v in node.inputs):
            continue
        if len(node.inputs) != 2:
            continue
        pair = (input_of(node, 0), input_of(node, 1))
        for entry, branch in (pair, pair[::-1]):
            if _same_static_shape(entry, branch) and _computed_only_from(branch, entry):
                exit_value = node.outputs[0]
                users = exit_value.consumers()
                if len(users) == 1 and users[0].op_type == "Relu":
                    exit_value = users[0].outputs[0]
                index = int(node.metadata_props.get(LAYER_KEY, len(blocks)))
                blocks.append(Layer(index, None, None, entry, exit_value))
                break
    return blocks


def _same_static_shape(a: ir.Value, b: ir.Value) -> bool:
    return (
        a.shape is not None
        and b.shape is not None
        and len(a.shape) == len(b.shape)
        and all(x == y for x, y in zip(a.shape, b.shape, strict=True))
    )


def _computed_only_from(value: ir.Value, source: ir.Value, limit: int = 64) -> bool:
    """Whether every non-constant path into ``value`` starts at ``source`` (and there is at least one op)."""
    stack, seen = [value], set[ir.Node]()
    while stack:
        current = stack.pop()
        if current is source or const_array(current) is not None:
            continue
        producer = current.producer()
        if producer is None or len(seen) > limit:
            return False
        if producer not in seen:
            seen.add(producer)
            stack.extend(v for v in producer.inputs if v is not None)
    return value is not source


def number_layers(model: ir.Model) -> Structure:
    """Find the structure and, on first sight, write each block's layer number into its node metadata."""
    structure = find_structure(model)
    for blocks in (structure.attention, structure.feed_forward):
        for block in blocks:
            anchor = block.output.matmul if isinstance(block, AttentionBlock) else block.down.matmul
            anchor.metadata_props.setdefault(LAYER_KEY, str(block.layer))
    if not structure.attention:
        for layer in structure.layers:
            residual_add = layer.exit.producer()
            if residual_add is not None and residual_add.op_type != "Add":
                residual_add = input_of(residual_add, 0).producer()
            if residual_add is not None:
                residual_add.metadata_props.setdefault(LAYER_KEY, str(layer.index))
    return structure
