"""Training tasks for a user's Hugging Face directory (text models): ``recover`` and ``shrp``, as
``recover.py`` and ``shrp.py`` do for the zoo, on the checkpoint's own transformers model.

Both distil towards the dense model's output on Rotten Tomatoes training snippets: token states by cosine
per real token, sentence embeddings by cosine, a classifier's logits by mean squared error. ``shrp``
routes the frozen model's heads (``shrp.Routed``) and writes the plan of the least used ones. For
``recover`` the student is a copy of the directory's model with the plan applied the way the exact
reference applies it (``analysis.reference.masked``: removed heads' and neurons' outputs zeroed, dropped
layers passing their input through), and every weight but the embeddings is trained; the result is a
directory again (the original files, new ``model.safetensors``) with the plan and a recipe that removes
exactly those units::

    redux-edge compile --model <out>/model --recipe <out>/recipe.toml
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from redux_edge.analysis.reference import masked, output_projection, transformer_layers
from redux_edge.errors import UserError
from redux_edge.frontend.huggingface import Directory
from redux_edge.train.data import DistillTask, sentence_distance
from redux_edge.train.recover import Options, compile_recipe, read_plan
from redux_edge.train.shrp import Routed, ShrpTask

__all__ = ["DirectoryRecoverTask", "DirectoryShrpTask", "output_distance"]

_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack")


def output_distance(output: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """How a student's ``output`` (last_hidden_state, logits, sentence_embedding) is compared with the
    dense model's."""

    def distance(
        predicted: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        if output == "last_hidden_state":
            return sentence_distance(predicted * attention_mask[..., None], teacher, attention_mask)
        if output == "logits":
            return nn.functional.mse_loss(predicted, teacher)
        return 1.0 - nn.functional.cosine_similarity(predicted, teacher, dim=-1).mean()

    return distance


class _Student(nn.Module):
    def __init__(self, student: nn.Module, output: str) -> None:
        super().__init__()
        self.student, self.distance = student, output_distance(output)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, teacher: torch.Tensor
    ) -> torch.Tensor:
        return self.distance(self.student(input_ids, attention_mask), teacher, attention_mask)


def _text_only(directory: Directory, task: str) -> None:
    if directory.vision:
        raise UserError(
            f"{task} trains text models on Rotten Tomatoes; {directory.folder} is a vision model",
            "fine-tune it with your own training code, then compile the saved directory",
        )


def _dense_outputs(module: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The dense model's output (token states zero at padding), without gradients."""
    dense = module.eval().requires_grad_(False)

    def outputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            output = dense(input_ids, attention_mask)
        return output * attention_mask[..., None] if output.ndim == 3 else output

    return outputs


class DirectoryRecoverTask(DistillTask):
    def __init__(self, directory: Directory, recipe) -> None:

        _text_only(directory, "recover")
        options = Options(**recipe.options)
        self.plan = read_plan(options.plan)
        super().__init__(directory, recipe)
        self.directory = directory
        # Dropout stays off: the same steps give the same losses on 1 process and on many.
        student = copy.deepcopy(directory.module).eval().requires_grad_(True)
        for name, parameter in student.named_parameters():
            if ".embeddings." in f".{name}":
                parameter.requires_grad_(False)
        head_dim = directory.architecture["hidden_size"] // directory.architecture["num_heads"]
        # The hooks stay for the task's life: the student is the pruned model throughout.
        self._hooks = contextlib.ExitStack()
        self._hooks.enter_context(masked(student, self.plan, head_dim))
        self.module = _Student(student, directory.output)
        self.blocks = list(transformer_layers(student))
        self._freeze_unused()

    def teacher_of(self, module: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return _dense_outputs(module)

    def _freeze_unused(self) -> None:
        """Freeze what takes no part in the loss (a dropped layer, a pooler the output does not use): the
        data-parallel wrappers require every trained parameter to receive a gradient."""
        self.module(*self.batch(0, 0, 1)).backward()
        for parameter in self.module.parameters():
            if parameter.grad is None:
                parameter.requires_grad_(False)
            parameter.grad = None

    def finish(self, state: dict[str, torch.Tensor], out: Path) -> dict:
        """Rank 0: the directory again, with the trained weights in the original shapes."""
        prefix = "student.model."
        trained = {name[len(prefix) :]: value for name, value in state.items() if name.startswith(prefix)}
        model: Any = copy.deepcopy(self.directory.model)  # a transformers PreTrainedModel
        unexpected = model.load_state_dict(trained, strict=False).unexpected_keys
        assert not unexpected, f"the student's parameters are the model's: {unexpected}"
        target = out / "model"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(self.directory.folder, target, ignore=shutil.ignore_patterns(*_WEIGHT_FILES))
        model.save_pretrained(target, safe_serialization=True)
        (out / "plan.json").write_text(json.dumps(self.plan, indent=1))
        (out / "recipe.toml").write_text(compile_recipe(out / "plan.json", self.plan))
        return {"model": "model", "plan": "plan.json", "recipe": "recipe.toml"}


class DirectoryShrpTask(ShrpTask):
    def __init__(self, directory: Directory, recipe) -> None:
        _text_only(directory, "shrp")
        if recipe.options.get("expander"):
            raise UserError("shrp on a Hugging Face directory routes heads only", "leave expander = 0")
        super().__init__(directory, recipe)

    def teacher_of(self, module: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return _dense_outputs(module)

    def routed(self, entry: Directory, seed: int) -> Routed:

        states = copy.deepcopy(entry.module).eval()
        layers = list(transformer_layers(states))
        self.blocks = layers
        size = (entry.architecture["hidden_size"], entry.architecture["num_heads"])
        projections = [output_projection(layer) for layer in layers]
        return Routed(states, layers, projections, size, self.options, seed, output_distance(entry.output))
