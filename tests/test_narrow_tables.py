"""embedding-tables: Gather tables stored in fp16 or per-row INT8, standard ONNX, quality reported, and
with 2:4 the bundle a device stores for MiniLM under 0.6x of the dense weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import add_local_device, assert_one_error_line
from test_footprint import _assert_opens_in_stock_tools
from test_structural import _hf_encoder

from redux_edge import api
from redux_edge.bundle import load_bundle
from redux_edge.errors import UserError
from redux_edge.passes import build_pass
from redux_edge.recipe import load_recipe


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
