"""quantize on a two-layer MLP: the pass writes INT8 QDQ (static, calibrated on the inputs it is given) or
dynamic INT8 that ONNX Runtime runs within the INT8 gate of the float graph, keeps excluded weights in
float, and refuses static INT8 on made-up inputs."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import make_mlp_onnx

from redux_edge.analysis.shift import GATES, failures, output_shift
from redux_edge.errors import UserError
from redux_edge.frontend import load_source
from redux_edge.ir.surgery import copy_model
from redux_edge.passes import build_pass


def _quantized(tmp_path, run, checked_for_host, parameters: dict, with_inputs: bool = True):
    model_file = make_mlp_onnx(tmp_path / "mlp.onnx", hidden=32)
    inputs = None
    if with_inputs:
        np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32))
        inputs = tmp_path / "x.npz"
    source = load_source(str(model_file), None, inputs)
    configured = build_pass("quantize", parameters)
    configured = checked_for_host(configured, source)
    before = copy_model(source.model)
    outcome = configured(source.model)
    shift = output_shift(run(before, source.inputs), run(source.model, source.inputs), ["y"])
    return source.model, outcome, shift


@pytest.mark.parametrize("precision", ["int8", "int8-dynamic"])
def test_int8_forms_run_within_their_gate(tmp_path, run, checked_for_host, precision):
    model, outcome, shift = _quantized(tmp_path, run, checked_for_host, {"precision": precision})
    ops = {node.op_type for node in model.graph}
    assert (
        {"QuantizeLinear", "DequantizeLinear"} if precision == "int8" else {"DynamicQuantizeLinear"}
    ) & ops
    assert outcome.modified and failures(shift, GATES[precision]) == []


def test_excluded_weights_stay_in_float(tmp_path, run, checked_for_host):
    model, _, _ = _quantized(
        tmp_path, run, checked_for_host, {"precision": "int8-dynamic", "exclude": ["w2"]}
    )
    readers = {
        node.op_type for node in model.graph if any(v is not None and v.name == "w2" for v in node.inputs)
    }
    assert readers == {"MatMul"}


def test_static_int8_on_made_up_inputs_is_refused(tmp_path, run, checked_for_host):
    with pytest.raises(UserError, match="real calibration data"):
        _quantized(tmp_path, run, checked_for_host, {"precision": "int8"}, with_inputs=False)


def test_an_unknown_precision_is_refused():
    with pytest.raises(UserError, match="unknown precision"):
        build_pass("quantize", {"precision": "int3"})
