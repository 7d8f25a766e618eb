"""Write a model at an older opset, for parsers that read no newer one (TensorRT 8.2 reads opset 13).

onnxscript's version converter only converts up (down, it raises "downstream version conversion not
currently handled", seen with 0.7.2 on an opset-23 file for TensorRT 10.3's 20). ONNX's C++ converter is not
used: it has no down-adapters for operators whose newer versions only widened their types (Sub 14,
Shape 15, ...), and from 20 to 17 it left ReduceL2 with an attribute opset 17 lacks, a model ONNX Runtime
refused (measured on MiniLM). Instead this module keeps a node as it is when the older schema takes it
unchanged: no attribute the older version lacks (one at its default, the older behaviour, or one that
changes nothing for this node is dropped) and no input beyond the older version's. The one signature
change transformers need is rewritten: ReduceMean and the other reductions took ``axes`` as an attribute
before opset 18. A node whose schema changed meaning is refused by name, so that nothing is reinterpreted
silently; the result is checked by ``onnx.checker`` at the new opset, and the caller checks it under ONNX
Runtime against the reference.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.defs
import onnx_ir as ir
import onnx_ir.passes.common

from redux_edge.errors import UserError

__all__ = ["convert_opset"]

_REDUCTIONS_WITH_AXES_INPUT_FROM_18 = {
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceProd", "ReduceSumSquare",
}  # fmt: skip
# Same inputs and attributes, different meaning of a value (a new Resize coordinate mode, Pad's "wrap").
_CHANGED_MEANING = {"Resize", "Pad", "GridSample", "Upsample"}


def _constant_shape_without_zeros(node: ir.Node) -> bool:
    target_shape = node.inputs[1] if len(node.inputs) > 1 else None
    shape = ir.convenience.get_const_tensor(target_shape) if target_shape is not None else None
    return shape is not None and bool((shape.numpy() != 0).all())


# Newer attributes that change nothing for a given node (exporters set them whether needed or not):
# Reshape's allowzero only matters for a 0 in the target shape.
_IRRELEVANT = {("Reshape", "allowzero"): _constant_shape_without_zeros}


def convert_opset(model: ir.Model, target: int) -> dict[str, int]:
    """Bring ``model`` (default domain) down to opset ``target`` in place; the nodes rewritten per op.
    Raises a UserError naming the first node that has no older form."""
    if model.opset_imports.get("", 0) <= target:
        return {}
    if any(node.op_type == "Split" and "num_outputs" in node.attributes for node in model.graph):
        # Split's older form needs the size it splits: shapes are inferred where the model lacks them.
        onnx_ir.passes.common.ShapeInferencePass()(model)
    rewritten: dict[str, int] = {}
    for node in list(model.graph):
        if node.domain in ("", "ai.onnx") and _older_form(model.graph, node, model.opset_imports[""], target):
            rewritten[node.op_type] = rewritten.get(node.op_type, 0) + 1
    model.opset_imports[""] = target
    try:
        onnx.checker.check_model(ir.to_proto(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise UserError(
            f"the model does not hold at opset {target}: {str(exc).splitlines()[0]}",
            "choose a target with a newer TensorRT, or another backend",
        ) from exc
    return rewritten


def _older_form(graph: ir.Graph, node: ir.Node, opset: int, target: int) -> bool:
    """Make ``node`` valid at ``target``: True when it had to be rebuilt, False when it holds as it is."""
    newer = onnx.defs.get_schema(node.op_type, opset)
    if not onnx.defs.has(node.op_type, target):
        raise _no_older_form(node, target, f"{node.op_type} does not exist at opset {target}")
    older = onnx.defs.get_schema(node.op_type, target)
    if older.since_version == newer.since_version:
        return False
    if node.op_type in _CHANGED_MEANING:
        raise _no_older_form(node, target, f"{node.op_type} changed meaning after opset {target}")
    attributes = {
        name: attribute
        for name, attribute in node.attributes.items()
        if name in older.attributes
        or not (_is_default(newer, name, attribute) or _IRRELEVANT.get((node.op_type, name), _never)(node))
    }
    inputs = list(node.inputs)
    if node.op_type == "Split" and "num_outputs" in attributes and older.since_version < 18:
        attributes.pop("num_outputs")
        inputs = _split_sizes(graph, node, inputs, attributes, older.since_version)
    if (
        node.op_type in _REDUCTIONS_WITH_AXES_INPUT_FROM_18
        and newer.since_version >= 18 > older.since_version
    ):
        axes = inputs[1] if len(inputs) > 1 else None
        # Left only when not at its default (0): an empty axes input then means "reduce nothing".
        if attributes.pop("noop_with_empty_axes", None) is not None and axes is None:
            raise _no_older_form(node, target, "noop_with_empty_axes has no older form")
        if axes is not None:
            constant = ir.convenience.get_const_tensor(axes)
            if constant is None:
                raise _no_older_form(node, target, "its axes are computed at run time")
            attributes["axes"] = ir.AttrInt64s("axes", [int(a) for a in constant.numpy().ravel()])
        inputs = inputs[:1]
    if extra := sorted(set(attributes) - set(older.attributes)):
        raise _no_older_form(node, target, f"attribute {extra[0]} is newer than opset {target}")
    if len(inputs) > len(older.inputs) and not _variadic(older):
        raise _no_older_form(node, target, f"input {len(older.inputs) + 1} is newer than opset {target}")
    if inputs == list(node.inputs) and attributes.keys() == node.attributes.keys():
        return False
    older_node = ir.Node(
        node.domain,
        node.op_type,
        inputs,
        attributes=list(attributes.values()),
        num_outputs=len(node.outputs),
        name=node.name,
    )
    ir.convenience.replace_nodes_and_values(
        graph, node, [node], [older_node], list(node.outputs), list(older_node.outputs)
    )
    return True


def _split_sizes(graph: ir.Graph, node: ir.Node, inputs: list, attributes: dict, older: int) -> list:
    """Split(num_outputs=n) from opset 18 as explicit sizes: ceil(d/n) each, the rest last. Before opset
    13 they are an attribute, from 13 an input."""
    x, count = node.inputs[0], len(node.outputs)
    axis = node.attributes.get_int("axis", 0)
    size = x.shape[axis] if x is not None and x.shape is not None else None
    if not isinstance(size, int):
        raise _no_older_form(node, older, "its split size along the axis is known only at run time")
    chunk = -(-size // count)
    sizes = [chunk] * (count - 1) + [size - chunk * (count - 1)]
    if older < 13:
        attributes["split"] = ir.AttrInt64s("split", sizes)
        return inputs[:1]
    constant = ir.Value(
        name=f"{node.name or 'split'}_sizes", const_value=ir.tensor(np.array(sizes, np.int64))
    )
    graph.register_initializer(constant)
    return [inputs[0], constant]


def _never(node: ir.Node) -> bool:
    return False


def _is_default(schema: onnx.defs.OpSchema, name: str, attribute: ir.Attr) -> bool:
    declared = schema.attributes.get(name)
    if declared is None or not declared.default_value.name:
        return False
    default = onnx.helper.get_attribute_value(declared.default_value)
    value = attribute.value
    return (default.decode() if isinstance(default, bytes) else default) == value


def _variadic(schema: onnx.defs.OpSchema) -> bool:
    return (
        bool(schema.inputs) and schema.inputs[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic
    )


def _no_older_form(node: ir.Node, target: int, why: str) -> UserError:
    return UserError(
        f"node {node.name or node.op_type} ({node.op_type}) has no form at opset {target}: {why}",
        "choose a target with a newer TensorRT, or another backend",
    )
