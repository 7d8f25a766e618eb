"""A local Hugging Face model directory as a source, loaded offline with ``transformers``.

Supported: the BERT family (``bert``, ``distilbert``, ``roberta``): bare encoders (their output is the
last hidden state), sequence-classification checkpoints (their logits) and sentence-transformers
directories (``modules.json``: mean or CLS pooling and normalisation become part of the graph, as for the
zoo's MiniLM). The directory is untrusted: weights must be safetensors (pickled ``.bin``/``.pt`` files are
never loaded), a config that asks for remote code is refused, and nothing is downloaded. Text is read by
the directory's ``tokenizer.json``. Until a user's own data can be named, a text model is verified on
Rotten Tomatoes sentences and calibrated and evaluated on the Rotten Tomatoes task data, as the zoo's
text model is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from redux_edge.errors import UserError
from redux_edge.frontend.source import Source, check_feeds, fit_inputs
from redux_edge.frontend.torch import export_module, run_module
from redux_edge.passes.contract import Step, no_progress
from redux_edge.preprocess import TextPreprocessor, read_inputs

__all__ = ["huggingface_source"]

_FAMILIES = {"bert": "bert", "distilbert": "bert", "roberta": "bert"}
_TEXT_INPUTS = ("input_ids", "attention_mask")
_SAMPLE_SENTENCES = 8
_PICKLED = ("pytorch_model.bin", "model.pt", "model.pth", "pytorch_model.bin.index.json")


class _Encoder(nn.Module):
    """A transformers model as (input_ids, attention_mask) -> its output: the last hidden state, the
    logits, or a sentence-transformers embedding (pooled, optionally normalised)."""

    def __init__(self, model: nn.Module, output: str, pooling: str = "mean", normalize: bool = False) -> None:
        super().__init__()
        self.model, self.output, self.pooling, self.normalize = model, output, pooling, normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        result = self.model(input_ids=input_ids, attention_mask=attention_mask)
        if self.output == "logits":
            return result.logits
        states = result.last_hidden_state
        if self.output == "last_hidden_state":
            return states
        if self.pooling == "cls":
            pooled = states[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=1) if self.normalize else pooled


def _config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(
            f"{folder} is not a Hugging Face model directory (no config.json)",
            "give a folder written by save_pretrained, an .onnx file or a zoo name",
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}", "fix or re-save the model") from exc
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object", "fix or re-save the model")
    if "auto_map" in config:
        raise UserError(
            f"{folder} asks for remote code (auto_map in config.json), which redux-edge never runs",
            "use a model of a family transformers implements",
        )
    if config.get("model_type") not in _FAMILIES:
        raise UserError(
            f"{folder} is a {config.get('model_type')!r} model; Hugging Face directories of the "
            f"{', '.join(_FAMILIES)} families are supported",
            "export it to ONNX yourself and give the .onnx file",
        )
    if not list(folder.glob("*.safetensors")):
        pickled = [name for name in _PICKLED if (folder / name).exists()]
        why = (
            f"only pickled weights ({', '.join(pickled)}), which are never loaded"
            if pickled
            else "no weights"
        )
        raise UserError(
            f"{folder} has {why}",
            "save the model with save_pretrained(safe_serialization=True) to get model.safetensors",
        )
    return config


def _sentence_transformer(folder: Path) -> tuple[str, bool] | None:
    """(pooling, normalize) of a sentence-transformers directory; None for a plain transformers one."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    kinds = {entry["type"].rsplit(".", 1)[-1]: entry for entry in modules}
    pooling = "mean"
    if "Pooling" in kinds:
        settings = json.loads((folder / kinds["Pooling"]["path"] / "config.json").read_text())
        if settings.get("pooling_mode_cls_token"):
            pooling = "cls"
        elif not settings.get("pooling_mode_mean_tokens", True):
            raise UserError(f"{folder}: only mean and CLS pooling are supported", "use a mean-pooling model")
    return pooling, "Normalize" in kinds


def huggingface_source(
    folder: Path,
    shapes: dict[str, list[int]] | None = None,
    inputs_file: Path | None = None,
    step: Step = no_progress,
    weights: Path | None = None,
) -> Source:
    import transformers

    if weights is not None:
        raise UserError("--weights replaces a zoo model's parameters", "a model directory carries its own")
    config = _config(folder)
    architectures = config.get("architectures") or []
    classifier = any(name.endswith("ForSequenceClassification") for name in architectures)
    sentence = None if classifier else _sentence_transformer(folder)
    options: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False, "use_safetensors": True}
    with step(f"loading {folder} with transformers"):
        try:
            if classifier:
                loaded = transformers.AutoModelForSequenceClassification.from_pretrained(folder, **options)
            else:
                loaded = transformers.AutoModel.from_pretrained(folder, **options)
        except (OSError, ValueError) as exc:
            first_line = str(exc).strip().splitlines()[0]
            raise UserError(
                f"transformers cannot load {folder}: {first_line}", "--debug for details"
            ) from exc
    output = "logits" if classifier else ("sentence_embedding" if sentence else "last_hidden_state")
    module = _Encoder(loaded.eval(), output, *(sentence or ("mean", False))).eval()
    tokenizer = folder / "tokenizer.json"
    if not tokenizer.is_file():
        raise UserError(
            f"{folder} has no tokenizer.json", "save the tokenizer with the model (a fast tokenizer)"
        )
    limit = int(config.get("max_position_embeddings", 512)) - (2 if config["model_type"] == "roberta" else 0)
    preprocessor = TextPreprocessor(tokenizer, min(256, limit))
    if inputs_file is not None:
        inputs = read_inputs(inputs_file, list(_TEXT_INPUTS), preprocessor)
    else:
        from redux_edge.datasets import rotten_tomatoes

        inputs = preprocessor(rotten_tomatoes.calibration_texts(_SAMPLE_SENTENCES))
    inputs = fit_inputs(inputs, shapes or {})
    dims = {0: "batch", 1: "sequence"}
    with step(f"exporting {folder.name} with torch.onnx (dynamo)"):
        example = {name: np.asarray(inputs[name]) for name in _TEXT_INPUTS}
        exported = export_module(module, example, dict.fromkeys(_TEXT_INPUTS, dims), [output])
    check_feeds(exported, inputs)
    hidden = config.get("hidden_size", config.get("dim"))
    return Source(
        name=folder.name,
        origin={"huggingface": str(folder), "architectures": architectures, "output": output},
        model=exported,
        inputs=inputs,
        reference_outputs=run_module(module, inputs),
        reference_kind="pytorch (transformers)",
        preprocessor=preprocessor,
        architecture={
            "family": _FAMILIES[config["model_type"]],
            "model_type": config["model_type"],
            "num_layers": config.get("num_hidden_layers", config.get("n_layers")),
            "num_heads": config.get("num_attention_heads", config.get("n_heads")),
            "hidden_size": hidden,
        },
        task_data="rotten-tomatoes",
        module=module,
    )
