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

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from redux_edge.datasets import images, rotten_tomatoes
from redux_edge.errors import UserError, first_line
from redux_edge.frontend.module_run import run_module
from redux_edge.frontend.source import Source, check_feeds, fit_inputs
from redux_edge.frontend.torch import export_module
from redux_edge.interfaces import Step, no_progress
from redux_edge.preprocess import ImagePreprocessor, Preprocessor, TextPreprocessor, read_inputs
from redux_edge.untrusted import inside, read_json, safetensors_tensors

__all__ = ["Directory", "check_directory", "huggingface_source", "load_directory"]

logger = logging.getLogger(__name__)

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
    """The directory's config, once it and every weights file it would load have been checked."""
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(
            f"{folder} is not a Hugging Face model directory (no config.json)",
            "give a folder written by save_pretrained, an .onnx file or a zoo name",
        )
    config = read_json(path, "fix or re-save the model")
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object", "fix or re-save the model")
    if "auto_map" in config:
        raise UserError(
            f"{folder} asks for remote code (auto_map in config.json), which redux-edge never runs",
            "use a model of a family transformers implements",
        )
    if not isinstance(config.get("model_type"), str) or config["model_type"] not in _FAMILIES:
        raise UserError(
            f"{folder} is a {config.get('model_type')!r} model; Hugging Face directories of the "
            f"{', '.join(_FAMILIES)} families are supported",
            "export it to ONNX yourself and give the .onnx file",
        )
    architectures = config.get("architectures", [])
    if not isinstance(architectures, list) or not all(isinstance(name, str) for name in architectures):
        raise UserError(f"{path}: architectures is not a list of class names", "fix or re-save the model")
    weight_bytes = sum(_weights_file_bytes(file) for file in _weight_files(folder))
    _check_sizes(config, path, weight_bytes)
    return config


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers would read: those the index names (each inside the folder),
    else the folder's own."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        document = read_json(index, "fix or re-save the model")
        weight_map = document.get("weight_map") if isinstance(document, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index} has no weight_map of tensor names to files", "re-save the model")
        files = [inside(folder, name, str(index)) for name in sorted(set(weight_map.values()))]
        if missing := [file.name for file in files if not file.is_file()]:
            raise UserError(f"{index} names {missing[0]}, which is not in {folder}", "copy the whole model")
        return files
    if files := sorted(folder.glob("*.safetensors")):
        return [inside(folder, file.name, str(folder)) for file in files]
    pickled = [name for name in _PICKLED if (folder / name).exists()]
    why = f"only pickled weights ({', '.join(pickled)}), which are never loaded" if pickled else "no weights"
    raise UserError(
        f"{folder} has {why}",
        "save the model with save_pretrained(safe_serialization=True) to get model.safetensors",
    )


def _weights_file_bytes(file: Path) -> int:
    safetensors_tensors(file)  # the header is checked before transformers believes it
    return file.stat().st_size


# Sizes a config may give, with the largest any real checkpoint of these families has by far: a config is
# read before any weight, and a size of 10^9 would allocate for minutes before the weights could disagree.
_SIZES = {
    "num_hidden_layers": 1024, "n_layers": 1024, "num_attention_heads": 1024, "n_heads": 1024,
    "hidden_size": 1 << 16, "dim": 1 << 16, "intermediate_size": 1 << 18, "hidden_dim": 1 << 18,
    "vocab_size": 1 << 22, "max_position_embeddings": 1 << 20, "image_size": 1 << 14,
    "patch_size": 1 << 14, "num_channels": 64,
}  # fmt: skip


def _check_sizes(config: dict, path: Path, weight_bytes: int) -> None:
    for key, largest in _SIZES.items():
        value = config.get(key)
        if value is not None and (type(value) is not int or not 1 <= value <= largest):
            raise UserError(
                f"{path}: {key} is {value!r}; it must be a whole number from 1 to {largest:,}",
                "fix config.json or re-save the model",
            )
    layers = config.get("num_hidden_layers", config.get("n_layers")) or 1
    hidden = config.get("hidden_size", config.get("dim")) or 1
    # A lower bound on the parameters (the attention projections alone) against what the files hold: every
    # parameter takes at least a byte there (16 MiB of slack for the tied and generated ones).
    floor = layers * 4 * hidden * hidden
    if floor > weight_bytes + (16 << 20):
        raise UserError(
            f"{path} describes a model of at least {floor:,} parameters ({layers} layers of width {hidden}), "
            f"and its weights files hold {weight_bytes:,} bytes",
            "the config does not belong to these weights; re-save the model",
        )


