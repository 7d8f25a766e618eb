"""The fuzz suite: seeded mutations of what users hand the tool, each through the command that reads it.

Four targets: ONNX files through ``compile``, bundles (manifest edits, unlisted files, symlinks, damaged
files) through ``inspect``, ``run`` and the bundle's own runner, recipes through ``compile --recipe``, and
input files through ``run``. The property for every case: exit 0 with a verified bundle (or outputs), or
exit 2 with one ``error:`` line; never exit 1, never a traceback, never a file written outside the
output, never a change to a bundle that was there before. Hypothesis draws the cases (derandomized, so CI
runs the same ones every time); the counts are ``EXAMPLES``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import tomli_w
from conftest import make_mlp_onnx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from redux_edge.passes import PASSES
from redux_edge.passes.contract import parameter_fields

EXAMPLES = {"onnx": 200, "bundle": 150, "recipe": 100, "inputs": 100}
RUNNER_EXAMPLES = 40  # the bundle cases that also start the runner (a process each)


def _settings(target: str):
    return settings(
        max_examples=EXAMPLES[target],
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def _tree(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` with its sha256: what must not change."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def assert_contract(result, context: str) -> None:
    event(f"exit {result.exit_code}")  # the outcome counts, in pytest --hypothesis-show-statistics
    assert result.exit_code in (0, 2), f"{context}: exit {result.exit_code}\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stdout + result.stderr, f"{context}\n{result.stderr[-2000:]}"
    assert "internal error" not in result.stderr, f"{context}\n{result.stderr[-2000:]}"
    if result.exit_code == 2:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, f"{context}\n{result.stderr}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    mlp = make_mlp_onnx(folder / "mlp.onnx", hidden=8)
    from redux_edge.cli import main

    assert main(["compile", "--model", str(mlp), "-o", str(folder / "bundle")]) == 0
    return folder


# --- ONNX files through compile ------------------------------------------------------------------------


def _byte_flips(data: bytes, draw) -> bytes:
    mutated = bytearray(data)
    for position in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
        mutated[position] ^= draw(st.integers(1, 255))
    return bytes(mutated)


def _proto_edit(data: bytes, draw) -> bytes:
    model = onnx.load_from_string(data)
    graph = model.graph
    kind = draw(st.sampled_from(["dim", "dtype", "name", "opset", "drop-node", "output"]))
    if kind == "dim":
        dims = graph.input[0].type.tensor_type.shape.dim
        dim = dims[draw(st.integers(0, len(dims) - 1))]
        dim.dim_value = draw(st.sampled_from([0, -5, 1, 3, 9, 1 << 20, 1 << 40]))
    elif kind == "dtype":
        value = draw(st.sampled_from([*graph.input, *graph.output]))
        value.type.tensor_type.elem_type = draw(st.integers(0, 25))
    elif kind == "name":
        node = graph.node[draw(st.integers(0, len(graph.node) - 1))]
        raw = draw(st.binary(min_size=1, max_size=6))
        data_with_name = model.SerializeToString()
        return data_with_name.replace(node.output[0].encode(), raw, 1)
    elif kind == "opset":
        model.opset_import[0].version = draw(st.sampled_from([0, 1, 6, 30, 999]))
    elif kind == "drop-node":
        del graph.node[draw(st.integers(0, len(graph.node) - 1))]
    else:
        graph.output[0].name = draw(st.sampled_from(["", "h1", "x", "nowhere"]))
    return model.SerializeToString()


def _external_data_edit(folder: Path, data: bytes, draw) -> Path:
    model = onnx.load_from_string(data)
    onnx.save_model(
        model, folder / "ext.onnx", save_as_external_data=True, location="ext.onnx.data", size_threshold=0
    )
    edited = onnx.load(folder / "ext.onnx", load_external_data=False)
    tensor = edited.graph.initializer[draw(st.integers(0, len(edited.graph.initializer) - 1))]
    key = draw(st.sampled_from(["location", "offset", "length"]))
    entries = {entry.key: entry for entry in tensor.external_data}
    if key not in entries:
        entries[key] = tensor.external_data.add()
        entries[key].key = key
    entries[key].value = draw(
        st.sampled_from(
            ["../escape.data", "/etc/passwd", "missing.data", "-1", "99999999", "ext.onnx.data", "x"]
        )
    )
    onnx.save(edited, folder / "ext.onnx")
    if draw(st.booleans()):
        data_file = folder / "ext.onnx.data"
        data_file.write_bytes(data_file.read_bytes()[: draw(st.integers(0, 100))])
    return folder / "ext.onnx"


@_settings("onnx")
@given(data=st.data(), replace_a_bundle=st.booleans())
def test_fuzzed_onnx_files_through_compile(cli, workdir, data, replace_a_bundle):
    kind, draw = data.draw(st.sampled_from(["flip", "truncate", "proto", "external"])), data.draw
    original = (workdir / "mlp.onnx").read_bytes()
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        folder = Path(scratch)
        if kind == "external":
            model = _external_data_edit(folder, original, draw)
        else:
            mutated = {
                "flip": lambda: _byte_flips(original, draw),
                "truncate": lambda: original[: draw(st.integers(0, len(original) - 1))],
                "proto": lambda: _proto_edit(original, draw),
            }[kind]()
            model = folder / "model.onnx"
            model.write_bytes(mutated)
        inputs = set(folder.iterdir())
        out = folder / "out"
        if replace_a_bundle:
            shutil.copytree(workdir / "bundle", out)
        before = _tree(out) if replace_a_bundle else {}
        result = cli("compile", "--model", model, "-o", out, *(["--force"] if replace_a_bundle else []))
        assert_contract(result, f"compile of a {kind} mutation")
        assert set(folder.iterdir()) - inputs <= {out}, "nothing written beside the output"
        if result.exit_code == 0:
            assert json.loads((out / "manifest.json").read_text())["verify"]
        elif replace_a_bundle:
            assert _tree(out) == before, "a failed compile left the previous bundle as it was"
        else:
            assert not out.exists()


# --- bundles through inspect, run and the runner ------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)


def _paths(document, prefix=()):
    yield prefix
    if isinstance(document, dict):
        for key, value in document.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from _paths(value, (*prefix, index))


def _edit_manifest(bundle: Path, draw) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    path = draw(st.sampled_from(sorted(_paths(manifest), key=str)))
    if not path:
        manifest = draw(JSON_VALUES)
    else:
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON_VALUES)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _edit_tree(bundle: Path, outside: Path, draw) -> None:
    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    target = draw(st.sampled_from(files))
    kind = draw(st.sampled_from(["unlisted", "symlink", "truncate", "flip", "delete", "replace-dir"]))
    if kind == "unlisted":
        (bundle / draw(st.sampled_from(["runner/numpy.py", "extra.txt", "artifact/x.onnx"]))).write_text("x")
    elif kind == "symlink":
        target.unlink()
        target.symlink_to(outside)
    elif kind == "truncate":
        target.write_bytes(target.read_bytes()[: draw(st.integers(0, 64))])
    elif kind == "flip":
        data = bytearray(target.read_bytes())
        if data:
            data[draw(st.integers(0, len(data) - 1))] ^= 0xFF
        target.write_bytes(bytes(data))
    elif kind == "delete":
        target.unlink()
    else:
        target.unlink()
        target.mkdir()


@_settings("bundle")
@given(data=st.data())
def test_fuzzed_bundles_through_inspect_run_and_the_runner(cli, workdir, data):
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        bundle = Path(scratch) / "bundle"
        shutil.copytree(workdir / "bundle", bundle)
        outside = Path(scratch) / "secret.txt"
        outside.write_text("outside the bundle")
        if data.draw(st.booleans()):
            _edit_manifest(bundle, data.draw)
        else:
            _edit_tree(bundle, outside, data.draw)
        before = set(Path(scratch).rglob("*"))
        for command in (["inspect", bundle], ["run", bundle], ["bench", bundle, "--iterations", "1"]):
            assert_contract(cli(*command), f"{command[0]} of a damaged bundle")
        assert set(Path(scratch).rglob("*")) == before, "reading a bundle writes nothing"
        assert outside.read_text() == "outside the bundle"
        if (
            data.draw(st.integers(0, EXAMPLES["bundle"] - 1)) < RUNNER_EXAMPLES
            and (bundle / "runner").is_dir()
        ):
            runner = bundle / "runner" / "run.py"
            if runner.is_file() and not runner.is_symlink():
                done = subprocess.run(
                    [sys.executable, runner, "--check"], capture_output=True, text=True, timeout=120
                )
                assert done.returncode in (0, 1, 2) and "Traceback" not in done.stderr, done.stderr[-2000:]


# --- recipes through compile --recipe ------------------------------------------------------------------

PARAMETER_VALUES = st.one_of(
    st.integers(-10, 100000),
    st.floats(-2, 2, allow_nan=False),
    st.booleans(),
    st.text(max_size=6),
    st.sampled_from(["2:4", "int8-dynamic", "fp16", "all", "layer", "[2,2]"]),
    st.lists(st.integers(-1, 4), max_size=3),
)


@st.composite
def recipes(draw) -> tuple[str, bytes]:
    names = sorted(PASSES)
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([".toml", ".json"])), draw(st.binary(max_size=64))
    steps = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from([*names, "shrink-ray", ""]))
        fields = [f.name for f in parameter_fields(PASSES[name])] if name in PASSES else []
        keys = draw(st.lists(st.sampled_from([*fields, "turbo"]), max_size=3, unique=True))
        steps.append({"pass": name, **{key: draw(PARAMETER_VALUES) for key in keys}})
    document: dict = {"name": draw(st.text(max_size=5)), "passes": steps}
    if draw(st.integers(0, 5)) == 0:
        document[draw(st.sampled_from(["flavour", "recipe", "pass"]))] = draw(JSON_VALUES)
    if draw(st.booleans()):
        try:
            return ".toml", tomli_w.dumps(document).encode()
        except TypeError:  # TOML has no null; the JSON form below carries it
            pass
    return ".json", json.dumps(draw(st.sampled_from([document, [document], "cleanup", None]))).encode()


@_settings("recipe")
@given(recipe=recipes())
def test_fuzzed_recipes_through_compile(cli, workdir, recipe):
    suffix, content = recipe
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        path = Path(scratch) / f"recipe{suffix}"
        path.write_bytes(content)
        result = cli(
            "compile", "--model", workdir / "mlp.onnx", "--recipe", path, "-o", Path(scratch) / "out"
        )
        assert_contract(result, f"compile --recipe {content[:200]!r}")
        assert set(Path(scratch).iterdir()) <= {path, Path(scratch) / "out"}


# --- input files through run ---------------------------------------------------------------------------

DTYPES = st.sampled_from(
    ["float32", "float64", "float16", "int64", "int32", "int8", "uint8", "bool", "complex64"]
)


@st.composite
def input_files(draw) -> tuple[str, bytes | dict]:
    kind = draw(st.sampled_from(["npz", "npy", "text", "bytes"]))
    if kind in ("text", "bytes"):
        return draw(st.sampled_from([".txt", ".png", ".npz", ".npy", ""])), draw(st.binary(max_size=200))
    shape = draw(st.lists(st.integers(0, 9), max_size=3))
    value = draw(st.one_of(st.floats(-1e6, 1e6), st.just(float("nan")), st.integers(-(2**40), 2**40)))
    with np.errstate(invalid="ignore", over="ignore"):
        array = np.full(shape, value).astype(draw(DTYPES))
    if kind == "npy":
        return ".npy", {"": array}
    names = draw(st.lists(st.sampled_from(["x", "y", "input_ids", ""]), min_size=0, max_size=2, unique=True))
    return ".npz", {name or "arr_0": array for name in names}


@_settings("inputs")
@given(case=input_files())
def test_fuzzed_input_files_through_run(cli, workdir, case):
    suffix, content = case
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        path = Path(scratch) / f"inputs{suffix}"
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif suffix == ".npy":
            with path.open("wb") as handle:
                np.save(handle, content[""])
        else:
            with path.open("wb") as handle:
                np.savez(handle, **content)
        before = _tree(workdir / "bundle")
        result = cli("run", workdir / "bundle", path, "--output", Path(scratch) / "out.npz")
        assert_contract(result, f"run on {suffix} {content!r:.200}")
        assert _tree(workdir / "bundle") == before
        assert set(Path(scratch).iterdir()) <= {path, Path(scratch) / "out.npz"}
