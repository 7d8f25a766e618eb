"""Verification that cannot be fooled and inputs refused before they cost anything (issue 19)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from conftest import (
    assert_clean_user_error,
    assert_one_error_line,
    make_nan_onnx,
    tiny_file_system,
)
from graphs import make_mlp_onnx

from redux_edge.runtime.tolerance import Tolerance, compare, mismatch


def _declared_shape_model(path, dims, elem_type=onnx.TensorProto.FLOAT):
    """y = x, with the input's shape and element type as declared."""
    graph = oh.make_graph(
        [oh.make_node("Identity", ["x"], ["y"])],
        "g",
        [oh.make_tensor_value_info("x", elem_type, dims)],
        [oh.make_tensor_value_info("y", elem_type, dims)],
    )
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), path)
    return path


def test_a_model_that_computes_nan_does_not_verify(cli, tmp_path):
    result = cli("compile", "--model", make_nan_onnx(tmp_path / "nan.onnx"), "-o", tmp_path / "out")
    assert_clean_user_error(result, tmp_path, message="NaN/inf")


@pytest.mark.parametrize(
    ("reference", "actual", "why"),
    [
        ([[1.0, 2.0]], [[1.0, np.nan]], "NaN/inf values where the reference has none"),
        ([[1.0, np.inf]], [[1.0, np.inf]], "the reference's output 'y' holds 1 NaN/inf"),
        ([[np.nan, 2.0]], [[np.nan, 2.0]], "the reference's output 'y' holds 1 NaN/inf"),
        (np.zeros((1, 0)), np.zeros((1, 0)), "has no elements"),
    ],
)
def test_nan_inf_and_empty_outputs_never_match(reference, actual, why):
    report = compare([np.asarray(reference, np.float32)], [np.asarray(actual, np.float32)], ["y"])
    assert why in mismatch(report, Tolerance())
    # The numbers stay finite, so the manifest that records them is valid JSON.
    assert all(np.isfinite(value) for value in report["y"].values())


def test_finite_outputs_still_match():
    outputs = [np.arange(6, dtype=np.float32).reshape(2, 3)]
    assert mismatch(compare(outputs, outputs, ["y"]), Tolerance()) == ""


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ("x:0x8", "every dimension must be at least 1"),
        ("x:-1x8", "every dimension must be at least 1"),
        ("x:100000x100000", "would take 37.3 GiB"),
    ],
)
def test_shapes_that_are_empty_negative_or_huge_are_refused_before_allocating(cli, tmp_path, shapes, message):
    mlp = make_mlp_onnx(tmp_path / "mlp.onnx", hidden=4)
    # The MLP's batch is symbolic, so --shapes may set it; its feature axis is 8.
    result = cli("compile", "--model", mlp, "--shapes", shapes, "-o", tmp_path / "out")
    assert_clean_user_error(result, tmp_path, message=message)


@pytest.mark.parametrize(
    ("dims", "message"),
    [([1 << 40, 8], "would take 32,768.0 GiB"), ([8, 1 << 40], "would take 32,768.0 GiB")],
)
def test_a_declared_input_dimension_that_cannot_be_sampled_is_refused(cli, tmp_path, dims, message):
    model = _declared_shape_model(tmp_path / "m.onnx", dims)
    result = cli("compile", "--model", model, "-o", tmp_path / "out")
    assert_clean_user_error(result, tmp_path, message=message)


def test_force_refuses_a_directory_that_is_not_a_bundle(cli, tmp_path):
    mlp = make_mlp_onnx(tmp_path / "mlp.onnx", hidden=4)
    mine = tmp_path / "d"
    mine.mkdir()
    (mine / "important.txt").write_text("x")
    result = cli("compile", "--model", mlp, "--force", "-o", mine)
    assert result.exit_code == 2 and "replaces only a redux-edge bundle" in result.stderr
    assert "important.txt" in result.stderr and (mine / "important.txt").read_text() == "x"


def test_force_refuses_a_bundle_holding_files_its_manifest_does_not_list(cli, tmp_path):
    mlp = make_mlp_onnx(tmp_path / "mlp.onnx", hidden=4)
    out = tmp_path / "out"
    assert cli("compile", "--model", mlp, "-o", out).exit_code == 0
    (out / "notes.txt").write_text("mine")
    result = cli("compile", "--model", mlp, "--force", "-o", out)
    assert result.exit_code == 2 and "notes.txt" in result.stderr
    assert (out / "notes.txt").read_text() == "mine" and (out / "manifest.json").is_file()


