"""Transformer blocks found in an ONNX graph by following its values: attention, feed-forward, layers.

Follows the BERT-family layer (Vaswani et al., 2017; Devlin et al., 2019) as exporters write it in ONNX:
Q/K/V projections (MatMul with a constant weight, optional bias Add) -> split into heads -> scores MatMul
-> scale, mask, Softmax -> context MatMul with V -> merge heads -> output projection -> residual Add (->
LayerNormalization in post-LN models); the feed-forward block is a projection, an elementwise activation
and a projection back, with its own residual Add. Matching anchors on Softmax and follows dataflow, not
node names; between a projection and the attention MatMuls any chain of reshapes, transposes and scalar
scales is accepted, the heads being followed through it as factors (``redux_edge.ir.heads``). So it finds
the blocks of BERT, DistilBERT, RoBERTa and ViT exported by torch dynamo or TorchScript, with dynamic or
static shapes. An attention-like Softmax that cannot be followed is reported with its node and the
reason; the structural passes then change nothing.

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

from redux_edge.ir.heads import (
    FOLLOWED,
    Factor,
    Shapes,
    ShapeSlot,
    Unmatched,
    concrete_shapes,
    const_array,
    input_of,
    merge_heads,
    split_heads,
)

__all__ = [
    "AttentionBlock",
    "FeedForwardBlock",
    "Layer",
    "Linear",
    "Structure",
    "find_structure",
    "number_layers",
]

LAYER_KEY = "redux_edge.layer"
_ELEMENTWISE = frozenset(
    {"Gelu", "Relu", "Erf", "Mul", "Add", "Div", "Sub", "Sigmoid", "Tanh", "Pow", "Sqrt", "Neg", "Softplus"}
    | {"Elu", "LeakyRelu", "Clip", "HardSigmoid", "HardSwish", "Mish", "FastGelu", "QuickGelu"}
)
# The most nodes between a projection and an attention MatMul (static exports fold and unfold the heads).
_LONGEST_HEAD_PATH = 12
# Ops between the scores MatMul, Softmax and the context MatMul: scaling, masking, NaN guards.
_SCORE_PATH = frozenset({"Add", "Div", "Mul", "Where", "Cast", "Sub", "IsNaN", "Identity", "Dropout"})


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
    consumers = _data_consumers(value)
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
class AttentionBlock:
    query: Linear
    key: Linear
    value: Linear
    output: Linear
    heads: int
    head_dim: int
    context: ir.Node
    shape_slots: list[ShapeSlot]
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


def _projection(value: ir.Value, anchor: ir.Node, role: str) -> tuple[Linear, list[ir.Node]]:
    """The projection feeding one side of the attention, and the nodes from it to ``anchor``, in order."""
    chain: list[ir.Node] = []
    current: ir.Value | None = value
    while current is not None and len(chain) <= _LONGEST_HEAD_PATH:
        linear = _linear_ending_at(current)
        if linear is not None:
            return linear, chain[::-1]
        node = current.producer()
        if node is None or node.op_type not in FOLLOWED:
            break
        current = node.inputs[0]
        if node.op_type in ("Mul", "Div"):
            current, *scales = sorted(node.inputs, key=lambda v: const_array(v) is not None)
            if not all(_is_scalar_const(scale) for scale in scales):
                raise Unmatched(node, f"the {role} path is scaled by a non-scalar")
        chain.append(node)
    raise Unmatched(anchor, f"no projection with a constant weight feeds the {role} side")


def _merge_chain(context: ir.Node) -> tuple[list[ir.Node], Linear]:
    """The nodes from the context MatMul to the output projection, and that projection."""
    chain: list[ir.Node] = []
    current = context.outputs[0]
    while len(chain) <= _LONGEST_HEAD_PATH:
        linear = _linear_starting_at(current)
        if linear is not None:
            return chain, linear
        users = _data_consumers(current)
        if len(users) != 1 or users[0].op_type not in ("Transpose", "Reshape", "Cast", "Identity"):
            break
        chain.append(users[0])
        current = users[0].outputs[0]
    raise Unmatched(
        chain[-1] if chain else context,
        "the context does not reach one output projection with a constant weight",
    )


def _match_attention(softmax: ir.Node, shapes: Shapes) -> AttentionBlock:
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
    sides = [(scores[0], 0, "query"), (scores[0], 1, "key"), (context, 1, "value")]
    projections = [_projection(input_of(anchor, index), anchor, role) for anchor, index, role in sides]
    width = projections[0][0].weight.shape[1]
    if any(linear.weight.shape[1] != width for linear, _ in projections):
        raise Unmatched(scores[0], "query, key and value projections differ in width")
    layouts = [
        split_heads(chain, width, shapes, role, anchor)
        for (_, chain), (anchor, _, role) in zip(projections, sides, strict=True)
    ]
    value_layout = layouts[2]
    heads, head_dim = value_layout.heads, value_layout.head_dim
    positions = set()
    for layout, (anchor, index, role) in zip(layouts, sides, strict=True):
        dims = shapes.get(input_of(anchor, index), ())
        # Keys reach the scores MatMul transposed: [.., head size, seq].
        size_at = Factor(dims[-1] if role == "key" else 1, head_dim) if dims else None
        if (layout.heads, layout.head_dim) != (heads, head_dim) or layout.head_dim_factor != size_at:
            raise Unmatched(anchor, f"the {role} side does not reach it as [.., heads, seq, head size]")
        positions.add(layout.batch_position(dims))
    if len(positions) != 1:
        raise Unmatched(scores[0], "query, key and value carry their heads on different axes")
    merge, output = _merge_chain(context)
    merge_slots = merge_heads(merge, context, value_layout, shapes)
    if output.weight.shape[0] != width:
        raise Unmatched(output.matmul, f"the output projection does not take the {width} merged features")
    slots = [slot for layout in layouts for slot in layout.slots] + merge_slots
    entry, residual = _residual(output.output)
    (query, _), (key, _), (value, _) = projections
    return AttentionBlock(query, key, value, output, heads, head_dim, context, slots, entry, residual)


def _data_consumers(value: ir.Value) -> list[ir.Node]:
    """The nodes that read ``value``'s data (a Shape reads only its dims, which follow any pruning)."""
    return [node for node in value.consumers() if node.op_type not in ("Shape", "Size")]


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
    shapes = concrete_shapes(model) if any(node.op_type == "Softmax" for node in model.graph) else {}
    for node in model.graph:
        if node.op_type == "Softmax":
            try:
                structure.attention.append(_match_attention(node, shapes))
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
        # Post-LN (BERT): the layer ends in its LayerNormalization, as its entry came out of the previous
        # one. Pre-LN (ViT): the stream between layers is the residual sum, and a LayerNormalization after
        # the last layer is the model's final one, not the layer's.
        entry = attn.entry.producer()
        post_norm = entry is not None and entry.op_type == "LayerNormalization"
        if post_norm and len(users) == 1 and users[0].op_type == "LayerNormalization":
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
