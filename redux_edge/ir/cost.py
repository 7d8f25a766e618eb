"""What a model costs: parameters, weight bytes, and multiply-accumulates at given input shapes.

MACs follow the usual convention of FLOP counters (fvcore, ONNX Runtime's profiler): for ``MatMul``
and ``Gemm`` the output size times the reduction length, for ``Conv`` the output size times the
input channels per group times the kernel area, for ``LSTM``/``GRU``/``RNN`` every step's input and
recurrent products (gates x hidden x (input + hidden)); element-wise work is not counted, and neither is
the work inside control flow (``If``, ``Loop``, ``Scan``), which is named instead (``macs_not_counted``).
Weights are initializers and ``Constant`` nodes (some exporters write every weight as one). Shapes come from
ONNX shape inference with data propagation on a copy of the model whose inputs are fixed to the
given shapes, so dynamic dimensions are resolved the way the runtime would resolve them.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx.helper
import onnx.shape_inference
import onnx_ir as ir

__all__ = ["model_cost"]

_SHAPE_CONSTANT_LIMIT = 1024


def model_cost(model: ir.Model, input_shapes: dict[str, tuple[int, ...]]) -> dict:
    """Parameters (and how many are non-zero: 2:4 and pruned weights), their bytes, and MACs."""
    params = nonzero = weight_bytes = 0
    constants = [
        node.outputs[0] for node in model.graph if node.op_type == "Constant" and "value" in node.attributes
    ]
    for value in [*model.graph.initializers.values(), *constants]:
        # Integer tensors are shapes, axes and indices, not learned weights, unless they are the stored
        # values of quantized weights; a 0-d tensor is a constant of the arithmetic (an epsilon, a scale),
        # not a parameter.
        tensor = value.const_value if value.const_value is not None else _constant(value)
        if tensor is None or not (tensor.dtype.is_floating_point() or _quantized_weight(value)):
            continue
        if not tensor.shape.dims or (value.const_value is None and math.prod(tensor.shape.numpy()) <= 1):
            continue  # one-element Constant nodes are the arithmetic's, like 0-d ones
        params += math.prod(tensor.shape.numpy())
        nonzero += int(np.count_nonzero(tensor.numpy()))
        weight_bytes += tensor.nbytes
    macs, not_counted = _macs(model, input_shapes)
    return {
        "params": int(params),
        "nonzero_params": nonzero,
        "weight_bytes": int(weight_bytes),
        "macs": macs,
        **({"macs_not_counted": not_counted} if not_counted else {}),
    }


def _constant(value: ir.Value) -> ir.TensorProtocol | None:
    producer = value.producer()
    return producer.attributes["value"].as_tensor() if producer is not None else None


# Where an integer tensor is a quantized weight: (operator, input position).
_QUANTIZED_WEIGHT_USES = {("DequantizeLinear", 0), ("MatMulInteger", 1), ("ConvInteger", 1)}


# An 8-bit table a Gather reads is a quantized embedding table (embedding-tables int8); the integer
# tensors a Gather reads otherwise (shapes) are int64.
_QUANTIZED_TABLE_TYPES = {ir.DataType.INT8, ir.DataType.UINT8}


def _quantized_weight(value: ir.Value) -> bool:
    for node, index in value.uses():
        if (node.op_type, index) in _QUANTIZED_WEIGHT_USES:
            return True
        if (node.op_type, index) == ("Gather", 0) and value.dtype in _QUANTIZED_TABLE_TYPES:
            return True
    return False


def _macs(model: ir.Model, input_shapes: dict[str, tuple[int, ...]]) -> tuple[int, list[str]]:
    proto = ir.to_proto(model)
    for value in proto.graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, input_shapes[value.name], strict=True):
                dim.Clear()
                dim.dim_value = size
    del proto.graph.value_info[:]
    # Large weights are not needed for shapes (small ones may be shape constants); dropping them keeps
    # the copy small. Their shapes are taken from the IR below.
    for tensor in proto.graph.initializer:
        if math.prod(tensor.dims) > _SHAPE_CONSTANT_LIMIT:
            proto.graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            )
    large = {t.name for t in proto.graph.initializer if math.prod(t.dims) > _SHAPE_CONSTANT_LIMIT}
    kept = [t for t in proto.graph.initializer if t.name not in large]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    shapes = {
        info.name: tuple(
            d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim
        )
        for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    shapes.update({t.name: tuple(t.dims) for t in kept})
    total = 0
    for node in inferred.graph.node:
        total += _node_macs(node, shapes)
    control_flow = sorted({node.op_type for node in inferred.graph.node if node.op_type in _CONTROL_FLOW})
    return int(total), control_flow


_CONTROL_FLOW = {"If", "Loop", "Scan"}
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _node_macs(node: onnx.NodeProto, shapes: dict[str, tuple]) -> int:
    if node.op_type in _GATES:
        return _recurrent_macs(node, shapes)
    out = shapes.get(node.output[0]) if node.output else None
    if not out or None in out:
        return 0
    out_size = int(np.prod(out))
    if node.op_type in ("MatMul", "MatMulInteger"):
        a = shapes.get(node.input[0])
        return out_size * a[-1] if a and a[-1] else 0
    if node.op_type == "Gemm":
        a = shapes.get(node.input[0])
        trans_a = any(attr.name == "transA" and attr.i for attr in node.attribute)
        if not a or None in a:
            return 0
        return out_size * (a[0] if trans_a else a[1])
    if node.op_type in ("Conv", "ConvInteger"):
        w = shapes.get(node.input[1])
        return out_size * int(np.prod(w[1:])) if w and None not in w else 0
    return 0


def _recurrent_macs(node: onnx.NodeProto, shapes: dict[str, tuple]) -> int:
    """X [steps, batch, input] (layout 0), W [directions, gates x hidden, input]: every step multiplies
    the input and the previous hidden state into every gate."""
    x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
    if not x or not w or None in x or None in w:
        return 0
    hidden = int(w[1]) // _GATES[node.op_type]
    layout = next((attr.i for attr in node.attribute if attr.name == "layout"), 0)
    steps, batch = (x[0], x[1]) if layout == 0 else (x[1], x[0])
    return int(steps * batch * w[0] * w[1] * (x[2] + hidden))
