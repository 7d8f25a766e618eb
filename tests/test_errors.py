"""The user-error contract: one line, exit code 2, no traceback, and nothing left behind."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from conftest import assert_clean_user_error, make_nan_onnx
from graphs import make_mlp_onnx


@pytest.fixture
def mlp(tmp_path):
    return make_mlp_onnx(tmp_path / "mlp.onnx")


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _custom_op_model(path):
    graph = oh.make_graph(
        [oh.make_node("Frobnicate", ["x"], ["y"], domain="com.example")],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    onnx.save(
        oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("com.example", 1)]), path
    )
    return path


def _vector_model(path):
    graph = oh.make_graph(
        [oh.make_node("Relu", ["x"], ["y"])],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [8])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [8])],
    )
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9), path)
    return path


CASES = {
    "unknown model": (lambda d, mlp: ["--model", "gpt-17"], "unknown model 'gpt-17'"),
    "unknown target": (lambda d, mlp: ["--model", mlp, "--target", "cray-1"], "unknown target 'cray-1'"),
    "tensorrt without a gpu": (
        lambda d, mlp: ["--model", mlp, "--target", "host", "--backend", "tensorrt"],
        "TensorRT needs an NVIDIA GPU, and target host has none",
    ),
    "backend the target does not use": (
        lambda d, mlp: ["--model", mlp, "--target", "jetson-orin-nano", "--backend", "openvino"],
        "does not use the openvino backend",
    ),
    "precision the backend lacks": (
        lambda d, mlp: ["--model", mlp, "--precision", "int4"],
        "has no precision 'int4'",
    ),
    "unknown pass": (lambda d, mlp: ["--model", mlp, "--pass", "shrink-ray"], "unknown pass 'shrink-ray'"),
    "unknown pass parameter": (
        lambda d, mlp: ["--model", mlp, "--pass", "cleanup:turbo=1"],
        "has no parameter",
    ),
    "unknown recipe key": (
        lambda d, mlp: ["--model", mlp, "--recipe", _write(d / "r.toml", b'flavour = "x"\n')],
        "unknown recipe key flavour",
    ),
    "missing onnx": (lambda d, mlp: ["--model", d / "absent.onnx"], "does not exist"),
    "malformed onnx": (
        lambda d, mlp: ["--model", _write(d / "bad.onnx", b"\x08\x07garbage" * 50)],
        "not a valid ONNX model",
    ),
    "truncated onnx": (
        lambda d, mlp: ["--model", _write(d / "cut.onnx", mlp.read_bytes()[:300])],
        "not a valid ONNX model",
    ),
    "unsupported operator": (
        lambda d, mlp: ["--model", _custom_op_model(d / "custom.onnx")],
        "unsupported operator com.example::Frobnicate",
    ),
    "wrong input shape": (lambda d, mlp: ["--model", mlp, "--shapes", "x:2x9"], "wrong input"),
    "wrong input rank": (lambda d, mlp: ["--model", mlp, "--shapes", "x:9"], "wrong input"),
    "shape of an unknown input": (lambda d, mlp: ["--model", mlp, "--shapes", "z:1x8"], "unknown inputs"),
    "unreadable shape": (lambda d, mlp: ["--model", mlp, "--shapes", "x:axb"], "cannot read shape"),
    "tolerance outside its range": (
        lambda d, mlp: ["--model", mlp, "--tolerance-cosine", "1.5"],
        "1.5 is not in the range 0<=x<=1",
    ),
    "negative tolerance": (
        lambda d, mlp: ["--model", mlp, "--tolerance-atol", "-1"],
        "not in the range x>=0",
    ),
    "threads below one": (lambda d, mlp: ["--model", mlp, "--threads", "0"], "not in the range 1<=x<=256"),
    "unknown option": (lambda d, mlp: ["--model", mlp, "--frobnicate"], "No such option"),
    "unknown evaluation task": (lambda d, mlp: ["--model", mlp, "--eval-task", "regression"], "--eval-task"),
    "classification of an output that is not logits": (
        lambda d, mlp: ["--model", _vector_model(d / "vector.onnx"), "--eval-task", "classification"],
        "reads the first output as logits [batch, classes], but it is [8]",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_compile_user_errors(cli, tmp_path, mlp, case):
    arguments, message = CASES[case]
    argv = arguments(tmp_path, mlp)
    result = cli("compile", *argv, "-o", tmp_path / "out")
    assert_clean_user_error(result, tmp_path, message=message)


def test_existing_output_needs_force(cli, tmp_path, mlp):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = cli("compile", "--model", mlp, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "already exists" in result.stderr and "--force" in result.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_output_that_cannot_be_written(cli, tmp_path, mlp):
    (tmp_path / "afile").write_text("not a directory")
    result = cli("compile", "--model", mlp, "-o", tmp_path / "afile" / "out")
    assert result.exit_code == 2
    assert "cannot write to" in result.stderr and "Traceback" not in result.stderr


def test_failed_forced_compile_keeps_the_previous_bundle(cli, tmp_path, mlp):
    out = tmp_path / "out"
    assert cli("compile", "--model", mlp, "-o", out).exit_code == 0
    before = (out / "manifest.json").read_text()
    # A model whose outputs are NaN fails verification while its bundle is being built.
    failed = cli("compile", "--model", make_nan_onnx(tmp_path / "nan.onnx"), "-o", out, "--force")
    assert failed.exit_code == 2 and "NaN/inf" in failed.stderr
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "nan.onnx", "out"]


def test_forced_compile_replaces_the_bundle(cli, tmp_path, mlp):
    out = tmp_path / "out"
    cli("compile", "--model", mlp, "-o", out)
    (out / "model.onnx").write_bytes(b"edited")
    result = cli("compile", "--model", mlp, "-o", out, "--force", "--json")
    assert result.exit_code == 0
    assert (out / "model.onnx").read_bytes() != b"edited"
    assert (
        json.loads(result.stdout)["files"].keys()
        == json.loads((out / "manifest.json").read_text())["files"].keys()
    )


def test_debug_shows_the_traceback(cli, tmp_path):
    result = cli("--debug", "compile", "--model", "gpt-17", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "error: unknown model" in result.stderr


@pytest.fixture
def mlp_bundle(cli, tmp_path, mlp):
    out = tmp_path / "bundle"
    assert cli("compile", "--model", mlp, "-o", out).exit_code == 0
    return out


def test_run_with_wrong_input_shape(cli, tmp_path, mlp_bundle):
    np.save(tmp_path / "x.npy", np.zeros((2, 9), np.float32))
    result = cli("run", mlp_bundle, tmp_path / "x.npy")
    assert (
        result.exit_code == 2 and "wrong input" in result.stderr and "expected ['batch', 8]" in result.stderr
    )


def test_run_with_wrong_input_dtype(cli, tmp_path, mlp_bundle):
    np.save(tmp_path / "x.npy", np.array([["a"] * 8]))
    result = cli("run", mlp_bundle, tmp_path / "x.npy")
    assert result.exit_code == 2 and "dtype" in result.stderr


def test_run_refuses_pickled_npy(cli, tmp_path, mlp_bundle):
    np.save(tmp_path / "x.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    result = cli("run", mlp_bundle, tmp_path / "x.npy")
    assert result.exit_code == 2 and "Traceback" not in result.stderr


def test_run_text_on_a_model_without_a_text_reader(cli, tmp_path, mlp_bundle):
    (tmp_path / "in.txt").write_text("hello")
    result = cli("run", mlp_bundle, tmp_path / "in.txt")
    assert result.exit_code == 2 and "no reader" in result.stderr


def test_run_on_a_directory_that_is_not_a_bundle(cli, tmp_path):
    result = cli("run", tmp_path)
    assert result.exit_code == 2 and "is not a bundle" in result.stderr


def test_tampered_bundle_is_detected(cli, mlp_bundle):
    with (mlp_bundle / "model.onnx").open("ab") as handle:
        handle.write(b"\0")
    inspected = cli("inspect", mlp_bundle)
    assert inspected.exit_code == 2 and "model.onnx" in inspected.stdout
    ran = cli("run", mlp_bundle)
    assert ran.exit_code == 2 and "damaged" in ran.stderr


def test_bundle_paths_may_not_escape(cli, mlp_bundle):
    manifest = json.loads((mlp_bundle / "manifest.json").read_text())
    manifest["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
    (mlp_bundle / "manifest.json").write_text(json.dumps(manifest))
    result = cli("inspect", mlp_bundle)
    assert result.exit_code == 2 and "outside itself" in result.stderr


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs: a real file system that runs out of space (needs root, as in CI)."""
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)


def test_full_disk_is_a_clear_error_and_leaves_nothing(cli, full_disk):
    result = cli("compile", "--model", "mnist-cnn", "-o", full_disk / "out")
    assert_clean_user_error(result, full_disk, message="No space left on device")
    assert list(full_disk.iterdir()) == []


def test_an_explicit_zero_tolerance_is_the_bound_used(cli, tmp_path, mlp):
    result = cli("compile", "-m", mlp, "--tolerance-cosine", "0", "-o", tmp_path / "zero", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["verify"]["tolerance"]["min_cosine"] == 0.0
    exact = cli("compile", "-m", mlp, "--tolerance-atol", "0", "-o", tmp_path / "exact", "--json")
    # atol 0 is bit-exact: either the artifact is, or the compile is refused saying by how much it is not.
    if exact.exit_code == 0:
        assert json.loads(exact.stdout)["verify"]["tolerance"]["atol"] == 0.0
    else:
        assert_clean_user_error(exact, tmp_path, message="max abs")
