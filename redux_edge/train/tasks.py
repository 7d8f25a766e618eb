"""The ``maskllm`` and ``adapters`` recipes as distributed tasks, on the trainers of ``train/maskllm.py``
(MaskLLM: Gumbel-softmax over the candidate N:M masks of every group, weights frozen) and
``train/adapters.py`` (low-bit LoRA, quantization-aware), so that they run under ZeRO on many processes
and write what ``compile`` reads: ``masks.npz`` for ``--sparsity-masks``, ``<task>.bin`` for ``--adapters``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from redux_edge.errors import UserError
from redux_edge.files import write_atomically
from redux_edge.ir import nm
from redux_edge.train.data import DistillTask, SentenceBatches, sentence_distance
from redux_edge.zoo.bert import TokenStates

__all__ = ["AdapterTask", "MaskTask"]

# The sparsity pass's defaults for what is worth sparsifying: every encoder projection of BERT models.
_MIN_WEIGHTS = 16384


@dataclass
class MaskOptions:
    pattern: str = "2:4"
    tau_start: float = 4.0
    tau_end: float = 0.05
    prior: float = 3.0


class _MaskStudent(nn.Module):
    def __init__(self, dense: nn.Module, options: MaskOptions, steps: int, seed: int) -> None:
        from redux_edge.train.maskllm import MaskLearner

        super().__init__()
        self.n, self.m = nm.parse_pattern(options.pattern)
        self.states = TokenStates(copy.deepcopy(dense)).requires_grad_(False)
        self.frozen = {
            name: weight.detach()
            for name, weight in self.states.named_parameters()
            if name.startswith("encoder.") and weight.ndim == 2 and weight.numel() >= _MIN_WEIGHTS
        }
        initial = {name: nm.magnitude_mask(w.numpy(), self.n, self.m) for name, w in self.frozen.items()}
        self.learner = MaskLearner(self.frozen, initial, self.n, self.m, options.prior)
        self.options, self.steps, self.seed = options, steps, seed

    def forward(self, input_ids, attention_mask, teacher, step) -> torch.Tensor:
        progress = float(step) / max(1, self.steps - 1)
        tau = self.options.tau_start * (self.options.tau_end / self.options.tau_start) ** progress
        # Every rank draws the same Gumbel noise at a step: one sample per step, as on one process.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        masks = self.learner.masks(tau, 1.0, generator)
        weights = {name: self.frozen[name] * mask for name, mask in masks.items()}
        states = functional_call(self.states, weights, (input_ids, attention_mask))
        return sentence_distance(states, teacher, attention_mask)


class MaskTask(DistillTask):
    def __init__(self, entry, recipe) -> None:
        super().__init__(entry, recipe)
        options = MaskOptions(**recipe.options)
        self.module = _MaskStudent(entry.module, options, recipe.optim.steps, recipe.optim.seed)
        self.blocks: list[nn.Module] = []

    def batch(self, step: int, rank: int, world: int) -> tuple[torch.Tensor, ...]:
        return (*super().batch(step, rank, world), torch.tensor(step))

    def finish(self, state: dict[str, torch.Tensor], out: Path) -> dict:
        student = self.module
        learned = {}
        for name, key in student.learner.keys.items():
            logits = state[f"learner.logits.{key}"].detach().cpu()
            chosen = student.learner.candidates.cpu()[logits.argmax(1)]
            shape = student.learner.shapes[name]
            learned[name] = (chosen.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1) > 0.5).numpy()

        def write(path: Path) -> None:
            with path.open("wb") as handle:
                np.savez_compressed(handle, **learned)

        write_atomically(out / "masks.npz", write)
        return {"masks": "masks.npz", "pattern": student.options.pattern, "weights": len(learned)}


@dataclass
class AdapterOptions:
    task: str = "sentiment"
    bits: int = 1
    rank: int = 4


class _Adapted(nn.Module):
    def __init__(self, dense: nn.Module, classes: int, config) -> None:
        from redux_edge.train.adapters import inject

        super().__init__()
        self.encoder = copy.deepcopy(dense).eval().requires_grad_(False)
        self.adapters = inject(self.encoder, config)
        self.head = nn.Linear(dense.config.hidden_size, classes)

    def forward(self, input_ids, attention_mask, labels) -> torch.Tensor:
        return nn.functional.cross_entropy(self.head(self.encoder(input_ids, attention_mask)), labels)


class AdapterTask:
    def __init__(self, entry, recipe) -> None:
        from redux_edge.datasets import rotten_tomatoes
        from redux_edge.train.adapters import BITS, AdapterTraining

        options = AdapterOptions(**recipe.options)
        if options.bits not in BITS or options.task not in rotten_tomatoes.TASKS:
            raise UserError(
                f"adapters: task {options.task!r} at {options.bits} bits",
                f"tasks: {', '.join(rotten_tomatoes.TASKS)}; bits: {', '.join(map(str, BITS))}",
            )
        data = rotten_tomatoes.load(
            train=recipe.data.sentences, test=0, seed=recipe.optim.seed, task=options.task
        )
        self.labels = list(rotten_tomatoes.TASKS[options.task])
        self.config = AdapterTraining(bits=options.bits, rank=options.rank, seed=recipe.optim.seed)
        self.options = options
        self.module = _Adapted(entry.module, len(self.labels), self.config)
        self.blocks: list[nn.Module] = []
        self.targets = torch.from_numpy(data.train_labels).long()
        self.data = SentenceBatches(
            entry.preprocessor,
            data.train_texts,
            recipe.optim.global_batch,
            recipe.data.max_length,
            recipe.optim.seed,
        )
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> None:
        self.device = device
        self.module.to(device)

    def batch(self, step: int, rank: int, world: int) -> tuple[torch.Tensor, ...]:
        input_ids, attention_mask = self.data.batch(step, rank, world)
        labels = self.targets[self.data.rows(step, rank, world)[0]]
        return tuple(t.to(self.device) for t in (input_ids, attention_mask, labels))

    def finish(self, state: dict[str, torch.Tensor], out: Path) -> dict:
        from redux_edge.train.adapters import pack_adapters

        student = self.module
        student.load_state_dict({name: value.cpu() for name, value in state.items()})
        pack = pack_adapters(student.adapters, student.head, self.options.task, self.labels, self.config)
        blob = pack.to_bytes()
        name = f"{self.options.task}.bin"
        write_atomically(out / name, lambda path: path.write_bytes(blob))
        return {"pack": name, "bytes": len(blob), "bits": self.options.bits}
