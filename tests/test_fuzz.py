"""The fuzz suite: seeded mutations of what users hand the tool, each through the command that reads it.

Seven targets: ONNX files through ``compile``; bundles (manifest edits, unlisted files, symlinks, damaged
files) through ``inspect``, ``run`` and the bundle's own runner; recipes through ``compile --recipe``;
input files through ``run``; Hugging Face directories (config fields, safetensors headers, weight indexes,
``modules.json``, tokenizers) through ``compile``; trace files (ETS/HDF5 with links and external storage,
``.npy``, lascar ``.npz``, ChipWhisperer projects) through ``leakage attack``; device registries through
``devices list`` and ``devices check``. Every JSON and TOML target also gets documents nested thousands of
levels deep. The property for every case: exit 0 with a verified bundle (or outputs), or
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
from graphs import make_mlp_onnx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from redux_edge.passes import PASSES
from redux_edge.passes.contract import parameter_fields

EXAMPLES = {
    "onnx": 200,
    "bundle": 150,
    "recipe": 100,
    "inputs": 100,
    "directory": 150,
    "traces": 150,
    "devices": 150,
}
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


@pytest.mark.slow
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


def _deep(depth: int, kind: str) -> str:
    """A JSON (or TOML inline) document nested ``depth`` levels: Python's parsers recurse per level."""
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


DEEP = st.builds(_deep, st.sampled_from([70, 3000, 100_000]), st.sampled_from(["list", "table"]))


def _paths(document, prefix=()):
    yield prefix
    if isinstance(document, dict):
        for key, value in document.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from _paths(value, (*prefix, index))


def _edit_manifest(bundle: Path, draw) -> None:
    if draw(st.integers(0, 9)) == 0:
        (bundle / "manifest.json").write_text(draw(DEEP))
        return
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


@pytest.mark.slow
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
    if draw(st.integers(0, 9)) == 0:
        deep = draw(DEEP)
        return draw(st.sampled_from([(".json", deep), (".toml", f"passes = {deep}")]))[0], deep.encode()
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
    kind = draw(st.sampled_from(["npz", "npy", "text", "bytes", "header"]))
    if kind in ("text", "bytes"):
        return draw(st.sampled_from([".txt", ".png", ".npz", ".npy", ""])), draw(st.binary(max_size=200))
    if kind == "header":
        return ".npy", _lying_npy(draw)
    shape = draw(st.lists(st.integers(0, 9), max_size=3))
    value = draw(st.one_of(st.floats(-1e6, 1e6), st.just(float("nan")), st.integers(-(2**40), 2**40)))
    with np.errstate(invalid="ignore", over="ignore"):
        array = np.full(shape, value).astype(draw(DTYPES))
    if kind == "npy":
        return ".npy", {"": array}
    names = draw(st.lists(st.sampled_from(["x", "y", "input_ids", ""]), min_size=0, max_size=2, unique=True))
    return ".npz", {name or "arr_0": array for name in names}


def _lying_npy(draw) -> bytes:
    """A .npy header that declares what it likes (10^12 elements, object dtype, a negative dim) over
    a few bytes of data."""
    shape = draw(st.sampled_from(["(1000000, 1000000)", "(-3, 8)", "(2, 8)", "(0,)", "()", "(2, 8, 'x')"]))
    dtype = draw(st.sampled_from(["'<f4'", "'|O'", "'<i8'", "'V3'", "'<f4", "[('a', '<f4')]"]))
    header = f"{{'descr': {dtype}, 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    body = draw(st.binary(max_size=128))
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1") + body


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


# --- Hugging Face directories through compile ----------------------------------------------------------

_CONFIG_VALUES = st.one_of(
    st.sampled_from([-1, 0, 1, 2, 10**9, 10**12, 1e9, 1.5, "12", "bert", None, True, [], {}, [2], {"a": 1}]),
    JSON_VALUES,
)
_CONFIG_KEYS = [
    "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size",
    "max_position_embeddings", "type_vocab_size", "model_type", "architectures", "auto_map", "id2label",
    "hidden_act", "layer_norm_eps", "pad_token_id",
]  # fmt: skip
_PATHS = st.sampled_from(
    ["../outside.safetensors", "/etc/passwd", "missing.safetensors", "", "model.safetensors"]
)


