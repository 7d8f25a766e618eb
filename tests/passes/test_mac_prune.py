"""mac-prune on a hand-built CNN: every run draws which pixels to drop, the pixels the occlusion map
ranks highest are always kept, and the graph says which it kept (its pixel_keep output)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from redux_edge.errors import UserError
from redux_edge.frontend import load_source
from redux_edge.passes import build_pass


def _cnn(path):
    """image [N, 1, 8, 8] -> Conv 3x3 (4 channels) -> ReLU -> GlobalAveragePool -> Flatten -> logits."""
    weight = np.random.default_rng(3).standard_normal((4, 1, 3, 3)).astype(np.float32)
    graph = oh.make_graph(
        [
            oh.make_node("Conv", ["image", "w"], ["c"], pads=[1, 1, 1, 1]),
            oh.make_node("Relu", ["c"], ["r"]),
            oh.make_node("GlobalAveragePool", ["r"], ["p"]),
            oh.make_node("Flatten", ["p"], ["logits"]),
        ],
        "cnn",
        [oh.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [oh.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 4])],
        initializer=[onnx.numpy_helper.from_array(weight, "w")],
    )
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9), path)
    return path


def _protected(tmp_path, checked_for_host, parameters: dict):
    images = np.zeros((16, 1, 8, 8), np.float32)
    images[:, :, 2:6, 2:6] = np.random.default_rng(0).random((16, 1, 4, 4))  # all signal in the centre
    np.savez(tmp_path / "images.npz", image=images)
    source = load_source(str(_cnn(tmp_path / "cnn.onnx")), None, tmp_path / "images.npz")
    configured = build_pass("mac-prune", parameters)
    configured = checked_for_host(configured, source)
    return source, configured(source.model)


def test_critical_pixels_are_always_kept_and_the_others_dropped_at_the_rate(tmp_path, run, checked_for_host):
    source, outcome = _protected(tmp_path, checked_for_host, {"drop": 0.5, "keep_top": 0.25})
    assert outcome.critical.sum() == 16 and outcome.critical[2:6, 2:6].all()  # the centre carries the signal
    outputs = [name.name for name in source.model.graph.outputs]
    assert outputs == ["logits", "pixel_keep"]
    keeps = np.stack([run(source.model, source.inputs)[1] for _ in range(20)]).reshape(-1, 8, 8)
    assert keeps[:, outcome.critical].all()
    dropped = 1 - keeps[:, ~outcome.critical].mean()
    assert 0.4 <= dropped <= 0.6


def test_protecting_a_protected_model_is_refused(tmp_path, checked_for_host):
    source, _ = _protected(tmp_path, checked_for_host, {"keep_top": 0.25})
    again = build_pass("mac-prune", {"keep_top": 0.0})
    with pytest.raises(UserError, match="already protected"):
        again(source.model)
