"""Structural passes remove heads, neurons and layers for real, and the result is exactly the dense model
with those units masked: on the zoo's MiniLM and on Hugging Face BERT-family exports, on real sentences."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import transformers
from conftest import TOKEN_AXES, LastHiddenState, assert_clean_user_error
from graphs import make_mlp_onnx

from redux_edge import zoo
from redux_edge.analysis.reference import masked
from redux_edge.frontend.module_run import run_module
from redux_edge.frontend.torch import export_module
from redux_edge.ir.blocks import find_structure
from redux_edge.passes import build_pass
from redux_edge.passes.cleanup import CleanupPass

SENTENCES = zoo.load_card("minilm-l6")["samples"]


def _hf_encoder(family: str) -> torch.nn.Module:
    """A small random-init encoder of a transformers family, with BERT's vocabulary for real sentences."""
    torch.manual_seed(0)
    size = {"vocab_size": 30522, "max_position_embeddings": 512}
    if family == "distilbert":
        config = transformers.DistilBertConfig(dim=64, n_layers=4, n_heads=4, hidden_dim=128, **size)
        return LastHiddenState(transformers.DistilBertModel(config)).eval()
    classes = {
        "bert": (transformers.BertConfig, transformers.BertModel),
        "roberta": (transformers.RobertaConfig, transformers.RobertaModel),
    }
    config_class, model_class = classes[family]
    config = config_class(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, **size
    )
    if family == "roberta":
        config.max_position_embeddings = 514
    return LastHiddenState(model_class(config)).eval()


@pytest.fixture(scope="module")
def exported():
    """family -> (torch module, head size, real inputs, exported IR); each exported once."""
    entry = zoo.load_model("minilm-l6")
    inputs = entry.inputs
    cache = {}

    def get(family: str):
        if family not in cache:
            module = entry.module if family == "minilm-l6" else _hf_encoder(family)
            model = export_module(module, inputs, TOKEN_AXES, ["output"])
            CleanupPass()(model)
            cache[family] = (module, 32 if family == "minilm-l6" else 16, inputs, ir.to_proto(model))
        module, head_dim, feeds, proto = cache[family]
        return module, head_dim, feeds, ir.from_proto(proto)

    return get


def _run(model: ir.Model, inputs: dict, tmp_path) -> np.ndarray:
    path = tmp_path / "model.onnx"
    ir.save(model, str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, inputs)[0]


def _apply(model: ir.Model, steps: list[tuple[str, dict]]) -> dict:
    plan = {}
    for name, parameters in steps:
        outcome = build_pass(name, parameters)(model)
        plan.update({k: v for k, v in outcome.removed.items() if v})
    CleanupPass()(model)
    return plan


PLAN = {"heads": {"0": [1, 3], "2": [0], "3": [1, 2, 3]}, "ffn": {"0": [0, 5, 9, 17], "3": list(range(40))}}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["minilm-l6", "bert", "distilbert", "roberta"])
def test_pruned_model_matches_torch_with_heads_zeroed_neurons_zeroed_layers_skipped(
    family, exported, tmp_path
):
    module, head_dim, inputs, model = exported(family)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({**PLAN, "layers": [1]}))
    by_plan = {"importance": "plan", "plan": str(plan_file)}
    # Layer 1 goes first: the plan's later layer numbers must still mean the original layers.
    plan = _apply(model, [("drop-layers", by_plan), ("prune-heads", by_plan), ("prune-ffn", by_plan)])
    assert plan == {**PLAN, "layers": [1]}
    with masked(module, plan, head_dim):
        expected = run_module(module, inputs)[0]
    ours = _run(model, inputs, tmp_path)
    assert np.abs(ours - expected).max() <= 1e-4
    assert np.abs(ours - run_module(module, inputs)[0]).max() > 1e-3  # the plan did change the model