def test_force_fills_an_empty_directory(cli, tmp_path):
    mlp = make_mlp_onnx(tmp_path / "mlp.onnx", hidden=4)
    (tmp_path / "out").mkdir()
    assert cli("compile", "--model", mlp, "--force", "-o", tmp_path / "out").exit_code == 0
    assert (tmp_path / "out" / "manifest.json").is_file()


def _dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    return int(finished.stdout)


def test_a_later_compile_sweeps_what_killed_compiles_left_and_restores_a_set_aside_bundle(cli, tmp_path):
    mlp = make_mlp_onnx(tmp_path / "mlp.onnx", hidden=4)
    host, pid = platform.node(), _dead_pid()
    staging = tmp_path / f".out.partial-{host}-{pid}-abc"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(b"\0" * 1000)
    set_aside = tmp_path / f".kept.previous-{host}-{pid}-def"
    set_aside.mkdir()
    (set_aside / "manifest.json").write_text("{}")
    running = tmp_path / f".other.partial-{host}-{os.getpid()}-ghi"  # a live compile's: left alone
    running.mkdir()
    assert cli("compile", "--model", mlp, "-o", tmp_path / "out").exit_code == 0
    assert not staging.exists() and running.exists()
    assert (tmp_path / "kept" / "manifest.json").read_text() == "{}" and not set_aside.exists()


def test_sigterm_during_a_compile_removes_its_staging_directory(tmp_path):
    mlp = make_mlp_onnx(tmp_path / "mlp.onnx", hidden=4)
    compile_argv = [sys.executable, "-m", "redux_edge.cli", "compile", "--model", mlp, "-o", tmp_path / "out"]
    process = subprocess.Popen(compile_argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while (
        not list(tmp_path.glob(".out.partial-*")) and process.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the compile finished before SIGTERM arrived")
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert b"Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]


def test_a_file_dropped_into_a_bundle_is_refused_by_inspect_run_and_the_runner(cli, tmp_path):
    mlp = make_mlp_onnx(tmp_path / "mlp.onnx", hidden=4)
    out = tmp_path / "out"
    assert cli("compile", "--model", mlp, "-o", out).exit_code == 0
    marker = tmp_path / "imported"
    (out / "runner" / "numpy.py").write_text(f"open({str(marker)!r}, 'w').close()\n")

    inspected = cli("inspect", out, "--json")
    assert inspected.exit_code == 2
    assert "runner/numpy.py: not listed in the manifest" in json.loads(inspected.stdout)["file_problems"]
    ran = cli("run", out)
    assert ran.exit_code == 2 and "runner/numpy.py" in ran.stderr
    runner = subprocess.run(
        [sys.executable, out / "runner" / "run.py", "--check"], capture_output=True, text=True, timeout=120
    )
    assert runner.returncode == 2 and "does not list (runner/numpy.py)" in runner.stderr
    assert not marker.exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["train-adapters.toml", "--set", "adapters.bits=3"], "at 3 bits"),  # found by the ranks
        (["train-shrp.toml", "--set", "model=gpt-17"], "unknown model 'gpt-17'"),
        (["train-recover.toml", "--plan", "{plan}"], "cannot read plan"),
        (["train-shrp.toml", "--nproc-per-node", "0"], "0 is not in the range"),
    ],
)
@pytest.mark.slow
def test_train_refusing_its_input_leaves_no_output_behind(cli, tmp_path, arguments, message):
    (tmp_path / "plan.json").write_text("{")
    recipe, *options = arguments
    recipe_path = Path(__file__).parent.parent / "models" / "minilm-l6" / recipe
    options = [option.format(plan=tmp_path / "plan.json") for option in options]
    result = cli("train", recipe_path, *options, "-o", tmp_path / "out")
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


# --- the `internal error` families of issue 19: each is exit 2 and one error line with a hint -----------


def _invalid_utf8_model(path):
    model = onnx.load(make_mlp_onnx(path, hidden=4))
    model.graph.name = "mlpZZ"
    path.write_bytes(model.SerializeToString().replace(b"mlpZZ", b"ml\xff\xfeZ"))
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_invalid_utf8_model, "model.graph.name is not UTF-8 text"),
        (lambda p: _declared_shape_model(p, [2], onnx.TensorProto.STRING), "model input 'x' is STRING"),
        (lambda p: _declared_shape_model(p, [2], onnx.TensorProto.BFLOAT16), "model input 'x' is BFLOAT16"),
    ],
    ids=["invalid utf-8", "string input", "bfloat16 input"],
)
def test_onnx_files_the_tool_cannot_read_are_user_errors(cli, tmp_path, make, message):
    model = make(tmp_path / "m.onnx")
    assert_clean_user_error(
        cli("compile", "--model", model, "-o", tmp_path / "out"), tmp_path, message=message
    )


