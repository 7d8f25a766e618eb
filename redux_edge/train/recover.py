"""``recover``: fine-tune a structurally pruned model by distillation from its dense original, to win back
what pruning cost (the recovery step of SHRP and of layer-dropping work; docs/PAPERS.md).

The student is the zoo model with a plan applied the way the exact reference applies it: removed heads'
and neurons' outputs zeroed by hooks (``analysis.reference.masked``), dropped layers replaced by a
pass-through. Every remaining weight but the embeddings is trained so that each real token's final state
matches the dense model's (1 - cosine, per sentence, on Rotten Tomatoes training snippets). The result is
written in the original shapes (``weights.safetensors``; removed units keep their old values, which the
passes then remove) with the plan and a compile recipe that applies exactly that plan::

    redux-edge compile --model minilm-l6 --weights <out>/weights.safetensors --recipe <out>/recipe.toml
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from redux_edge.errors import UserError
from redux_edge.train.data import DistillTask, sentence_distance
from redux_edge.zoo.bert import BertSentenceEncoder, TokenStates

__all__ = ["RecoverTask", "compile_recipe", "read_plan"]


def read_plan(path: str) -> dict:
    """A plan JSON, or the plan a compile recorded in its bundle's manifest (``compression.plan``)."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(
            f"cannot read plan {path}: {exc}", "give a plan JSON or a bundle's manifest.json"
        ) from exc
    plan = document.get("compression", {}).get("plan") if "format_version" in document else document
    if not isinstance(plan, dict) or not plan:
        raise UserError(
            f"{path} holds no structural plan", "give the manifest of a bundle compiled with pruning"
        )
    return plan


class _PassThrough(nn.Module):
    """A dropped transformer layer: its input is its output."""

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        return hidden


class _Student(nn.Module):
    def __init__(self, encoder: BertSentenceEncoder) -> None:
        super().__init__()
        self.states = TokenStates(encoder)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, teacher: torch.Tensor
    ) -> torch.Tensor:
        return sentence_distance(self.states(input_ids, attention_mask), teacher, attention_mask)


@dataclass
class Options:
    plan: str = ""


class RecoverTask(DistillTask):
    def __init__(self, entry, recipe) -> None:
        from redux_edge.analysis.reference import masked

        super().__init__(entry, recipe)
        options = Options(**recipe.options)
        if not options.plan:
            raise UserError(
                "recover needs the plan of the pruned model", "pass --plan <bundle>/manifest.json"
            )
        self.plan = read_plan(options.plan)
        self.original = {name: value.detach().clone() for name, value in entry.module.state_dict().items()}
        encoder = BertSentenceEncoder(entry.module.config)
        encoder.load_state_dict(self.original)
        layers = encoder.encoder.layer
        for index in self.plan.get("layers", []):
            layers[int(index)] = _PassThrough()
        head_dim = entry.architecture["hidden_size"] // entry.architecture["num_heads"]
        # The hooks stay for the task's life: the student is the pruned model throughout.
        self._hooks = contextlib.ExitStack()
        dropped = {str(index) for index in self.plan.get("layers", [])}
        units = {
            key: {layer: units for layer, units in self.plan.get(key, {}).items() if layer not in dropped}
            for key in ("heads", "ffn")
        }
        self._hooks.enter_context(masked(encoder, units, head_dim))
        encoder.embeddings.requires_grad_(False)
        self.module = _Student(encoder)
        self.blocks = [layer for layer in layers if not isinstance(layer, _PassThrough)]

    def finish(self, state: dict[str, torch.Tensor], out: Path) -> dict:
        """Rank 0: the trained weights under the zoo model's names, in the original shapes."""
        prefix = "states."
        trained = {name[len(prefix) :]: value for name, value in state.items() if name.startswith(prefix)}
        weights = {
            name: trained.get(name, original).detach().cpu().contiguous()
            for name, original in self.original.items()
        }
        save_file(weights, str(out / "weights.safetensors"))
        (out / "plan.json").write_text(json.dumps(self.plan, indent=1))
        (out / "recipe.toml").write_text(compile_recipe(out / "plan.json", self.plan))
        return {"weights": "weights.safetensors", "plan": "plan.json", "recipe": "recipe.toml"}


def compile_recipe(plan_file: Path, plan: dict) -> str:
    """A compile recipe that removes exactly the plan's units (it names the plan by absolute path)."""
    lines = ["# Written by `redux-edge train`: removes exactly the units of the plan beside it.", ""]
    # Layers last: a plan may name heads or neurons of a layer it also drops (a compile that pruned first).
    for name, key in (("prune-heads", "heads"), ("prune-ffn", "ffn"), ("drop-layers", "layers")):
        if plan.get(key):
            lines += [
                "[[passes]]",
                f'pass = "{name}"',
                'importance = "plan"',
                f'plan = "{plan_file.resolve()}"',
                "",
            ]
    return "\n".join([*lines, "[[passes]]", 'pass = "cleanup"', ""])
