"""sparsity on a two-layer MLP: N:M masks along each weight's reduction axis, the largest kept, weights
named by exclude or too small left dense with the reason."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from graphs import make_mlp_onnx

from redux_edge.errors import UserError
from redux_edge.ir import nm
from redux_edge.passes import build_pass


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    """By original name: a masked weight is a new initializer (``w1.sparse``)."""
    return {
        name.removesuffix(".sparse"): value.const_value.numpy()
        for name, value in model.graph.initializers.items()
        if value.const_value is not None
    }


@pytest.fixture
def mlp(tmp_path) -> ir.Model:
    return ir.load(str(make_mlp_onnx(tmp_path / "mlp.onnx", hidden=32)))


def test_magnitude_2_4_keeps_the_two_largest_of_every_group_of_four_inputs(mlp):
    dense = _weights(mlp)
    outcome = build_pass("sparsity", {"min_weights": 0, "tensor_core_shapes": False})(mlp)
    sparse = _weights(mlp)
    for name in ("w1", "w2"):
        # A MatMul weight is [inputs, outputs]: groups run along the inputs (axis 0).
        groups = np.moveaxis(sparse[name], 0, -1).reshape(-1, 4)
        assert ((groups != 0).sum(axis=1) <= 2).all()
        kept = np.moveaxis(np.abs(dense[name]), 0, -1).reshape(-1, 4)
        smallest_kept = np.where(groups != 0, kept, np.inf).min(axis=1)
        largest_dropped = np.where(groups == 0, kept, -np.inf).max(axis=1)
        assert (smallest_kept >= largest_dropped).all()
    assert {entry["weight"] for entry in outcome.report if entry["sparsified"]} == {"w1", "w2"}
    np.testing.assert_array_equal(sparse["b1"], dense["b1"])  # a bias is no MatMul weight
    assert nm.violations(np.moveaxis(sparse["w1"], 0, 1), 2, 4) == 0


def test_excluded_and_small_weights_stay_dense_and_say_why(mlp):
    dense = _weights(mlp)
    outcome = build_pass("sparsity", {"exclude": ["w2"], "min_weights": 300, "tensor_core_shapes": False})(
        mlp
    )
    reasons = {entry["weight"]: entry for entry in outcome.report}
    assert not reasons["w2"]["sparsified"] and not reasons["w1"]["sparsified"]
    assert "excluded" in reasons["w2"]["reason"] and "min_weights 300" in reasons["w1"]["reason"]
    for name in ("w1", "w2"):
        np.testing.assert_array_equal(_weights(mlp)[name], dense[name])


def test_a_pattern_that_is_not_n_of_m_is_refused():
    with pytest.raises(UserError, match="not N:M"):
        build_pass("sparsity", {"pattern": "3:2"})