@pytest.mark.parametrize("name", ["prune-heads", "prune-ffn", "drop-layers"])
def test_each_pass_alone_is_exact_on_minilm(name, exported, tmp_path):
    module, head_dim, inputs, model = exported("minilm-l6")
    parameters = {"layers": [2, 4]} if name == "drop-layers" else {"fraction": 0.5}
    plan = _apply(model, [(name, parameters)])
    with masked(module, plan, head_dim):
        expected = run_module(module, inputs)[0]
    assert np.abs(_run(model, inputs, tmp_path) - expected).max() <= 1e-4


def test_half_the_heads_leaves_half_the_qkv_columns(exported):
    _, _, _, model = exported("minilm-l6")
    _apply(model, [("prune-heads", {"fraction": 0.5, "importance": "magnitude"})])
    structure = find_structure(model)
    assert sum(block.heads for block in structure.attention) == 36
    for block in structure.attention:
        kept = block.heads * 32
        assert [p.weight.shape for p in (block.query, block.key, block.value)] == [(384, kept)] * 3
        assert block.output.weight.shape == (kept, 384)


def test_calibration_scores_every_head_and_keeps_one_per_layer(exported):
    from redux_edge.analysis.importance import head_scores, select_lowest

    _, _, inputs, model = exported("minilm-l6")
    blocks = find_structure(model).attention
    scores = head_scores(model, blocks, "calibration", inputs, seed=0)
    assert sorted(scores) == list(range(6))
    assert all(s.shape == (12,) and (s >= 0).all() and s.max() > 0 for s in scores.values())
    # A near-total budget still leaves every layer one head: the strongest.
    removed = select_lowest(scores, 0.99, [], across_layers=True)
    for layer, heads in removed.items():
        assert len(heads) == 11
        assert int(np.argmax(scores[layer])) not in heads


def test_block_influence_ranks_every_layer(exported):
    from redux_edge.analysis.importance import layer_scores

    _, _, inputs, model = exported("minilm-l6")
    scores = layer_scores(model, find_structure(model).layers, "calibration", inputs)
    assert sorted(scores) == list(range(6))
    assert all(0.0 < value < 2.0 for value in scores.values())


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory):
    """A Hugging Face BertModel exported to an ONNX file: what a user brings to `compile --model`."""
    path = tmp_path_factory.mktemp("hf") / "bert.onnx"
    inputs = zoo.load_model("minilm-l6").inputs
    ir.save(export_module(_hf_encoder("bert"), inputs, TOKEN_AXES, ["last_hidden_state"]), str(path))
    np.savez(path.with_suffix(".npz"), **inputs)
    return path


@pytest.mark.slow
def test_onnx_file_is_pruned_exactly_against_the_masked_original(cli, bert_onnx, tmp_path):
    result = cli(
        "compile", "--model", bert_onnx, "--inputs", bert_onnx.with_suffix(".npz"),
        "--prune-heads", "0.5", "--drop-layers", "1,2", "-o", tmp_path / "b", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert "removed heads/neurons zeroed" in manifest["verify"]["reference"]
    assert manifest["verify"]["ir"]["last_hidden_state"]["max_abs"] <= 1e-4
    compression = manifest["compression"]
    assert compression["plan"]["layers"] == [1, 2]
    assert compression["architecture"]["compiled"]["heads_per_layer"] == {"0": 2, "3": 2}
    assert compression["quality"]["measured"] is False
    assert compression["speed"]["dense_p50_ms"] > 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--drop-layers", "4"], "would remove all 4 layers"),
        (["--pass", "prune-heads:per_layer=[4,0,0,0]"], "cannot remove 4 of the 4 units of layer 0"),
        (["--prune-heads", "1.0"], "fraction 1.0 is not in [0, 1)"),
        (["--pass", "prune-ffn:scope=everywhere"], "scope must be 'layer' or 'global'"),
        (["--drop-layers", "1", "--importance", "magnitude", "--prune-heads", "0.5"], "no 'magnitude'"),
    ],
)
def test_impossible_budgets_are_user_errors(cli, bert_onnx, tmp_path, flags, message):
    result = cli("compile", "--model", bert_onnx, *flags, "-o", tmp_path / "out")
    assert_clean_user_error(result, tmp_path, message=message)


