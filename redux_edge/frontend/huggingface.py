"""A local Hugging Face model directory as a source, loaded offline with ``transformers``.

Supported: the BERT family (``bert``, ``distilbert``, ``roberta``) and ViT (``vit``): bare encoders
(their output is the last hidden state), sequence- and image-classification checkpoints (their logits)
and sentence-transformers directories (``modules.json``: mean or CLS pooling and normalisation become part
of the graph, as for the zoo's MiniLM). The directory is untrusted: weights must be safetensors (pickled
``.bin``/``.pt`` files are never loaded), a config that asks for remote code is refused, and nothing is
downloaded. Text is read by the directory's ``tokenizer.json``, images by its ``preprocessor_config.json``
settings. Unless ``--inputs`` names samples, a text model is verified on Rotten Tomatoes sentences and a
vision model on Fashion-MNIST images (brought to its size and channels); a bare text encoder is evaluated
on the Rotten Tomatoes task data as the zoo's text model is, any model on the user's ``--eval-data``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from redux_edge.errors import UserError, first_line
from redux_edge.frontend.source import Source, check_feeds, fit_inputs
from redux_edge.frontend.torch import export_module, run_module
from redux_edge.passes.contract import Step, no_progress
from redux_edge.preprocess import ImagePreprocessor, Preprocessor, TextPreprocessor, read_inputs

__all__ = ["Directory", "check_directory", "huggingface_source", "load_directory"]

# Every supported family has the BERT encoder's layout, which the masked references address.
_FAMILIES = {"bert": "bert", "distilbert": "bert", "roberta": "bert", "vit": "bert"}
_VISION = frozenset({"vit"})
# A checkpoint's head (the end of its architecture's name) and the transformers class that loads it.
_HEADS = {
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForImageClassification": "AutoModelForImageClassification",
}
_TEXT_INPUTS = ("input_ids", "attention_mask")
_PIXELS = "pixel_values"
_SAMPLES = 8
_PICKLED = ("pytorch_model.bin", "model.pt", "model.pth", "pytorch_model.bin.index.json")


class _Vision(nn.Module):
    """A transformers vision model as pixel_values -> its logits or last hidden state."""

    def __init__(self, model: nn.Module, output: str) -> None:
        super().__init__()
        self.model, self.output = model, output

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        result = self.model(pixel_values=pixel_values)
        return result.logits if self.output == "logits" else result.last_hidden_state


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


def check_directory(folder: Path) -> dict:
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


@dataclass
class Directory:
    """A Hugging Face directory loaded: the transformers model behind the module that is compiled and
    trained (ids and mask, or pixels, to its one output), its preprocessor and architecture."""

    folder: Path
    module: nn.Module
    model: nn.Module
    output: str
    preprocessor: Preprocessor
    architecture: dict
    architectures: list[str]
    vision: bool

    @property
    def input_names(self) -> list[str]:
        return [_PIXELS] if self.vision else list(_TEXT_INPUTS)


def load_directory(folder: Path, step: Step = no_progress) -> Directory:
    """Load a checked directory with transformers, offline, from safetensors, without remote code."""
    import transformers

    config = check_directory(folder)
    architectures = config.get("architectures") or []
    head = next((kind for kind in _HEADS if any(name.endswith(kind) for name in architectures)), None)
    vision = config["model_type"] in _VISION
    sentence = None if head or vision else _sentence_transformer(folder)
    options: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False, "use_safetensors": True}
    auto = getattr(transformers, _HEADS[head]) if head else transformers.AutoModel
    transformers.utils.logging.disable_progress_bar()  # the step line reports the load; a bar would garble it
    with step(f"loading {folder} with transformers"):
        try:
            loaded = auto.from_pretrained(folder, **options).eval()
        except (OSError, ValueError) as exc:
            raise UserError(
                f"transformers cannot load {folder}: {first_line(exc)}", "--debug for details"
            ) from exc
    output = "logits" if head else ("sentence_embedding" if sentence else "last_hidden_state")
    module: nn.Module
    preprocessor: Preprocessor
    if vision:
        module, preprocessor = _Vision(loaded, output), _image_preprocessor(folder, config)
    else:
        module = _Encoder(loaded, output, *(sentence or ("mean", False)))
        preprocessor = _text_preprocessor(folder, config)
    labels = config.get("id2label") if head else None
    architecture = {
        "family": _FAMILIES[config["model_type"]],
        "model_type": config["model_type"],
        "num_layers": config.get("num_hidden_layers", config.get("n_layers")),
        "num_heads": config.get("num_attention_heads", config.get("n_heads")),
        "hidden_size": config.get("hidden_size", config.get("dim")),
        **({"labels": {str(k): v for k, v in labels.items()}} if labels else {}),
    }
    return Directory(folder, module.eval(), loaded, output, preprocessor, architecture, architectures, vision)


def huggingface_source(
    folder: Path,
    shapes: dict[str, list[int]] | None = None,
    inputs_file: Path | None = None,
    step: Step = no_progress,
) -> Source:
    loaded = load_directory(folder, step)
    preprocessor = loaded.preprocessor
    if isinstance(preprocessor, ImagePreprocessor):
        dims = {_PIXELS: {0: "batch"}}
        inputs = _image_inputs(preprocessor, inputs_file)
    else:
        dims = {name: {0: "batch", 1: "sequence"} for name in _TEXT_INPUTS}
        inputs = _text_inputs(preprocessor, inputs_file)
    inputs = fit_inputs(inputs, shapes or {})
    with step(f"exporting {folder.name} with torch.onnx (dynamo)"):
        example = {name: np.asarray(inputs[name]) for name in loaded.input_names}
        exported = export_module(loaded.module, example, dims, [loaded.output])
    check_feeds(exported, inputs)
    head = loaded.output == "logits"
    return Source(
        name=folder.name,
        origin={"huggingface": str(folder), "architectures": loaded.architectures, "output": loaded.output},
        model=exported,
        inputs=inputs,
        reference_outputs=run_module(loaded.module, inputs),
        reference_kind="pytorch (transformers)",
        preprocessor=preprocessor,
        architecture=loaded.architecture,
        task_data=None if loaded.vision or head else "rotten-tomatoes",
        module=loaded.module,
    )


def _text_preprocessor(folder: Path, config: dict) -> TextPreprocessor:
    tokenizer = folder / "tokenizer.json"
    if not tokenizer.is_file():
        raise UserError(
            f"{folder} has no tokenizer.json", "save the tokenizer with the model (a fast tokenizer)"
        )
    limit = int(config.get("max_position_embeddings", 512)) - (2 if config["model_type"] == "roberta" else 0)
    return TextPreprocessor(tokenizer, min(256, limit))


def _text_inputs(preprocessor: TextPreprocessor, inputs_file: Path | None) -> dict[str, np.ndarray]:
    if inputs_file is not None:
        return read_inputs(inputs_file, list(_TEXT_INPUTS), preprocessor)
    from redux_edge.datasets import rotten_tomatoes

    return preprocessor(rotten_tomatoes.calibration_texts(_SAMPLES))


def _image_preprocessor(folder: Path, config: dict) -> ImagePreprocessor:
    """The directory's image processor settings (``preprocessor_config.json``), else ViT's defaults."""
    settings: dict = {}
    path = folder / "preprocessor_config.json"
    if path.is_file():
        try:
            settings = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path} is not valid JSON: {exc}", "fix or re-save the image processor") from exc
    size = int(config.get("image_size", 224))
    channels = int(config.get("num_channels", 3))
    mean = tuple(float(v) for v in settings.get("image_mean", [0.5] * channels))
    std = tuple(float(v) for v in settings.get("image_std", [0.5] * channels))
    return ImagePreprocessor(size, mean, std, _PIXELS, channels)


def _image_inputs(preprocessor: ImagePreprocessor, inputs_file: Path | None) -> dict[str, np.ndarray]:
    if inputs_file is not None:
        return read_inputs(inputs_file, [_PIXELS], preprocessor)
    from redux_edge.datasets import images

    return preprocessor.pixels(images.fashion_mnist().test_images[:_SAMPLES])
