"""The cost table on graphs redux-edge did not export: MACs counted against the analytic figure."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common
import torch

from redux_edge.ir.cost import model_cost


class _FlattenByView(torch.nn.Module):
    """A CNN that flattens with ``x.view(x.size(0), -1)``: TorchScript exports read the batch back with
    Shape/Gather and build the Reshape's shape with Concat at run time."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.second = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
        self.head = torch.nn.Linear(16 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.second(torch.relu(self.first(x)) / 2.0))
        return self.head(x.view(x.size(0), -1))


def test_a_torchscript_cnn_costs_its_analytic_macs_and_no_scalars(tmp_path):
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(
        _FlattenByView(), (torch.randn(2, 3, 16, 16),), str(path), dynamo=False,
        input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}},
    )  # fmt: skip
    model = ir.load(str(path))
    # As stored by tools that keep constants as initializers: the divisor becomes a 0-d float tensor.
    ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    assert any(not value.shape.dims for value in model.graph.initializers.values())
    cost = model_cost(model, {"x": (5, 3, 16, 16)})
    per_image = 16 * 16 * 8 * (3 * 9) + 8 * 8 * 16 * (4 * 9) + 1024 * 10
    assert cost["macs"] == 5 * per_image
    # Weights and biases only: the divisor 2.0 is a constant of the arithmetic, not a parameter.
    assert cost["params"] == (8 * 3 * 9 + 8) + (16 * 4 * 9 + 16) + (1024 * 10 + 10)


def test_recurrent_macs_constant_node_weights_and_control_flow_are_counted_or_named():
    import numpy as np
    import onnx
    import onnx.helper as oh
    import onnx.numpy_helper as nh

    hidden, features, steps, batch = 8, 4, 5, 2
    recurrent = [
        nh.from_array(np.ones((1, 4 * hidden, n), np.float32), name)
        for n, name in ((features, "W"), (hidden, "R"))
    ]
    branch = oh.make_graph(
        [oh.make_node("Identity", ["x"], ["b"])],
        "b",
        [],
        [oh.make_tensor_value_info("b", onnx.TensorProto.FLOAT, None)],
    )
    graph = oh.make_graph(
        [
            oh.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=hidden),
            oh.make_node("Constant", [], ["kernel"], value=nh.from_array(np.ones((3, 3), np.float32))),
            oh.make_node("Constant", [], ["epsilon"], value=nh.from_array(np.ones(1, np.float32))),
            oh.make_node("Constant", [], ["flag"], value=nh.from_array(np.array(True))),
            oh.make_node("If", ["flag"], ["z"], then_branch=branch, else_branch=branch),
        ],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["steps", "batch", features])],
        [oh.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("y", "kernel", "epsilon", "z")],
        initializer=recurrent,
    )  # fmt: skip
    model = ir.from_proto(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]))
    cost = model_cost(model, {"x": (steps, batch, features)})
    assert cost["macs"] == steps * batch * 4 * hidden * (features + hidden)
    assert cost["params"] == 4 * hidden * (features + hidden) + 9  # the 3x3 Constant; not the epsilon
    assert cost["macs_not_counted"] == ["If"]
