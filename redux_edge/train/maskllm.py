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

``MaskStudent`` is the whole learner around a frozen module; the ``maskllm`` training task
(``train/tasks.py``) distils it on real sentences under torch.distributed, on one process for
``redux-edge learn-masks`` or on many.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from redux_edge.ir import nm

__all__ = ["MaskLearner", "MaskSchedule", "MaskStudent", "eligible_masks"]


@dataclass
class MaskSchedule:
    """The Gumbel-softmax temperature, annealed exponentially from ``tau_start`` to ``tau_end`` over
    ``steps``; ``prior``: the starting logit of each group's magnitude mask; ``seed``: the noise."""

    steps: int = 300
    tau_start: float = 4.0
    tau_end: float = 0.05
    prior: float = 3.0
    seed: int = 0

    def tau(self, step: int) -> float:
        progress = step / max(1, self.steps - 1)
        return self.tau_start * (self.tau_end / self.tau_start) ** progress


def _groups(weight: torch.Tensor, m: int) -> torch.Tensor:
    return weight.movedim(1, -1).reshape(-1, m)


def _ungroup(grouped: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return grouped.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)


class MaskLearner(nn.Module):
    """Mask logits for the named weights of a frozen module; ``masks`` samples them differentiably."""

    candidates: torch.Tensor

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


class MaskStudent(nn.Module):
    """``module`` (frozen) computing with the weights named in ``initial`` multiplied by masks sampled at
    each step; the mask logits are its only trainable parameters."""

    def __init__(
        self, module: nn.Module, initial: dict[str, np.ndarray], pattern: str, schedule: MaskSchedule
    ):
        super().__init__()
        n, m = nm.parse_pattern(pattern)
        self.module = module.requires_grad_(False)
        parameters = dict(module.named_parameters())
        self.frozen = {name: parameters[name].detach() for name in initial}
        self.learner = MaskLearner(self.frozen, initial, n, m, schedule.prior)
        self.schedule = schedule

    def forward(self, *inputs: torch.Tensor, step: int) -> torch.Tensor:
        # Every rank draws the same Gumbel noise at a step: one sample per step, as on one process.
        generator = torch.Generator().manual_seed(self.schedule.seed * 1_000_003 + int(step))
        masks = self.learner.masks(self.schedule.tau(int(step)), 1.0, generator)
        weights = {name: self.frozen[name] * mask for name, mask in masks.items()}
        return functional_call(self.module, weights, inputs)


def eligible_masks(module: nn.Module, pattern: str) -> dict[str, np.ndarray]:
    """Magnitude masks of the weights the ``sparsity`` pass would sparsify (the shared eligibility rule,
    on the module's Linear and Conv weights in PyTorch layout): where learning starts."""
    n, m = nm.parse_pattern(pattern)
    rule = nm.Eligibility(m)
    layers = [(name, sub) for name, sub in module.named_modules() if isinstance(sub, nn.Linear | nn.Conv2d)]
    uses: dict[int, int] = {}
    for _, sub in layers:
        uses[id(sub.weight)] = uses.get(id(sub.weight), 0) + 1
    return {
        f"{name}.weight": nm.magnitude_mask(sub.weight.detach().numpy(), n, m)
        for name, sub in layers
        if not rule.why_not(f"{name}.weight", tuple(sub.weight.shape), uses[id(sub.weight)] > 1)
    }