def _sentence_transformer(folder: Path) -> tuple[str, bool] | None:
    """(pooling, normalize) of a sentence-transformers directory; None for a plain transformers one."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    hint = "fix modules.json or re-save the model with sentence-transformers"
    modules = read_json(modules_file, hint)
    if not isinstance(modules, list) or not all(
        isinstance(entry, dict) and isinstance(entry.get("type"), str) and isinstance(entry.get("path"), str)
        for entry in modules
    ):
        raise UserError(f"{modules_file} is not a list of modules with a type and a path", hint)
    kinds = {entry["type"].rsplit(".", 1)[-1]: entry for entry in modules}
    pooling = "mean"
    if "Pooling" in kinds:
        settings_file = inside(folder, kinds["Pooling"]["path"], str(modules_file)) / "config.json"
        if not settings_file.is_file():
            raise UserError(f"{modules_file} names a Pooling module without {settings_file}", hint)
        settings = read_json(settings_file, hint)
        if not isinstance(settings, dict):
            raise UserError(f"{settings_file} is not a JSON object", hint)
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
    options: dict[str, Any] = {
        "local_files_only": True,
        "trust_remote_code": False,
        "use_safetensors": True,
        "output_loading_info": True,
        # Mismatched shapes are reported and refused below, with the weight's name.
        "ignore_mismatched_sizes": True,
    }
    auto = getattr(transformers, _HEADS[head]) if head else transformers.AutoModel
    transformers.utils.logging.disable_progress_bar()  # the step line reports the load; a bar would garble it
    # transformers prints its own MISSING/UNEXPECTED report; the one read below is the one that decides.
    transformers.utils.logging.set_verbosity_error()
    with step(f"loading {folder} with transformers"):
        try:
            loaded, report = auto.from_pretrained(folder, **options)
        except Exception as exc:  # the library reading a checked directory: all it raises is about the files
            raise UserError(
                f"transformers cannot load {folder}: {first_line(exc)}", "--debug for details"
            ) from exc
    _check_loading_report(folder, report)
    loaded.eval()
    output = "logits" if head else ("sentence_embedding" if sentence else "last_hidden_state")
    module: nn.Module
    preprocessor: Preprocessor
    if vision:
        module, preprocessor = _Vision(loaded, output), _image_preprocessor(folder, config)
    else:
        module = _Encoder(loaded, output, *(sentence or ("mean", False)))
        preprocessor = _text_preprocessor(folder, config)
    labels = config.get("id2label") if head else None
    if labels is not None and not isinstance(labels, dict):
        raise UserError(f"{folder}/config.json: id2label is not a table of labels", "fix config.json")
    architecture = {
        "family": _FAMILIES[config["model_type"]],
        "model_type": config["model_type"],
        "num_layers": config.get("num_hidden_layers", config.get("n_layers")),
        "num_heads": config.get("num_attention_heads", config.get("n_heads")),
        "hidden_size": config.get("hidden_size", config.get("dim")),
        **({"labels": {str(k): v for k, v in labels.items()}} if labels else {}),
    }
    return Directory(folder, module.eval(), loaded, output, preprocessor, architecture, architectures, vision)


def _check_loading_report(folder: Path, report: dict) -> None:
    """Refuse weights that are missing or of another shape than the config's: transformers would leave
    those tensors randomly initialised, and the reference, the same module, would agree with them."""
    missing, mismatched = sorted(report.get("missing_keys", ())), sorted(report.get("mismatched_keys", ()))
    if missing or mismatched:
        problem = (
            f"{len(missing)} weights the config needs are missing ({missing[0]}"
            if missing
            else f"{len(mismatched)} weights have other shapes than the config's ({mismatched[0][0]}"
        )
        raise UserError(
            f"{folder}: {problem}{', ...' if len(missing or mismatched) > 1 else ''})",
            "the weights and config.json do not belong together; save the model again with save_pretrained",
        )
    if unexpected := sorted(report.get("unexpected_keys", ())):
        # A head's weights when the directory is loaded as its base model: not used, and said.
        logger.warning(
            "%s: %d weights are not used by the model (%s, ...)", folder, len(unexpected), unexpected[0]
        )


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
    limit = config.get("max_position_embeddings", 512) - (2 if config["model_type"] == "roberta" else 0)
    preprocessor = TextPreprocessor(tokenizer, max(1, min(256, limit)))
    preprocessor.tokenizer()  # a malformed tokenizer.json is refused here, before any export
    return preprocessor


def _text_inputs(preprocessor: TextPreprocessor, inputs_file: Path | None) -> dict[str, np.ndarray]:
    if inputs_file is not None:
        return read_inputs(inputs_file, list(_TEXT_INPUTS), preprocessor)

    return preprocessor(rotten_tomatoes.calibration_texts(_SAMPLES))


def _image_preprocessor(folder: Path, config: dict) -> ImagePreprocessor:
    """The directory's image processor settings (``preprocessor_config.json``), else ViT's defaults."""
    settings: dict = {}
    path = folder / "preprocessor_config.json"
    hint = "fix or re-save the image processor"
    if path.is_file():
        settings = read_json(path, hint)
        if not isinstance(settings, dict):
            raise UserError(f"{path} is not a JSON object", hint)
    size = config.get("image_size", 224)
    channels = config.get("num_channels", 3)
    statistics = [settings.get("image_mean", [0.5] * channels), settings.get("image_std", [0.5] * channels)]
    for key, values in zip(("image_mean", "image_std"), statistics, strict=True):
        numbers = isinstance(values, list) and all(type(v) in (int, float) for v in values)
        if not numbers or len(values) != channels or (key == "image_std" and not all(values)):
            raise UserError(f"{path}: {key} is not {channels} numbers (non-zero for image_std)", hint)
    mean, std = (tuple(float(v) for v in values) for values in statistics)
    return ImagePreprocessor(size, mean, std, _PIXELS, channels)


def _image_inputs(preprocessor: ImagePreprocessor, inputs_file: Path | None) -> dict[str, np.ndarray]:
    if inputs_file is not None:
        return read_inputs(inputs_file, [_PIXELS], preprocessor)

    return preprocessor.pixels(images.fashion_mnist().test_images[:_SAMPLES])