def test_a_plan_that_empties_a_layer_is_refused(cli, bert_onnx, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"heads": {"0": [0, 1, 2, 3]}}))
    result = cli(
        "compile", "--model", bert_onnx, "--prune-heads", "0", "--plan", plan, "-o", tmp_path / "out"
    )
    assert_clean_user_error(result, tmp_path, message="removes all 4 heads of layer 0")


def test_unmatched_attention_names_the_node_and_writes_nothing(cli, bert_onnx, tmp_path):
    model = ir.load(str(bert_onnx))
    # Route one head-split shape through an op the matcher cannot see through.
    split = next(n for n in model.graph if n.op_type == "Reshape" and len(n.outputs[0].shape or ()) == 4)
    hidden = ir.node("Identity", [split.inputs[1]], name="opaque_shape")
    model.graph.insert_before(split, hidden)
    split.replace_input_with(1, hidden.outputs[0])
    path = tmp_path / "opaque.onnx"
    ir.save(model, str(path))
    # A recipe without cleanup, which would fold the Identity away.
    recipe = tmp_path / "bare.toml"
    recipe.write_text("passes = []\n")
    result = cli(
        "compile", "--model", path, "--recipe", recipe, "--prune-heads", "0.5", "-o", tmp_path / "out"
    )
    assert_clean_user_error(result, tmp_path, message=f"node '{split.name}' (Reshape)")
    assert "left unchanged" in result.stderr


def test_a_model_without_attention_says_so(cli, tmp_path):
    result = cli("compile", "--model", make_mlp_onnx(tmp_path / "mlp.onnx"), "--prune-heads", "0.5",
                 "-o", tmp_path / "out")  # fmt: skip
    assert_clean_user_error(result, tmp_path, message="has no attention blocks")


@pytest.fixture(scope="session")
def half_heads_bundle(tmp_path_factory):
    from redux_edge.cli import main

    out = tmp_path_factory.mktemp("bundles") / "half-heads"
    assert main(["compile", "--model", "minilm-l6", "--prune-heads", "0.5", "-o", str(out)]) == 0
    return out


@pytest.mark.slow
def test_prune_heads_half_removes_half_the_qkv_columns_and_their_parameters(half_heads_bundle):
    manifest = json.loads((half_heads_bundle / "manifest.json").read_text())
    original, compiled = manifest["metrics"]["original"], manifest["metrics"]["compiled"]
    # Per layer: 6 heads x 32 columns of Q, K, V (weights and biases) and 192 rows of the output projection.
    removed_per_layer = 3 * (384 * 192 + 192) + 192 * 384
    assert original["params"] - compiled["params"] == 6 * removed_per_layer
    assert original["weight_bytes"] - compiled["weight_bytes"] == 4 * 6 * removed_per_layer
    assert compiled["macs"] < original["macs"]
    saved = find_structure(ir.load(str(half_heads_bundle / "model.onnx")))
    for block in saved.attention:
        assert [p.weight.shape for p in (block.query, block.key, block.value)] == [(384, 192)] * 3
    assert manifest["verify"]["ir"]["sentence_embedding"]["max_abs"] <= 1e-4


@pytest.mark.slow
def test_inspect_shows_heads_per_layer(cli, half_heads_bundle):
    result = cli("inspect", half_heads_bundle)
    assert result.exit_code == 0
    assert "heads per layer 0:6 1:6 2:6 3:6 4:6 5:6" in result.stdout
    assert "feed-forward width per layer 0:1536" in result.stdout


@pytest.fixture(scope="session")
def edge_compile(tmp_path_factory):
    from redux_edge.cli import main

    out = tmp_path_factory.mktemp("bundles") / "edge"
    argv = ["compile", "--model", "minilm-l6", "--recipe", "models/minilm-l6/edge.toml", "-o", str(out)]
    return main(argv), out


