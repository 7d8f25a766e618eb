"""Small ONNX graphs written with onnx.helper, shared by the end-to-end tests and the passes' unit tests
(tests/passes/): models that redux-edge did not export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh

__all__ = ["make_mlp_onnx"]


def make_mlp_onnx(path: Path, hidden: int = 16) -> Path:
    """A two-layer MLP written with onnx.helper: an ONNX file that redux-edge did not export."""
    rng = np.random.default_rng(1)
    w1 = onnx.numpy_helper.from_array(rng.standard_normal((8, hidden)).astype(np.float32), "w1")
    b1 = onnx.numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "b1")
    w2 = onnx.numpy_helper.from_array(rng.standard_normal((hidden, 3)).astype(np.float32), "w2")
    graph = oh.make_graph(
        [
            oh.make_node("MatMul", ["x", "w1"], ["h0"]),
            oh.make_node("Add", ["h0", "b1"], ["h1"]),
            oh.make_node("Relu", ["h1"], ["h2"]),
            oh.make_node("MatMul", ["h2", "w2"], ["y"]),
        ],
        "mlp",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 3])],
        initializer=[w1, b1, w2],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path
