"""What every distributed training task shares: a deterministic global batch per step, split over ranks,
and the distillation distance to the dense model.

The global batch of step ``s`` is a fixed function of ``s`` and the seed (a new permutation of the training
sentences per epoch), and rank ``r`` of ``w`` takes the ``r``-th of ``w`` equal slices, padded to the global
batch's longest sentence: so 1 process and ``w`` processes see the same examples in the same order, and a
resumed run sees what an uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from redux_edge.datasets import rotten_tomatoes
from redux_edge.errors import UserError
from redux_edge.zoo.bert import TokenStates

__all__ = [
    "DistillTask",
    "SentenceBatches",
    "global_batch_indices",
    "rank_share",
    "sentence_distance",
    "token_states_teacher",
]


def global_batch_indices(count: int, step: int, global_batch: int, seed: int) -> np.ndarray:
    """The examples of step ``step``'s global batch: a new permutation of the ``count`` examples per epoch."""
    first = step * global_batch
    chosen: list[int] = []
    while len(chosen) < global_batch:
        epoch, offset = divmod(first + len(chosen), count)
        order = np.random.default_rng([seed, epoch]).permutation(count)
        chosen.extend(order[offset : offset + global_batch - len(chosen)].tolist())
    return np.asarray(chosen)


def rank_share(rows: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's equal slice of a global batch."""
    if len(rows) % world:
        raise UserError(
            f"global batch {len(rows)} does not split over {world} processes",
            "make optim.global_batch a multiple of the number of processes",
        )
    share = len(rows) // world
    return rows[rank * share : (rank + 1) * share]


class SentenceBatches:
    def __init__(self, preprocessor, texts: list[str], global_batch: int, max_length: int, seed: int) -> None:
        encoded = preprocessor(texts)  # once: tokenizing per step would cost more than a small step
        self.input_ids, self.attention_mask = encoded["input_ids"], encoded["attention_mask"]
        self.global_batch = global_batch
        self.max_length = max_length
        self.seed = seed

    def indices(self, step: int) -> np.ndarray:
        return global_batch_indices(len(self.input_ids), step, self.global_batch, self.seed)

    def rows(self, step: int, rank: int, world: int) -> tuple[np.ndarray, int]:
        """This rank's sentences of step ``step``, and the global batch's padded length."""
        chosen = self.indices(step)
        length = min(self.max_length, int(self.attention_mask[chosen].sum(axis=1).max()))
        return rank_share(chosen, rank, world), length

    def batch(self, step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of this rank's share of step ``step``."""
        mine, length = self.rows(step, rank, world)
        return (
            torch.from_numpy(self.input_ids[mine, :length]),
            torch.from_numpy(self.attention_mask[mine, :length]),
        )


def token_states_teacher(module: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The dense model's token states, without gradients: what the students are distilled towards."""

    teacher = TokenStates(module).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)

    def states(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return teacher(input_ids, attention_mask)

    return states


def sentence_distance(
    student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Mean over sentences of (1 - mean cosine over the sentence's real tokens): a mean of equal-weight
    terms per sentence, so that the average over ranks equals the loss of the whole global batch."""
    cosine = torch.nn.functional.cosine_similarity(student, teacher, dim=-1)
    mask = attention_mask.to(cosine.dtype)
    per_sentence = (cosine * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return 1.0 - per_sentence.mean()


class DistillTask:
    """A task whose module is distilled from the dense zoo model on Rotten Tomatoes training snippets:
    each batch carries the dense model's token states as the target."""

    module: torch.nn.Module
    blocks: list[torch.nn.Module]

    def __init__(self, entry, recipe) -> None:

        texts = rotten_tomatoes.load(train=recipe.data.sentences, test=0).train_texts
        self.data = SentenceBatches(
            entry.preprocessor, texts, recipe.optim.global_batch, recipe.data.max_length, recipe.optim.seed
        )
        self.dense = entry.module
        self.teacher = self.teacher_of(entry.module)
        self.device = torch.device("cpu")

    def teacher_of(self, module: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The distillation target of a batch: here the zoo encoder's token states."""
        return token_states_teacher(module)

    def to(self, device: torch.device) -> None:
        self.device = device
        self.dense.to(device)
        self.module.to(device)

    def batch(self, step: int, rank: int, world: int) -> tuple[torch.Tensor, ...]:
        input_ids, attention_mask = (t.to(self.device) for t in self.data.batch(step, rank, world))
        return input_ids, attention_mask, self.teacher(input_ids, attention_mask)