@pytest.mark.slow
def test_edge_recipe_reports_cost_speed_and_quality_against_dense(edge_compile, capsys):
    code, out = edge_compile
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    compression = manifest["compression"]
    assert compression["architecture"]["compiled"] == {
        "layers": 4,
        "heads_per_layer": {layer: 6 for layer in compression["architecture"]["compiled"]["heads_per_layer"]},
        "ffn_width_per_layer": {
            layer: 640 for layer in compression["architecture"]["compiled"]["heads_per_layer"]
        },
    }
    assert len(compression["plan"]["layers"]) == 2
    assert compression["calibration"] == "32 Rotten Tomatoes training sentences"
    speed = compression["speed"]
    assert speed["shapes"] == {"input_ids": [1, 128], "attention_mask": [1, 128]}
    assert speed["speedup"] == pytest.approx(speed["dense_p50_ms"] / speed["compressed_p50_ms"])
    quality = compression["quality"]
    assert (quality["train_sentences"], quality["test_sentences"]) == (2000, 1000)
    # The dense model's embeddings carry sentiment: a linear probe is well above the majority class.
    assert quality["probe_accuracy"]["dense"] > 0.65
    assert 0.0 < quality["probe_accuracy"]["compressed"] <= 1.0
    assert -1.0 <= quality["embedding_cosine"]["min"] <= quality["embedding_cosine"]["mean"] < 1.0
    assert manifest["metrics"]["compiled"]["params"] < manifest["metrics"]["original"]["params"]
    assert manifest["verify"]["ir"]["sentence_embedding"]["max_abs"] <= 1e-4


@pytest.mark.slow
def test_edge_compile_report_prints_every_number(cli, edge_compile):
    _, out = edge_compile
    report = cli("inspect", out).stdout
    for needle in ("parameters", "MACs", "speed    onnxruntime", "dense", "embedding cosine", "linear-probe"):
        assert needle in report


class _ResidualBlock(torch.nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.first = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.second = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.second(torch.relu(self.first(x))))


class _SmallResNet(torch.nn.Module):
    """Mechanics only: three residual blocks whose input and output shapes match."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.blocks = torch.nn.Sequential(*(_ResidualBlock(8) for _ in range(3)))
        self.head = torch.nn.Linear(8, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(torch.relu(self.stem(image))).mean((2, 3)))


def test_dropping_a_cnn_residual_block_equals_skipping_it_in_torch(tmp_path):
    torch.manual_seed(0)
    net = _SmallResNet().eval()
    inputs = {"image": np.random.default_rng(0).standard_normal((2, 1, 12, 12)).astype(np.float32)}
    model = export_module(net, inputs, {"image": {0: "batch"}}, ["logits"])
    CleanupPass()(model)
    assert [layer.index for layer in find_structure(model).layers] == [0, 1, 2]
    plan = _apply(model, [("drop-layers", {"layers": [1]})])
    assert plan == {"layers": [1]}
    net.blocks[1] = torch.nn.Identity()
    assert np.abs(_run(model, inputs, tmp_path) - run_module(net, inputs)[0]).max() <= 1e-5
    assert [layer.index for layer in find_structure(model).layers] == [0, 2]


@pytest.mark.parametrize(
    ("backend", "extra"),
    [("openvino", []), ("tvm", ["--shapes", "input_ids:8x18,attention_mask:8x18"])],
)
@pytest.mark.slow
def test_pruned_model_lowers_exactly_through_other_backends(cli, bert_onnx, tmp_path, backend, extra):
    result = cli(
        "compile", "--model", bert_onnx, "--inputs", bert_onnx.with_suffix(".npz"),
        "--target", "x86-64-avx2", "--backend", backend, *extra,
        "--prune-heads", "0.5", "--prune-ffn", "0.5", "-o", tmp_path / "b", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    verify = json.loads(result.stdout)["verify"]
    assert verify["artifact_run"].startswith("ran here")
    assert verify["artifact"]["last_hidden_state"]["max_abs"] <= 1e-3
