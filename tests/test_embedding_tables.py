"""embedding-tables: Gather tables stored in fp16 or per-row INT8, standard ONNX, quality reported, and
with 2:4 the bundle a device stores for MiniLM under 0.6x of the dense weights."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from conftest import add_local_device, assert_one_error_line
from onnx import numpy_helper
from test_footprint import _assert_opens_in_stock_tools
from test_structural import _hf_encoder

from redux_edge import api
from redux_edge.bundle import load_bundle
from redux_edge.errors import UserError
from redux_edge.passes import build_pass
from redux_edge.recipe import load_recipe

_RNG = np.random.default_rng(0)


def _table_model(tied: bool = False) -> onnx.ModelProto:
    """ids -> Gather(E) -> MatMul(W), the gathered rows also an output; ``tied``: the MatMul's weight is
    E transposed instead (an LM head tied to the embeddings)."""
    table = _RNG.standard_normal((96, 1000)).astype(np.float32).T.copy()
    weights = [numpy_helper.from_array(table, "E")]
    nodes = [oh.make_node("Gather", ["E", "ids"], ["rows"])]
    if tied:
        nodes += [oh.make_node("Transpose", ["E"], ["Et"]), oh.make_node("MatMul", ["rows", "Et"], ["y"])]
    else:
        weights.append(numpy_helper.from_array(_RNG.standard_normal((96, 8)).astype(np.float32), "W"))
        nodes.append(oh.make_node("MatMul", ["rows", "W"], ["y"]))
    graph = oh.make_graph(
        nodes,
        "tables",
        [oh.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2, 5])],
        [
            oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None),
            oh.make_tensor_value_info("rows", onnx.TensorProto.FLOAT, [2, 5, 96]),
        ],
        weights,
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize(
    ("dtype", "stored_fraction", "relative_error"), [("fp16", 0.5, 1e-3), ("int8", 0.27, 1e-2)]
)
def test_a_table_is_stored_narrow_and_its_gathered_rows_stay_close(dtype, stored_fraction, relative_error):
    proto = _table_model()
    ids = {"ids": _RNG.integers(0, 1000, (2, 5))}
    expected = ort.InferenceSession(proto.SerializeToString()).run(None, ids)
    model = ir.from_proto(proto)
    outcome = build_pass("embedding-tables", {"dtype": dtype})(model)
    (table,) = outcome.tables
    assert table["bytes_after"] <= stored_fraction * table["bytes_before"]
    narrowed = ir.to_proto(model)
    onnx.checker.check_model(narrowed, full_check=True)
    assert [output.name for output in narrowed.graph.output] == ["y", "rows"]
    got = ort.InferenceSession(narrowed.SerializeToString()).run(None, ids)
    for want, have in zip(expected, got, strict=True):
        assert have.dtype == np.float32 and have.shape == want.shape
        assert np.abs(have - want).max() <= relative_error * np.abs(want).max()


def test_a_table_another_operator_reads_stays_float32_and_says_why():
    model = ir.from_proto(_table_model(tied=True))
    outcome = build_pass("embedding-tables", {})(model)
    assert not outcome.modified and not outcome.tables
    assert "also read by Transpose (a tied weight)" in outcome.kept[0]["why"]


def test_a_pass_checked_exactly_may_not_follow_it(tmp_path):
    recipe = load_recipe(None).extended(
        [build_pass("embedding-tables", {}), build_pass("sparsity", {"pattern": "2:4"})]
    )
    with pytest.raises(UserError, match="sparsity\\) must come before it"):
        api.compile_model("mnist-cnn", "host", recipe, tmp_path / "out")


def test_an_unknown_dtype_is_one_error_line(cli, tmp_path):
    result = cli("compile", "--model", "mnist-cnn", "--embedding-tables", "int4", "-o", tmp_path / "out")
    assert_one_error_line(result, "unknown dtype 'int4'")


def test_a_torchscript_export_of_another_family_compiles_with_int8_tables(cli, tmp_path):
    # A user's ONNX file: RoBERTa, TorchScript exporter, static shapes (the other way from ours).
    module = _hf_encoder("roberta")
    ids = torch.randint(0, 30522, (2, 16))
    path = tmp_path / "roberta.onnx"
    torch.onnx.export(
        module, (ids, torch.ones_like(ids)), path, dynamo=False, input_names=["input_ids", "attention_mask"]
    )
    out = tmp_path / "out"
    np.savez(tmp_path / "ids.npz", input_ids=ids.numpy(), attention_mask=np.ones((2, 16), np.int64))
    result = cli("compile", "--model", path, "--inputs", tmp_path / "ids.npz", "--embedding-tables", "int8",
                 "-o", out, "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    manifest = load_bundle(out).manifest
    section = manifest["embedding_tables"]
    assert any(table["table"].endswith("word_embeddings.weight") for table in section["tables"])
    assert section["bytes_after"] < 0.3 * section["bytes_before"]
    assert manifest["verify"]["rebased"]["ir_checked"] == "the model before embedding-tables (int8)"
    metrics = manifest["metrics"]
    assert metrics["compiled"]["params"] >= metrics["original"]["params"]  # int8 codes are parameters too
    _assert_opens_in_stock_tools(out)


@pytest.mark.slow
def test_minilm_with_2_4_and_fp16_tables_is_stored_under_0_6x_of_the_dense_weights_on_a_device(
    cli, env, minilm_bundle
):
    out = env / "minilm-small"
    recipe = load_recipe(None).extended(
        [build_pass("sparsity", {"pattern": "2:4"}), build_pass("embedding-tables", {"dtype": "fp16"})]
    )
    api.compile_model("minilm-l6", "host", recipe, out, waive_gate=True)  # magnitude 2:4, no recovery
    _assert_opens_in_stock_tools(out)
    manifest = load_bundle(out).manifest
    section = manifest["embedding_tables"]
    assert section["tables"][0]["table"] == "embeddings.word_embeddings.weight"
    assert section["quality"]["task"].startswith("Rotten Tomatoes")
    assert section["retention"] >= 0.999  # fp16 keeps 11 significant bits of each table entry
    assert manifest["verify"]["ir"]["sentence_embedding"]["max_abs"] < 1e-5  # 2:4 exact before the tables

    added = add_local_device(cli, "board", env / "device", "host")
    assert added.exit_code == 0, added.stderr
    (row,) = json.loads(cli("flash", out, "--device", "board", "--json").stdout)
    assert row["ok"] and row["health"]["healthy"], row["error"]
    dense_weight_bytes = load_bundle(minilm_bundle).manifest["metrics"]["compiled"]["weight_bytes"]
    release = env / "device" / "releases" / row["release"]
    stored = sum(p.stat().st_size for p in (release / "artifact").rglob("*") if p.is_file())
    sent = sum(
        manifest["files"][relative]["bytes"]
        for relative in row["uploaded"]
        if relative.startswith("artifact/")
    )
    assert stored <= 0.6 * dense_weight_bytes and sent <= 0.6 * dense_weight_bytes
