"""A user's ONNX file is untrusted: each way it can be wrong is a UserError, and good files load."""

from __future__ import annotations

import contextlib
import io
import json
import zipfile

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir
import pytest
import torch
from conftest import assert_clean_user_error
from graphs import make_mlp_onnx

from redux_edge import api
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
    with pytest.raises(UserError, match=r"leads outside its folder|not relative to its folder"):
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


class _Residual(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)) + x)


def _saved_program(path):
    torch.manual_seed(0)
    batch = torch.export.Dim("batch")
    program = torch.export.export(_Residual().eval(), (torch.randn(4, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    return program


def test_a_pt2_program_compiles_with_its_dynamic_batch_against_its_module(cli, tmp_path):
    program = _saved_program(tmp_path / "model.pt2")
    result = cli("compile", "-m", tmp_path / "model.pt2", "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["verify"]["reference"] == "pytorch (torch.export program)"
    assert manifest["inputs"][0]["name"] == "x" and not isinstance(manifest["inputs"][0]["shape"][0], int)
    feeds = np.random.default_rng(1).standard_normal((7, 8)).astype(np.float32)
    np.savez(tmp_path / "seven.npz", x=feeds)
    outputs, _ = api.run(tmp_path / "out", tmp_path / "seven.npz")
    expected = program.module()(torch.from_numpy(feeds)).detach().numpy()
    assert np.abs(outputs["output"] - expected).max() <= 1e-5


def _rewritten(source, target, change) -> None:
    """A copy of the .pt2 archive ``source`` with ``change(name, data) -> (name, data) | None`` applied."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as copy:
        for name in original.namelist():
            if (changed := change(name, original.read(name))) is not None:
                copy.writestr(*changed)


def test_a_pt2_that_would_unpickle_or_does_not_load_is_refused(cli, tmp_path):
    _saved_program(tmp_path / "good.pt2")
    parent = tmp_path / "runs"
    parent.mkdir()

    def pickled_weight(name, data):
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            next(iter(config["config"].values()))["use_pickle"] = True
            return name, json.dumps(config)
        return name, data

    def evil_inputs(name, data):
        if name.endswith("sample_inputs/model.pt"):
            buffer = io.BytesIO()
            torch.save({"not": _Residual}, buffer)  # a class: only a full unpickle can load it
            return name, buffer.getvalue()
        return name, data

    cases = {
        "pickled.pt2": (pickled_weight, "is stored as a pickled object"),
        "inputs.pt2": (evil_inputs, "its sample inputs are not plain tensors"),
        "legacy.pt2": (lambda n, d: None if n.endswith("archive_format") else (n, d), "legacy layout"),
    }
    for file_name, (change, message) in cases.items():
        _rewritten(tmp_path / "good.pt2", tmp_path / file_name, change)
        assert_clean_user_error(
            cli("compile", "-m", tmp_path / file_name, "-o", parent / "out"), parent, message=message
        )
    (tmp_path / "garbage.pt2").write_bytes(b"not a zip")
    result = cli("compile", "-m", tmp_path / "garbage.pt2", "-o", parent / "out")
    assert_clean_user_error(result, parent, message="not a zip archive")


def _static_batch_model(outputs: list[onnx.NodeProto], shape: list[int]) -> onnx_ir.Model:
    weight = onnx.numpy_helper.from_array(np.arange(24, dtype=np.float32).reshape(8, 3), "w")
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w"], ["y"]), *outputs],
        "static",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])],
        [oh.make_tensor_value_info(outputs[-1].output[0] if outputs else "y", onnx.TensorProto.FLOAT, shape)],
        initializer=[weight],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9)
    return onnx_ir.from_proto(model)


def test_a_static_batch_file_runs_any_number_of_rows_in_slices():
    """Analyses feed whole calibration and evaluation sets; a file fixed at batch 2 takes 5 rows."""
    from redux_edge.analysis import in_memory_runner

    rows = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    (got,) = in_memory_runner(_static_batch_model([], [2, 3]))({"x": rows})
    weight = np.arange(24, dtype=np.float32).reshape(8, 3)
    np.testing.assert_allclose(got, rows @ weight, rtol=1e-5)
    summed = _static_batch_model([oh.make_node("ReduceSum", ["y"], ["total"], keepdims=0)], [])
    with pytest.raises(UserError, match="has no batch axis"):
        in_memory_runner(summed)({"x": rows})