@pytest.fixture(scope="module")
def tiny_directory(workdir) -> Path:
    """A BERT of one layer, width 16, with a 32-word tokenizer, saved by transformers: a directory that
    compiles in seconds, so that the benign mutations stay affordable."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        *["the", "a", "film", "is", "good", "bad", "not", "very", "story", "plot", "fun", "dull"],
    ]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64,
    )  # fmt: skip
    folder = workdir / "tiny-bert"
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def _safetensors_edit(path: Path, draw) -> None:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8 : 8 + length]), data[8 + length :]
    kind = draw(st.sampled_from(["length", "entry", "truncate", "flip", "append", "header"]))
    if kind == "length":
        new_length = draw(st.sampled_from([0, 1, length - 1, length + 1, 2**40, 2**64 - 1]))
        path.write_bytes(new_length.to_bytes(8, "little") + data[8:])
        return
    if kind == "truncate":
        path.write_bytes(data[: draw(st.integers(0, len(data) - 1))])
        return
    if kind == "flip":
        path.write_bytes(_byte_flips(data[: 8 + length], draw) + body)
        return
    if kind == "append":
        path.write_bytes(data + draw(st.binary(min_size=1, max_size=64)))
        return
    if kind == "header":
        header = draw(JSON_VALUES)
    else:
        name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = draw(
            st.one_of(
                st.sampled_from(["F32", "Q7", "F16", [], [-1, 4], [10**6, 10**6], [0, 10**12], [8, 0]]),
                JSON_VALUES,
            )
        )
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + body)


def _directory_edit(folder: Path, draw) -> str:
    kind = draw(st.sampled_from(["config", "safetensors", "index", "modules", "tokenizer", "deep"]))
    if kind == "config":
        config = json.loads((folder / "config.json").read_text())
        for key in draw(st.lists(st.sampled_from(_CONFIG_KEYS), min_size=1, max_size=3, unique=True)):
            config[key] = draw(_CONFIG_VALUES)
        (folder / "config.json").write_text(json.dumps(config))
    elif kind == "safetensors":
        _safetensors_edit(folder / "model.safetensors", draw)
    elif kind == "index":
        weight_map = {"embeddings.word_embeddings.weight": draw(_PATHS), "pooler.dense.weight": draw(_PATHS)}
        index = draw(st.sampled_from([{"weight_map": weight_map}, {"weight_map": draw(JSON_VALUES)}, []]))
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    elif kind == "modules":
        entry = {
            "path": draw(st.sampled_from(["../..", "/etc", "1_Pooling", "", "missing"])),
            "type": "x.Pooling",
        }
        modules = draw(st.sampled_from([[entry], [{"type": 5}], {"a": 1}, "x"]))
        (folder / "modules.json").write_text(json.dumps(modules))
        if draw(st.booleans()):
            (folder / "1_Pooling").mkdir()
            (folder / "1_Pooling" / "config.json").write_text(json.dumps(draw(JSON_VALUES)))
    elif kind == "tokenizer":
        tokenizer = folder / "tokenizer.json"
        tokenizer.write_bytes(
            draw(
                st.sampled_from(
                    [
                        tokenizer.read_bytes()[: draw(st.integers(0, 200))],
                        json.dumps(draw(JSON_VALUES)).encode(),
                        draw(st.binary(max_size=64)),
                    ]
                )
            )
        )
    else:
        name = draw(st.sampled_from(["config.json", "tokenizer.json", "model.safetensors.index.json"]))
        (folder / name).write_text(draw(DEEP))
    return kind


@pytest.mark.slow
@_settings("directory")
@given(data=st.data())
def test_fuzzed_huggingface_directories_through_compile(cli, tiny_directory, data):
    with tempfile.TemporaryDirectory(dir=tiny_directory.parent) as scratch:
        folder = Path(scratch) / "model"
        shutil.copytree(tiny_directory, folder)
        (Path(scratch) / "outside.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
        kind = _directory_edit(folder, data.draw)
        before = _tree(Path(scratch))
        result = cli("compile", "--model", folder, "-o", Path(scratch) / "out")
        assert_contract(result, f"compile of a directory with a {kind} mutation")
        after = _tree(Path(scratch))
        assert {k: v for k, v in after.items() if not k.startswith("out/")} == before


# --- trace files through leakage attack ---------------------------------------------------------------


def _ets_case(folder: Path, draw) -> Path:
    import h5py

    path = folder / "traces.ets"
    rng = np.random.default_rng(0)
    shape = draw(st.sampled_from([(40, 12), (0, 12), (40,), (40, 0), (5, 3, 2)]))
    dtype = draw(st.sampled_from(["float32", "int8", "float64", "bool", "S4"]))
    operand_shape = draw(st.sampled_from([(40, 4), (40,), (39, 4), (40, 0), ()]))
    operand_dtype = draw(st.sampled_from(["int8", "uint8", "float32", "int64"]))
    with h5py.File(path, "w") as handle:
        link = draw(st.sampled_from(["dataset", "soft", "external-link", "external-storage", "missing"]))
        samples = rng.standard_normal(shape).astype(dtype) if dtype != "S4" else np.zeros(shape, "S4")
        if link == "dataset":
            handle["traces"] = samples
        elif link == "soft":
            handle["stored"] = samples
            handle["traces"] = h5py.SoftLink("/stored")
        elif link == "external-link":
            with h5py.File(folder / "secret.h5", "w") as other:
                other["traces"] = samples
            handle["traces"] = h5py.ExternalLink(str(folder / "secret.h5"), "/traces")
        elif link == "external-storage":
            samples.tofile(folder / "secret.bin")
            handle.create_dataset(
                "traces",
                samples.shape,
                samples.dtype,
                external=[(str(folder / "secret.bin"), 0, samples.nbytes)],
            )
        key = draw(st.sampled_from(["operands", "plaintext", "other"]))
        handle[f"metadata/{key}"] = np.asarray(
            rng.integers(-128, 127, operand_shape) if operand_shape else 3
        ).astype(operand_dtype)
    return path


def _chipwhisperer_case(folder: Path, draw) -> Path:
    data = folder / "capture_data" / "traces"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.save(data / "2024_traces.npy", rng.standard_normal((30, 10)).astype(np.float32))
    np.save(data / "2024_textin.npy", rng.integers(0, 255, (30, 16)).astype(np.uint8))
    count = draw(st.sampled_from(["30", "10", "0", "-5", "31", "10000000000", "abc", ""]))
    prefix = draw(st.sampled_from(["2024_", "../2024_", "missing_", "/etc/"]))
    (data / "config_2024_.cfg").write_text(f"[Trace Config]\nnumTraces = {count}\nprefix = {prefix}\n")
    listed = draw(
        st.sampled_from(["capture_data\\traces\\config_2024_.cfg", "../../x.cfg", "/etc/hostname", ""])
    )
    project = folder / "capture.cwp"
    project.write_text(f"[Trace Management]\ntracefile0 = {listed}\nenabled0 = True\n")
    return project


def _npy_traces_case(folder: Path, draw) -> list:
    traces = folder / "traces.npy"
    if draw(st.booleans()):
        traces.write_bytes(_lying_npy(draw))
    else:
        np.save(traces, np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32))
    inputs = folder / "inputs.npy"
    inputs.write_bytes(draw(st.sampled_from([b"", _lying_npy(draw), b"\x93NUMPY garbage"])))
    return [traces, "--inputs", inputs]


@_settings("traces")
@given(data=st.data())
def test_fuzzed_trace_files_through_leakage_attack(cli, workdir, data):
    draw = data.draw
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        folder = Path(scratch)
        kind = draw(st.sampled_from(["ets", "cwp", "npy", "npz", "bytes"]))
        if kind == "ets":
            arguments: list = [_ets_case(folder, draw)]
        elif kind == "cwp":
            arguments = [_chipwhisperer_case(folder, draw)]
        elif kind == "npy":
            arguments = _npy_traces_case(folder, draw)
        elif kind == "npz":
            names = draw(st.lists(st.sampled_from(["leakages", "values", "other"]), max_size=2, unique=True))
            np.savez(
                folder / "set.npz",
                **{name: np.zeros(draw(st.sampled_from([(9, 4), (9,), ()]))) for name in names},
            )
            arguments = [folder / "set.npz"]
        else:
            (folder / "junk.ets").write_bytes(draw(st.binary(max_size=100)))
            arguments = [folder / "junk.ets"]
        secrets = {p: p.read_bytes() for p in folder.glob("secret*")}
        result = cli("leakage", "attack", *arguments, "-o", folder / "report", "--checkpoints", "10,20")
        assert_contract(result, f"leakage attack on a {kind} case")
        assert all(p.read_bytes() == content for p, content in secrets.items())


# --- device registries through devices list and devices check -----------------------------------------


@_settings("devices")
@given(data=st.data())
def test_fuzzed_device_registries_through_devices_commands(cli, workdir, data):
    draw = data.draw
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        folder = Path(scratch)
        registry = folder / "devices.toml"
        roots = ["", ".", "/", "/etc", "/usr/lib/x", "relative", "~", "/tmp", str(folder / "device"), 5, None]
        entry = {
            "target": draw(st.sampled_from(["host", "jetson", "nope", 3, None])),
            "address": draw(st.sampled_from(["local", "ssh://u@[::1", "http://x", 7])),
            "root": draw(st.sampled_from(roots)),
            "python": draw(st.sampled_from([sys.executable, "python3", 1.5, None])),
            "storage_limit": draw(st.sampled_from(["1 GiB", "lots", -3, 10**30, None])),
        }
        entry = {key: value for key, value in entry.items() if value is not None}
        if draw(st.integers(0, 4)) == 0:
            entry[draw(st.sampled_from(["colour", "root", "target"]))] = draw(JSON_VALUES)
        document = draw(
            st.sampled_from(
                [
                    {"devices": {"box": entry}, "groups": {"lab": ["box"]}},
                    {"devices": {"box": entry}, "groups": draw(JSON_VALUES)},
                    {"devices": draw(JSON_VALUES)},
                    {"devices": {"box": entry}},
                ]
            )
        )
        if draw(st.integers(0, 9)) == 0:
            registry.write_text(f"devices = {draw(DEEP)}")
        else:
            try:
                registry.write_text(tomli_w.dumps(document))
            except TypeError:  # TOML has no null
                registry.write_text(json.dumps(document))
        for command in (["devices", "list", "--json"], ["devices", "check", "box"]):
            assert_contract(cli(*command, "--devices", registry), f"{command[1]} of {document!r:.300}")
        stray = {p.name for p in folder.iterdir()} - {"devices.toml", "device"}
        assert not stray, f"nothing written beside the registry and its device root: {stray}"
