"""Learned N:M masks, following MaskLLM (Fang et al., 2024, "MaskLLM: Learnable Semi-Structured Sparsity
for Large Language Models").

For every group of M weights along the reduction dimension, a learnable categorical distribution over the
C(M, N) candidate masks (the six of 2:4). Each step samples a differentiable mask per group with
Gumbel-softmax (temperature annealed from ``tau_start`` to ``tau_end``, logits scaled by ``kappa``), the
weights stay frozen, and the loss distils the dense model: 1 - cosine between the masked and the dense
model's output vectors on real calibration inputs (for a sentence encoder, every token's final state, as
the paper distils every token's logits). The logits start with a prior on the magnitude mask (the
paper's initialisation from a one-shot mask), so training begins where magnitude pruning ends. The result
is the most likely candidate of each group, saved as the plan file the ``sparsity`` pass applies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from redux_edge.ir import nm

__all__ = ["MaskLearner", "MaskTraining", "learn_masks"]


@dataclass
class MaskTraining:
    steps: int = 300
    lr: float = 0.05
    tau_start: float = 4.0
    tau_end: float = 0.05
    kappa: float = 1.0
    prior: float = 3.0
    seed: int = 0

    def tau(self, step: int) -> float:
        """Exponential annealing from tau_start to tau_end."""
        progress = step / max(1, self.steps - 1)
        return self.tau_start * (self.tau_end / self.tau_start) ** progress


def _groups(weight: torch.Tensor, m: int) -> torch.Tensor:
    return weight.movedim(1, -1).reshape(-1, m)


def _ungroup(grouped: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return grouped.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)


class MaskLearner(nn.Module):
    """Mask logits for the named weights of a frozen module; ``masks`` samples them differentiably."""

    def __init__(
        self, weights: dict[str, torch.Tensor], initial: dict[str, np.ndarray], n: int, m: int, prior: float
    ) -> None:
        super().__init__()
        self.n, self.m = n, m
        candidates = torch.from_numpy(nm.candidates(n, m))
        self.register_buffer("candidates", candidates)
        # A group's mask as an integer (bit i = position i kept) -> its candidate index.
        codes = (candidates * (2 ** torch.arange(m))).sum(1).long()
        lookup = torch.full((2**m,), -1, dtype=torch.long)
        lookup[codes] = torch.arange(len(candidates))
        self.shapes = {name: weight.shape for name, weight in weights.items()}
        self.keys = {name: name.replace(".", "__") for name in weights}
        self.logits = nn.ParameterDict()
        for name, keep in initial.items():
            grouped = _groups(torch.from_numpy(keep.astype(np.int64)), m)
            start = lookup[(grouped * (2 ** torch.arange(m))).sum(1)]
            logits = torch.zeros(len(start), len(candidates))
            logits[torch.arange(len(start)), start] = prior
            self.logits[self.keys[name]] = nn.Parameter(logits)

    def masks(self, tau: float, kappa: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
        sampled = {}
        for name, key in self.keys.items():
            logits = self.logits[key] * kappa
            uniform = torch.rand(logits.shape, generator=generator).clamp_(1e-10, 1.0 - 1e-10)
            soft = torch.softmax((logits - torch.log(-torch.log(uniform))) / tau, dim=1)
            sampled[name] = _ungroup(soft @ self.candidates, self.shapes[name])
        return sampled

    def most_likely(self) -> dict[str, np.ndarray]:
        return {
            name: _ungroup(self.candidates[self.logits[key].argmax(1)], self.shapes[name]).numpy() > 0.5
            for name, key in self.keys.items()
        }


def _distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cosine along the last axis, averaged over the vectors the teacher did not zero (padding)."""
    cosine = nn.functional.cosine_similarity(student, teacher, dim=-1)
    real = teacher.abs().amax(dim=-1) > 0
    return 1.0 - cosine[real].mean()


def learn_masks(
    module: nn.Module,
    initial: dict[str, np.ndarray],
    batches: Iterable[tuple[torch.Tensor, ...]],
    pattern: str,
    config: MaskTraining,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, np.ndarray]:
    """Masks for the weights named in ``initial`` (their magnitude masks), trained on ``batches`` of
    module inputs (cycled for ``config.steps`` steps)."""
    n, m = nm.parse_pattern(pattern)
    module.eval()
    parameters = dict(module.named_parameters())
    frozen = {name: parameters[name].detach() for name in initial}
    trainable = [p for p in parameters.values() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        return _train(module, frozen, initial, list(batches), n, m, config, progress)
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)


def _train(
    module: nn.Module,
    frozen: dict[str, torch.Tensor],
    initial: dict[str, np.ndarray],
    batches: list[tuple[torch.Tensor, ...]],
    n: int,
    m: int,
    config: MaskTraining,
    progress: Callable[[int, float], None] | None,
) -> dict[str, np.ndarray]:
    learner = MaskLearner(frozen, initial, n, m, config.prior)
    optimizer = torch.optim.Adam(learner.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        teachers = [module(*batch) for batch in batches]
    for step in range(config.steps):
        index = step % len(batches)
        masks = learner.masks(config.tau(step), config.kappa, generator)
        student = functional_call(
            module, {name: frozen[name] * mask for name, mask in masks.items()}, batches[index]
        )
        loss = _distance(student, teachers[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if progress is not None and math.isfinite(loss.item()):
            progress(step, loss.item())
    return learner.most_likely()
