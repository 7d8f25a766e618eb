"""The ``maskllm`` and ``adapters`` recipes as distributed tasks, on the trainers of ``train/maskllm.py``
(MaskLLM: Gumbel-softmax over the candidate N:M masks of every group, weights frozen) and
``train/adapters.py`` (low-bit LoRA, quantization-aware), so that they run under ZeRO on many processes
and write what ``compile`` reads: ``masks.npz`` for ``--sparsity-masks``, ``<task>.bin`` for ``--adapters``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import nn

from redux_edge.datasets import rotten_tomatoes
from redux_edge.errors import UserError
from redux_edge.files import save_arrays, write_atomically
from redux_edge.train.adapters import BITS, AdapterTraining, inject, pack_adapters
from redux_edge.train.data import DistillTask, SentenceBatches, sentence_distance
from redux_edge.train.maskllm import MaskSchedule, MaskStudent, eligible_masks
from redux_edge.zoo.bert import BertSentenceEncoder, TokenStates

__all__ = ["AdapterTask", "MaskTask"]


@dataclass
class MaskOptions:
    pattern: str = "2:4"
    tau_start: float = 4.0
    tau_end: float = 0.05
    prior: float = 3.0


class _MaskDistilled(nn.Module):
    """The MaskLLM student of the dense model's token states; its loss, the distance to the teacher's."""

    def __init__(self, dense: nn.Module, options: MaskOptions, steps: int, seed: int) -> None:

        super().__init__()
        states = TokenStates(copy.deepcopy(dense))
        schedule = MaskSchedule(steps, options.tau_start, options.tau_end, options.prior, seed)
        self.student = MaskStudent(states, eligible_masks(states, options.pattern), options.pattern, schedule)
        self.pattern = options.pattern

    def forward(self, input_ids, attention_mask, teacher, step) -> torch.Tensor:
        states = self.student(input_ids, attention_mask, step=int(step))
        return sentence_distance(states, teacher, attention_mask)


class MaskTask(DistillTask):
    def __init__(self, entry, recipe) -> None:
        super().__init__(entry, recipe)
        options = MaskOptions(**recipe.options)
        self.module = _MaskDistilled(entry.module, options, recipe.optim.steps, recipe.optim.seed)
        self.blocks: list[nn.Module] = []

    def batch(self, step: int, rank: int, world: int) -> tuple[torch.Tensor, ...]:
        return (*super().batch(step, rank, world), torch.tensor(step))

    def finish(self, state: dict[str, torch.Tensor], out: Path) -> dict:
        distilled = self.module
        assert isinstance(distilled, _MaskDistilled)
        learner = distilled.student.learner
        with torch.no_grad():
            for key, logits in learner.logits.items():
                logits.copy_(state[f"student.learner.logits.{key}"].detach().cpu())
        learned = learner.most_likely()

        write_atomically(out / "masks.npz", lambda path: save_arrays(path, learned, compressed=True))
        return {"masks": "masks.npz", "pattern": distilled.pattern, "weights": len(learned)}


@dataclass
class AdapterOptions:
    task: str = "sentiment"
    bits: int = 1
    rank: int = 4


class _Adapted(nn.Module):
    def __init__(self, dense: nn.Module, classes: int, config) -> None:

        super().__init__()
        self.encoder = copy.deepcopy(dense).eval().requires_grad_(False)
        self.adapters = inject(self.encoder, config)
        self.head = nn.Linear(cast(BertSentenceEncoder, dense).config.hidden_size, classes)

    def forward(self, input_ids, attention_mask, labels) -> torch.Tensor:
        return nn.functional.cross_entropy(self.head(self.encoder(input_ids, attention_mask)), labels)


class AdapterTask:
    def __init__(self, entry, recipe) -> None:

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

        student = self.module
        student.load_state_dict({name: value.cpu() for name, value in state.items()})
        pack = pack_adapters(student.adapters, student.head, self.options.task, self.labels, self.config)
        blob = pack.to_bytes()
        name = f"{self.options.task}.bin"
        write_atomically(out / name, lambda path: path.write_bytes(blob))
        return {"pack": name, "bytes": len(blob), "bits": self.options.bits}
