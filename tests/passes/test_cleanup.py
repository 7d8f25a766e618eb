"""cleanup: folds constants and removes dead nodes without changing what the graph computes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest

from redux_edge.errors import UserError
from redux_edge.passes import build_pass


def _graph(opset: int = 17) -> ir.Model:
    """y = reshape(x + (2 * 3)), with a node nothing reads."""
    consts = [
        oh.make_node("Constant", [], ["two"], value=onnx.numpy_helper.from_array(np.float32(2.0))),
        oh.make_node("Constant", [], ["three"], value=onnx.numpy_helper.from_array(np.float32(3.0))),
        oh.make_node("Constant", [], ["shape"], value=onnx.numpy_helper.from_array(np.array([2, 3]))),
    ]
    nodes = [
        *consts,
        oh.make_node("Mul", ["two", "three"], ["six"]),
        oh.make_node("Add", ["x", "six"], ["sum"]),
        oh.make_node("Neg", ["x"], ["unused"]),
        oh.make_node("Reshape", ["sum", "shape"], ["y"], **({"allowzero": 1} if opset >= 14 else {})),
    ]
    graph = oh.make_graph(
        nodes,
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [6])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
    )
    return ir.from_proto(oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=8))


def test_constants_are_folded_and_dead_nodes_removed_with_the_same_outputs(run):
    model = _graph()
    x = {"x": np.arange(6, dtype=np.float32)}
    before = run(model, x)[0]
    outcome = build_pass("cleanup", {})(model)
    assert outcome.modified
    assert "Neg" not in [node.op_type for node in model.graph]
    assert "Mul" not in [node.op_type for node in model.graph]
    np.testing.assert_array_equal(run(model, x)[0], before)


def test_iterations_below_one_are_refused():
    with pytest.raises(UserError, match="iterations"):
        build_pass("cleanup", {"iterations": 0})


def test_a_reshape_attribute_newer_than_the_opset_is_dropped_where_it_changes_nothing(run):
    model = _graph(opset=12)
    reshape = next(node for node in model.graph if node.op_type == "Reshape")
    reshape.attributes["allowzero"] = ir.AttrInt64("allowzero", 1)  # as onnxscript's rewrites write it
    build_pass("cleanup", {})(model)
    assert all("allowzero" not in node.attributes for node in model.graph)
    assert run(model, {"x": np.zeros(6, np.float32)})[0].shape == (2, 3)
