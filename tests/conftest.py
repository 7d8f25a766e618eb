"""Shared fixtures: real bundles compiled once per session, and a CLI runner that returns what a user sees."""

from __future__ import annotations

import contextlib
import csv
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import transformers

from redux_edge import api
from redux_edge.backends import BACKENDS
from redux_edge.cli import main
from redux_edge.frontend.source import Source
from redux_edge.frontend.torch import export_module
from redux_edge.ir.verify import Tolerance
from redux_edge.passes.cleanup import CleanupPass
from redux_edge.passes.contract import CompileContext, RecipePass
from redux_edge.recipe import load_recipe
from redux_edge.targets import load_target


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    def invoke(*args: str) -> CliResult:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke


@pytest.fixture(scope="session")
def minilm_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "minilm"
    api.compile_model("minilm-l6", "host", load_recipe(None), out)
    return out


@pytest.fixture(scope="session")
def mnist_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "mnist"
    api.compile_model("mnist-cnn", "host", load_recipe(None), out)
    return out


@pytest.fixture(scope="session")
def protected_bundle(tmp_path_factory) -> Path:
    """mnist-cnn with MACPruning and its emitted C kernel (c/layer.npz): what the leakage commands read."""
    out = tmp_path_factory.mktemp("macprune") / "protected"
    argv = ["compile", "--model", "mnist-cnn", "--mac-prune", "0.5", "--mac-keep-top", "0.2"]
    assert main([*argv, "--mac-seed", "7", "--emit-c", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def held_out_csv(tmp_path_factory) -> Path:
    """96 held-out Rotten Tomatoes sentences with labels: a user's --eval-data, small enough to be quick."""
    from redux_edge.datasets import rotten_tomatoes

    data = rotten_tomatoes.load()
    path = tmp_path_factory.mktemp("eval") / "held_out.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        rows = zip(data.test_texts[:96], data.test_labels[:96], strict=True)
        writer.writerows([text, int(label)] for text, label in rows)
    return path


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A devices.toml and a profile store of this test's own, under tmp_path."""
    monkeypatch.setenv("REDUX_EDGE_DEVICES", str(tmp_path / "devices.toml"))
    monkeypatch.setenv("REDUX_EDGE_PROFILES", str(tmp_path / "profiles"))
    return tmp_path


def add_local_device(cli, name: str, root: Path, target: str = "host", *extra: str):
    """``devices add NAME --address local`` whose Python is this interpreter; the CLI result."""
    return cli(
        "devices", "add", name, "--target", target, "--address", "local", "--root", root,
        "--python", sys.executable, *extra,
    )  # fmt: skip


@contextlib.contextmanager
def tiny_file_system(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size``: a real file system that runs out of space (needs root, as in CI)."""
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder]
    if subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root, as in CI)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", folder], check=False)


def make_nan_onnx(path: Path) -> Path:
    """y = Log(x) - Log(x): NaN wherever x < 0, which random sample inputs are half the time."""
    graph = oh.make_graph(
        [oh.make_node("Log", ["x"], ["l"]), oh.make_node("Sub", ["l", "l"], ["y"])],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 8])],
    )
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), path)
    return path


def assert_runtime_check_healthy(bundle: Path) -> None:
    """The bundle's own runtime, in a fresh process, finds it healthy (``--check``)."""
    checked = subprocess.run(
        [".venv/bin/python", "-m", "redux_edge.runtime", "--bundle", bundle, "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert json.loads(checked.stdout)["healthy"] is True


def assert_one_error_line(result, message: str) -> None:
    """Exit code 2, one `error:` line with ``message`` and a hint, no traceback."""
    assert result.exit_code == 2, result
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert message in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "(" in lines[0] and lines[0].endswith(")"), "the line carries a hint"


def assert_clean_user_error(result, parent, *, message: str) -> None:
    """``assert_one_error_line``, and nothing written at parent/out."""
    assert_one_error_line(result, message)
    # No bundle and no hidden staging directory left beside it.
    assert not (parent / "out").exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(".out.")]


# The passes' unit tests (tests/passes/): a tiny random-init BERT and an in-memory ONNX Runtime run.

TOKEN_AXES = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}


class LastHiddenState(torch.nn.Module):
    """A transformers encoder as an exporter sees it: token ids and mask in, token states out."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@pytest.fixture(scope="session")
def tiny_bert():
    """() -> (module, inputs, a fresh copy of its cleaned-up export): 2 layers, 4 heads of 8, FFN 64."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32,
    )  # fmt: skip
    module = LastHiddenState(transformers.BertModel(config)).eval()
    rng = np.random.default_rng(0)
    inputs = {
        "input_ids": rng.integers(0, 200, (3, 12)).astype(np.int64),
        "attention_mask": np.ones((3, 12), np.int64),
    }
    model = export_module(module, inputs, TOKEN_AXES, ["output"])
    CleanupPass()(model)
    proto = ir.to_proto(model)
    return lambda: (module, inputs, ir.from_proto(proto))


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.fixture
def run():
    """run(model, feeds) -> outputs, by ONNX Runtime from memory."""
    return _run


@pytest.fixture
def checked_for_host():
    """checked_for_host(pass, source) -> the pass as a compile for ``host`` with ONNX Runtime runs it:
    checked, and prepared with what it gathers from the source."""

    def prepare(configured: RecipePass, source: Source) -> RecipePass:
        context = CompileContext(
            source, load_target("host"), BACKENDS["onnxruntime"], {"precision": "fp32"},
            Tolerance.for_precision("fp32"), [configured],
        )  # fmt: skip
        configured.check(context)
        return configured.prepared(configured.prepare(context))

    return prepare
