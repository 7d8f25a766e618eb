"""A user's ONNX file is untrusted: each way it can be wrong is a UserError, and good files load."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from conftest import make_mlp_onnx

from redux_edge.errors import UserError
from redux_edge.frontend.onnx import load_onnx


def test_a_valid_file_loads_with_its_signature(tmp_path):
    model = load_onnx(make_mlp_onnx(tmp_path / "mlp.onnx"))
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert len(model.graph) == 4


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_onnx(tmp_path / "nope.onnx")


def test_malformed_file(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"this is not a protobuf \xff\xfe at all" * 10)
    with pytest.raises(UserError, match="not a valid ONNX model"):
        load_onnx(path)


def test_truncated_file(tmp_path):
    full = make_mlp_onnx(tmp_path / "full.onnx").read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(UserError, match=r"not a valid ONNX model|fails the ONNX checker"):
        load_onnx(path)


def _single_node_model(path, node: onnx.NodeProto, opsets) -> None:
    graph = oh.make_graph(
        [node],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    onnx.save(oh.make_model(graph, opset_imports=opsets), path)


def test_operator_from_an_unknown_domain_is_unsupported(tmp_path):
    path = tmp_path / "custom.onnx"
    _single_node_model(
        path,
        oh.make_node("Frobnicate", ["x"], ["y"], domain="com.example"),
        [oh.make_opsetid("", 17), oh.make_opsetid("com.example", 1)],
    )
    with pytest.raises(UserError, match=r"unsupported operator com.example::Frobnicate"):
        load_onnx(path)


def test_unknown_standard_operator_is_rejected(tmp_path):
    path = tmp_path / "unknown.onnx"
    _single_node_model(path, oh.make_node("Frobnicate", ["x"], ["y"]), [oh.make_opsetid("", 17)])
    with pytest.raises(UserError, match="Frobnicate"):
        load_onnx(path)


def _with_external_weights(tmp_path, location: str):
    weights = onnx.numpy_helper.from_array(np.ones((2,), np.float32), "w")
    graph = oh.make_graph(
        [oh.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
        initializer=[weights],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(model, folder / "m.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0)
    if location != "weights.bin":
        proto = onnx.load(folder / "m.onnx", load_external_data=False)
        for entry in proto.graph.initializer[0].external_data:
            if entry.key == "location":
                entry.value = location
        onnx.save(proto, folder / "m.onnx")
    return folder / "m.onnx"


def test_external_data_inside_the_folder_loads(tmp_path):
    model = load_onnx(_with_external_weights(tmp_path, "weights.bin"))
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), [1.0, 1.0])


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin"])
def test_external_data_may_not_escape_the_folder(tmp_path, location):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 8)
    with pytest.raises(UserError, match="outside the model's folder"):
        load_onnx(_with_external_weights(tmp_path, location))


def test_missing_external_data(tmp_path):
    path = _with_external_weights(tmp_path, "weights.bin")
    (path.parent / "weights.bin").unlink()
    with pytest.raises(UserError, match="missing"):
        load_onnx(path)


def test_models_with_external_data_compile_as_torch_and_onnx_write_them(cli, tmp_path):
    """onnx.save's external data, and torch.onnx.export(dynamo=True)'s model.onnx + model.onnx.data."""
    import torch

    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save_model(
        onnx.load(make_mlp_onnx(tmp_path / "mlp.onnx")),
        folder / "mlp.onnx",
        save_as_external_data=True,
        location="mlp.onnx.data",
        size_threshold=0,
    )
    network = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates on stdout
        torch.onnx.export(
            network, (torch.randn(2, 16),), str(folder / "net.onnx"), dynamo=True, input_names=["x"]
        )
    assert (folder / "net.onnx.data").is_file()
    for name, shapes in (("mlp", "x:3x8"), ("net", "x:2x16")):
        out = tmp_path / name
        result = cli("compile", "-m", folder / f"{name}.onnx", "--shapes", shapes, "-o", out, "--json")
        assert result.exit_code == 0, result.stderr
        manifest = json.loads(result.stdout)
        assert all(numbers["max_abs"] <= 1e-5 for numbers in manifest["verify"]["artifact"].values())
        assert not [path for path in out.rglob("*.data")]  # the bundle's model.onnx is one file
