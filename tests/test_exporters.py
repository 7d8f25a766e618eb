"""ONNX files from either torch exporter: BERT, DistilBERT, RoBERTa and ViT (small random-init configs),
exported with ``dynamo=True`` (external data, as torch writes it) and ``dynamo=False`` (TorchScript, as
optimum-cli and most published files), with dynamic and with static shapes. Every cell compiles plain,
and each structural pass gives a physically smaller model equal to the PyTorch model with the same units
masked, the mask written here independently of redux-edge's own reference."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import assert_clean_user_error
from torch import nn

from redux_edge import api
from redux_edge.recipe import load_recipe, passes_from_flags

WIDTH, HEADS, LAYERS, FFN = 64, 4, 2, 128


@dataclass
class Family:
    make: Callable[[], nn.Module]
    layers: Callable[[nn.Module], nn.ModuleList]
    attention_output: Callable[[nn.Module], nn.Linear]
    ffn_down: Callable[[nn.Module], nn.Linear]
    vision: bool = False


def _bert_like(model_class: type, config_class: type) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        config = config_class(
            hidden_size=WIDTH,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=FFN,
            vocab_size=1000,
        )
        return model_class(config)

    return make


def _vit() -> nn.Module:
    config = transformers.ViTConfig(
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        image_size=32,
        patch_size=8,
    )
    return transformers.ViTModel(config)


def _distilbert() -> nn.Module:
    config = transformers.DistilBertConfig(
        dim=WIDTH, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN, vocab_size=1000
    )
    return transformers.DistilBertModel(config)


FAMILIES = {
    "bert": Family(
        _bert_like(transformers.BertModel, transformers.BertConfig),
        lambda m: m.encoder.layer,
        lambda layer: layer.attention.output.dense,
        lambda layer: layer.output.dense,
    ),
    "distilbert": Family(
        _distilbert,
        lambda m: m.transformer.layer,
        lambda layer: layer.attention.out_lin,
        lambda layer: layer.ffn.lin2,
    ),
    "roberta": Family(
        _bert_like(transformers.RobertaModel, transformers.RobertaConfig),
        lambda m: m.encoder.layer,
        lambda layer: layer.attention.output.dense,
        lambda layer: layer.output.dense,
    ),
    "vit": Family(
        _vit,
        lambda m: m.layers,
        lambda layer: layer.attention.o_proj,
        lambda layer: layer.mlp.fc2,
        vision=True,
    ),
}


class _Text(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _Vision(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state


def _inputs(family: Family, batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if family.vision:
        return {"pixel_values": rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)}
    mask = np.ones((batch, seq), np.int64)
    mask[-1, seq // 2 :] = 0  # one padded row: the attention mask takes part
    return {"input_ids": rng.integers(1, 1000, (batch, seq)).astype(np.int64), "attention_mask": mask}


def _export(module: nn.Module, family: Family, dynamo: bool, static: bool, path: Path) -> None:
    names = ["pixel_values"] if family.vision else ["input_ids", "attention_mask"]
    example = tuple(torch.from_numpy(array) for array in _inputs(family, 2, 16).values())
    options: dict = {}
    if not static:
        axes = {0: "batch"} if family.vision else {0: "batch", 1: "seq"}
        if dynamo:
            dims = {axis: torch.export.Dim(name) for axis, name in axes.items()}
            options["dynamic_shapes"] = tuple(dims for _ in names)
        else:
            options["dynamic_axes"] = dict.fromkeys(names, axes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, example, str(path), input_names=names, output_names=["hidden"], dynamo=dynamo, **options
        )


@pytest.fixture(scope="module")
def modules() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: family.make().eval() for name, family in FAMILIES.items()}


@contextlib.contextmanager
def _masked(model: nn.Module, family: Family, plan: dict) -> Iterator[nn.Module]:
    """A copy of ``model`` with the plan's heads and neurons zeroed at the input of the projection that
    reads them, and its dropped layers returning their input."""
    masked = copy.deepcopy(model)
    layers = family.layers(masked.model)
    with torch.no_grad():
        for layer, heads in plan.get("heads", {}).items():
            head_dim = WIDTH // HEADS
            for head in heads:
                family.attention_output(layers[int(layer)]).weight[
                    :, head * head_dim : (head + 1) * head_dim
                ] = 0
        for layer, neurons in plan.get("ffn", {}).items():
            family.ffn_down(layers[int(layer)]).weight[:, neurons] = 0

    def skip(_: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        hidden = args[0] if args else next(iter(kwargs.values()))
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    for index in plan.get("layers", []):
        layers[int(index)].register_forward_hook(skip, with_kwargs=True)
    yield masked


CELLS = [
    (family, exporter, shapes)
    for family in FAMILIES
    for exporter in ("dynamo", "torchscript")
    for shapes in ("dynamic", "static")
]
PASSES = {
    "prune-heads": {"prune_heads": 0.5},
    "prune-ffn": {"prune_ffn": 0.5},
    "drop-layers": {"drop_layers": "1"},
}
# The last layer too: in a pre-LN model (ViT) the LayerNormalization after it is the model's, not the layer's.
DROP_LAST = {"drop_layers": "1", "importance": "plan"}


@pytest.mark.slow
@pytest.mark.parametrize(("family_name", "exporter", "shapes"), CELLS, ids=["-".join(cell) for cell in CELLS])
def test_an_exported_file_compiles_and_each_structural_pass_equals_torch_masked(
    family_name, exporter, shapes, modules, tmp_path
):
    family = FAMILIES[family_name]
    wrapped = (_Vision if family.vision else _Text)(modules[family_name]).eval()
    onnx_file = tmp_path / "export" / "model.onnx"
    onnx_file.parent.mkdir()
    _export(wrapped, family, exporter == "dynamo", shapes == "static", onnx_file)
    assert (onnx_file.parent / "model.onnx.data").exists() == (exporter == "dynamo")
    batch, seq = (2, 16) if shapes == "static" else (3, 12)
    feeds = _inputs(family, batch, seq)
    np.savez(tmp_path / "inputs.npz", **feeds)
    plain = api.compile_model(
        str(onnx_file), "host", load_recipe(None), tmp_path / "plain", inputs_file=tmp_path / "inputs.npz"
    )
    dense_params = plain.manifest["metrics"]["compiled"]["params"]
    with torch.no_grad():
        expected = wrapped(*(torch.from_numpy(a) for a in feeds.values())).numpy()
    outputs, _ = api.run(plain.path, tmp_path / "inputs.npz")
    assert np.abs(outputs["hidden"] - expected).max() <= 1e-4
    (tmp_path / "last.json").write_text(f'{{"layers": [{LAYERS - 1}]}}')
    for name, flags in {**PASSES, "drop-last": {**DROP_LAST, "plan": str(tmp_path / "last.json")}}.items():
        recipe = load_recipe(None).extended(passes_from_flags(flags))
        bundle = api.compile_model(
            str(onnx_file), "host", recipe, tmp_path / name, inputs_file=tmp_path / "inputs.npz"
        )
        plan = bundle.manifest["compression"]["plan"]
        assert plan, name
        assert bundle.manifest["metrics"]["compiled"]["params"] < dense_params, name
        outputs, _ = api.run(bundle.path, tmp_path / "inputs.npz")
        with _masked(wrapped, family, plan) as masked, torch.no_grad():
            masked_output = masked(*(torch.from_numpy(a) for a in feeds.values())).numpy()
        assert np.abs(outputs["hidden"] - masked_output).max() <= 1e-4, name
        assert np.abs(outputs["hidden"] - expected).max() > 1e-3, f"{name} changed nothing"


@pytest.mark.slow
def test_an_unsupported_architecture_compiles_plain_and_the_structural_passes_say_why(cli, tmp_path):
    """GPT-2 (one fused QKV projection split by Slice): no BERT-family layout to follow."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, vocab_size=1000, n_positions=64
    )

    class Causal(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = transformers.GPT2Model(config).eval()

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids).last_hidden_state

    path = tmp_path / "gpt2.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Causal(), (torch.randint(0, 1000, (2, 16)),), str(path), input_names=["input_ids"], dynamo=True
        )
    plain = cli("compile", "-m", path, "-o", tmp_path / "plain")
    assert plain.exit_code == 0, plain.stderr
    parent = tmp_path / "runs"
    parent.mkdir()
    for flag, value in (("--prune-heads", "0.5"), ("--drop-layers", "1")):
        result = cli("compile", "-m", path, flag, value, "-o", parent / "out")
        assert_clean_user_error(
            result,
            parent,
            message="cannot follow an attention block"
            if "heads" in flag
            else "cannot follow a transformer layer block",
        )


@pytest.mark.slow
def test_a_raw_torchscript_export_prunes_without_the_cleanup_first(modules, tmp_path):
    """A recipe that prunes before any clean-up: TorchScript's Identity-wrapped parameters and Concat-built
    shapes are followed as the exporter wrote them."""
    from redux_edge.recipe import recipe_from_dict

    family = FAMILIES["bert"]
    wrapped = _Text(modules["bert"]).eval()
    onnx_file = tmp_path / "model.onnx"
    _export(wrapped, family, dynamo=False, static=False, path=onnx_file)
    passes = [
        {"pass": "prune-heads", "fraction": 0.5},
        {"pass": "prune-ffn", "fraction": 0.5},
        {"pass": "cleanup"},
    ]
    recipe = recipe_from_dict({"name": "prune-first", "passes": passes}, "test")
    bundle = api.compile_model(str(onnx_file), "host", recipe, tmp_path / "bundle")
    assert bundle.manifest["metrics"]["structure"]["heads_per_layer"] == {"0": 2, "1": 2}
    assert bundle.manifest["metrics"]["structure"]["ffn_width_per_layer"] == {"0": 64, "1": 64}
