"""Operators that an older parser rejects, rewritten as the older operators that define them.

TensorRT 8.2 (JetPack 4.6) parses opset 13, and TensorRT 8.2 and 8.5 (JetPack 5.1) have no
LayerNormalization or Reciprocal, while exporters emit LayerNormalization (opset 17) and Gelu (opset 20)
for every transformer and Reciprocal for RMSNorm's rsqrt (every Llama-style decoder). Reciprocal is
1 / x; the other two are defined in the ONNX spec by a short formula over opset-13 operators (ReduceMean,
Sub, Mul, Add, Sqrt, Div, Erf, Tanh), which is what is written here, at the model's own opset (ReduceMean
takes its axes as an attribute before opset 18 and as an input from 18 on). The rewrite is exact up to
float rounding; the backend that uses it checks the result under ONNX Runtime against the reference like
any artifact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
from onnx_ir import tape as ir_tape

__all__ = ["DECOMPOSABLE", "decompose"]


def _scalar(graph: ir.Graph, value: float, dtype: ir.DataType, name: str) -> ir.Value:
    constant = ir.Value(name=name, const_value=ir.tensor(np.array(value, dtype=dtype.numpy())))
    graph.register_initializer(constant)
    return constant


def _reduce_mean(builder: ir_tape.Tape, graph: ir.Graph, x: ir.Value, axes: list[int], opset: int, name: str):
    if opset < 18:
        return builder.op("ReduceMean", [x], {"axes": axes, "keepdims": 1})
    axes_value = ir.Value(name=f"{name}_axes", const_value=ir.tensor(np.array(axes, dtype=np.int64)))
    graph.register_initializer(axes_value)
    return builder.op("ReduceMean", [x, axes_value], {"keepdims": 1})


def _layer_normalization(
    node: ir.Node, graph: ir.Graph, opset: int, name: str
) -> tuple[list[ir.Node], ir.Value] | None:
    x, scale, bias = [*node.inputs, None][:3]
    if any(output.uses() or output in graph.outputs for output in node.outputs[1:]):
        return None  # the mean and inverse-deviation outputs are training outputs; no exporter uses them
    if x is None or x.shape is None or x.dtype != ir.DataType.FLOAT:
        return None
    axis = node.attributes.get_int("axis", -1)
    rank = len(x.shape)
    axes = list(range(axis % rank, rank))
    builder = ir_tape.Tape()
    epsilon = _scalar(graph, node.attributes.get_float("epsilon", 1e-5), x.dtype, f"{name}_epsilon")
    mean = _reduce_mean(builder, graph, x, axes, opset, f"{name}_mean")
    centred = builder.op("Sub", [x, mean])
    variance = _reduce_mean(builder, graph, builder.op("Mul", [centred, centred]), axes, opset, f"{name}_var")
    deviation = builder.op("Sqrt", [builder.op("Add", [variance, epsilon])])
    result = builder.op("Mul", [builder.op("Div", [centred, deviation]), scale])
    if bias is not None:
        result = builder.op("Add", [result, bias])
    return list(builder.nodes), result


def _gelu(node: ir.Node, graph: ir.Graph, opset: int, name: str) -> tuple[list[ir.Node], ir.Value] | None:
    (x,) = node.inputs
    if x is None or x.dtype != ir.DataType.FLOAT:
        return None
    dtype = x.dtype
    builder = ir_tape.Tape()

    def constant(value: float, suffix: str) -> ir.Value:
        return _scalar(graph, value, dtype, f"{name}_{suffix}")

    if node.attributes.get_string("approximate", "none") == "tanh":
        cube = builder.op("Mul", [builder.op("Mul", [x, x]), x])
        inner = builder.op("Add", [x, builder.op("Mul", [cube, constant(0.044715, "cubic")])])
        curve = builder.op("Tanh", [builder.op("Mul", [inner, constant(math.sqrt(2 / math.pi), "scale")])])
    else:
        curve = builder.op("Erf", [builder.op("Mul", [x, constant(1 / math.sqrt(2), "scale")])])
    one_plus = builder.op("Add", [curve, constant(1.0, "one")])
    result = builder.op("Mul", [builder.op("Mul", [x, one_plus]), constant(0.5, "half")])
    return list(builder.nodes), result


def _reciprocal(
    node: ir.Node, graph: ir.Graph, opset: int, name: str
) -> tuple[list[ir.Node], ir.Value] | None:
    (x,) = node.inputs
    if x is None or x.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        return None
    builder = ir_tape.Tape()
    result = builder.op("Div", [_scalar(graph, 1.0, x.dtype, f"{name}_one"), x])
    return list(builder.nodes), result


# (node, graph, opset, a name unique in the graph for what it adds) -> (new nodes, the new output)
Decomposition = Callable[[ir.Node, ir.Graph, int, str], "tuple[list[ir.Node], ir.Value] | None"]
DECOMPOSABLE: dict[str, Decomposition] = {
    "LayerNormalization": _layer_normalization,
    "Gelu": _gelu,
    "Reciprocal": _reciprocal,
}


def decompose(model: ir.Model, op_types: set[str]) -> dict[str, int]:
    """Rewrite every main-graph node of ``op_types`` that has a decomposition; how many of each were."""
    opset = model.opset_imports.get("", 0)
    graph = model.graph
    done: dict[str, int] = {}
    wanted = [n for n in graph if n.domain in ("", "ai.onnx") and n.op_type in op_types & DECOMPOSABLE.keys()]
    if any(value is not None and value.dtype is None for node in wanted for value in node.inputs):
        # The formulas' constants take the input's type, so types are inferred where the model lacks them.
        onnx_ir.passes.common.ShapeInferencePass()(model)
    for node in wanted:
        prefix = f"{node.name or node.op_type}_decomposed{sum(done.values())}"
        rewritten = DECOMPOSABLE[node.op_type](node, graph, opset, prefix)
        if rewritten is None:
            continue
        nodes, result = rewritten
        for index, new in enumerate(nodes):
            new.name = f"{prefix}_{index}"
        ir.convenience.replace_nodes_and_values(graph, node, [node], nodes, [node.outputs[0]], [result])
        done[node.op_type] = done.get(node.op_type, 0) + 1
    return done
