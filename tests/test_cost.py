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