@pytest.fixture(scope="module")
def mlp_bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlp")
    from redux_edge.cli import main

    assert main(["compile", "--model", str(make_mlp_onnx(folder / "mlp.onnx")), "-o", str(folder / "b")]) == 0
    return folder / "b"


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"caf\xe9\n", "is not UTF-8 text (byte 0xe9 at offset 3)"), (bytes(range(256)), "is not UTF-8 text")],
    ids=["latin-1 text", "binary file"],
)
def test_run_on_text_that_is_not_utf8(cli, tmp_path, minilm_bundle, content, message):
    (tmp_path / "in.txt").write_bytes(content)
    assert_one_error_line(cli("run", minilm_bundle, tmp_path / "in.txt"), message)


@pytest.mark.parametrize(
    ("ids", "message"),
    [(np.full((1, 8), 99999), "idx=99999 must be within"), (np.ones((1, 1000)), "512 by 1000")],
    ids=["token id outside the vocabulary", "sequence longer than the model takes"],
)
def test_run_on_token_ids_the_model_cannot_take(cli, tmp_path, minilm_bundle, ids, message):
    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones(ids.shape, np.int64)}
    np.savez(tmp_path / "ids.npz", **feeds)
    assert_one_error_line(cli("run", minilm_bundle, tmp_path / "ids.npz"), message)


def test_run_casts_only_where_no_value_changes_and_says_so(cli, tmp_path, mlp_bundle):
    np.savez(tmp_path / "exact.npz", x=np.arange(16, dtype=np.int64).reshape(2, 8))
    exact = cli("run", mlp_bundle, tmp_path / "exact.npz")
    assert exact.exit_code == 0 and "note: input 'x' given as int64, cast to float32" in exact.stderr
    np.savez(tmp_path / "lossy.npz", x=np.random.default_rng(0).random((2, 8)))
    assert_one_error_line(
        cli("run", mlp_bundle, tmp_path / "lossy.npz"), "has dtype float64 and its values do not all fit"
    )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(files=list(m["files"])), "files: ["),
        (lambda m: m.pop("backend"), "'backend' is a required property"),
        (lambda m: m.update(inputs="garbage"), "inputs: 'garbage' is not of type 'array'"),
        (lambda m: m.update(format_version="1"), "has bundle format '1', this redux-edge reads 2"),
        (lambda m: m.update(recipe="cleanup"), "recipe: 'cleanup' is not of type 'object'"),
        (lambda m: m["verify"]["ir"]["y"].pop("min_cosine"), "verify/ir/y"),
    ],
    ids=[
        "files a list",
        "no backend",
        "inputs a string",
        "format version a string",
        "recipe a string",
        "no cosine",
    ],
)
def test_manifests_of_the_wrong_shape(cli, tmp_path, mlp_bundle, edit, message):
    shutil.copytree(mlp_bundle, tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    edit(manifest)
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    for command in ("inspect", "run"):
        assert_one_error_line(cli(command, tmp_path / "b"), message)


def test_a_whole_manifest_that_is_a_list(cli, tmp_path, mlp_bundle):
    shutil.copytree(mlp_bundle, tmp_path / "b")
    (tmp_path / "b" / "manifest.json").write_text("[1, 2]")
    assert_one_error_line(cli("inspect", tmp_path / "b"), "is not of type 'object'")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", "is list, not a table"),
        ('"cleanup"', "is str, not a table"),
        ("null", "is null, not a table"),
        ('{"recipe": "cleanup"}', "is str, not a table"),
    ],
)
def test_json_recipes_that_are_not_tables(cli, tmp_path, content, message):
    (tmp_path / "r.json").write_text(content)
    mlp = make_mlp_onnx(tmp_path / "mlp.onnx", hidden=4)
    result = cli("compile", "--model", mlp, "--recipe", tmp_path / "r.json", "-o", tmp_path / "out")
    assert_clean_user_error(result, tmp_path, message=message)


def test_a_recipe_number_below_its_minimum(cli, tmp_path):
    (tmp_path / "r.toml").write_text('[[passes]]\npass = "cleanup"\niterations = -5\n')
    mlp = make_mlp_onnx(tmp_path / "mlp.onnx", hidden=4)
    result = cli("compile", "--model", mlp, "--recipe", tmp_path / "r.toml", "-o", tmp_path / "out")
    assert_clean_user_error(result, tmp_path, message="'iterations' must be at least 1, got -5")


@pytest.mark.parametrize(
    "arguments",
    [
        ["bench", "{bundle}", "--iterations", "0"],
        ["bench", "{bundle}", "--iterations", "-1"],
        ["bench", "{bundle}", "--threads", "0"],
        ["bench", "{bundle}", "--threads", "-3"],
        ["bench", "{bundle}", "--threads", "100000"],
        ["compile", "--model", "mnist-cnn", "--threads", "0", "-o", "{out}"],
    ],
)
def test_numbers_outside_their_range_are_refused_where_they_come_in(cli, tmp_path, mlp_bundle, arguments):
    argv = [a.format(bundle=mlp_bundle, out=tmp_path / "out") for a in arguments]
    result = cli(*argv)
    assert result.exit_code == 2 and "is not in the range" in result.stderr
    assert not (tmp_path / "out").exists()


def test_run_output_that_cannot_be_written(cli, tmp_path, mlp_bundle):
    (tmp_path / "folder").mkdir()
    assert_one_error_line(cli("run", mlp_bundle, "--output", tmp_path / "folder"), "is a directory")
    assert list((tmp_path / "folder").iterdir()) == []
    assert_one_error_line(
        cli("run", mlp_bundle, "--output", "/proc/outputs.npz"), "cannot write /proc/outputs.npz"
    )


def test_run_output_on_a_full_disk_leaves_no_empty_file(cli, mlp_bundle, tmp_path):
    with tiny_file_system(tmp_path / "tiny", "4k") as tiny:
        (tiny / "filler").write_bytes(b"\0" * 4096)
        assert_one_error_line(cli("run", mlp_bundle, "--output", tiny / "out.npz"), "cannot write")
        assert sorted(p.name for p in tiny.iterdir()) == ["filler"]


def test_an_unclosed_ipv6_address(cli, env):
    result = cli("devices", "add", "x", "--target", "host", "--address", "ssh://u@[::1", "--root", "/tmp/x")
    assert_one_error_line(result, "Invalid IPv6 URL")


@pytest.mark.parametrize("output", [".", ".."])
def test_output_that_is_the_current_directory(cli, tmp_path, monkeypatch, output):
    monkeypatch.chdir(tmp_path)
    result = cli(
        "compile", "--model", make_mlp_onnx(tmp_path / "mlp.onnx", hidden=4), "--force", "-o", output
    )
    assert_one_error_line(result, "is the current directory or one above it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]


def test_a_full_tmpdir_during_a_compile(cli, tmp_path, monkeypatch):
    mlp = make_mlp_onnx(tmp_path / "mlp.onnx", hidden=4096)  # 200 KB: more than TMPDIR holds
    with tiny_file_system(tmp_path / "tiny", "8k") as tiny:
        monkeypatch.setenv("TMPDIR", str(tiny))
        monkeypatch.setattr(tempfile, "tempdir", None)  # tempfile reads TMPDIR once per process
        result = cli("compile", "--model", mlp, "-o", tmp_path / "out")
        assert_one_error_line(result, "No space left on device")
        assert "TMPDIR" in result.stderr and not (tmp_path / "out").exists()
        assert list(tiny.iterdir()) == []


def test_a_damaged_runner_archive_is_refused_in_one_line_wherever_the_byte_is(cli, tmp_path):
    mlp = make_mlp_onnx(tmp_path / "mlp.onnx", hidden=4)
    out = tmp_path / "out"
    assert cli("compile", "--model", mlp, "-o", out).exit_code == 0
    archive = out / "runner" / "run.pyz"
    pristine = archive.read_bytes()
    # Offsets over the whole archive: local headers, compressed members, the central directory.
    for offset in np.linspace(0, len(pristine) - 1, 40).astype(int):
        damaged = bytearray(pristine)
        damaged[offset] ^= 0xFF
        archive.write_bytes(bytes(damaged))
        runner = subprocess.run(
            [sys.executable, out / "runner" / "run.py", "--help"], capture_output=True, text=True, timeout=60
        )
        errors = [line for line in runner.stderr.splitlines() if line.startswith("error:")]
        assert "Traceback" not in runner.stderr, (offset, runner.stderr)
        assert runner.returncode == 2 and len(errors) == 1 and "damaged" in errors[0], (offset, runner.stderr)
