"""Low-bit LoRA adapters: trained quantization-aware, stored as a few-KB pack per task.

LoRA (Hu et al., 2021) adds ``up @ down`` of rank ``rank`` to chosen projections of a frozen encoder
(default: every layer's attention query and value), and a linear head maps the encoder's output to the
task's classes. Following the low-bit adapter paper (adapters converge to flat minima and tolerate low
precision; docs/PAPERS.md), both factors are quantized to ``bits`` (1, 2, 4 or 8) with one scale per
output channel chosen to minimise the L2 quantization error: for 1 bit the sign times the row's mean
absolute value (the closed-form optimum), for more bits the best of a grid of clipping scales on a
symmetric integer grid. Training sees the quantized factors through the straight-through estimator.
``AdapterPack`` holds what a device needs: bit-packed codes, float16 scales (the LoRA scaling folded into
``up``), the float16 head, the labels and the measured accuracy.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from redux_edge.errors import UserError
from redux_edge.runtime.adapter_pack import encode_adapter_pack

__all__ = [
    "BITS",
    "AdapterPack",
    "AdapterTraining",
    "dequantize",
    "inject",
    "pack_adapters",
    "quantize",
]

BITS = (1, 2, 4, 8, 32)
_SCALE_GRID = torch.linspace(0.2, 1.0, 33)


def quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer codes, one scale per row) with ``codes * scale`` closest to ``weight`` in L2 per row."""
    if bits == 1:
        return torch.where(weight >= 0, 1.0, -1.0), weight.abs().mean(dim=1)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    peak = weight.abs().amax(dim=1).clamp(min=1e-12)
    scales = peak[None, :] * _SCALE_GRID[:, None] / max(high, 1)  # [grid, rows]
    codes = torch.clamp(torch.round(weight[None] / scales[..., None]), low, high)
    errors = ((codes * scales[..., None] - weight[None]) ** 2).sum(dim=2)
    best = errors.argmin(dim=0)
    rows = torch.arange(weight.shape[0])
    return codes[best, rows], scales[best, rows]


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return codes * scales[:, None]


def _fake_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 32:
        return weight
    quantized = dequantize(*quantize(weight.detach(), bits))
    return weight + (quantized - weight).detach()


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, bits: int) -> None:
        super().__init__()
        self.base, self.bits, self.scaling = base, bits, alpha / rank
        self.down = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.up = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = _fake_quantize(self.down, self.bits), _fake_quantize(self.up, self.bits)
        return self.base(x) + nn.functional.linear(nn.functional.linear(x, down), up) * self.scaling


@dataclass
class AdapterTraining:
    rank: int = 4
    alpha: float = 8.0
    bits: int = 1
    targets: str = r"attention\.self\.(query|value)$"
    seed: int = 0


@dataclass
class AdapterPack:
    """One task's adapters: per target weight (PyTorch name) the dequantizable factors, and the head."""

    task: str
    labels: list[str]
    bits: int
    rank: int
    factors: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]  # weight -> {"down"|"up": (codes, scales)}
    head_weight: np.ndarray  # [classes, hidden] float16
    head_bias: np.ndarray  # [classes] float16
    metrics: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:

        header = {
            "task": self.task,
            "labels": self.labels,
            "bits": self.bits,
            "rank": self.rank,
            "metrics": self.metrics,
            "factors": {
                name: {k: list(v[0].shape) for k, v in parts.items()} for name, parts in self.factors.items()
            },
            "head": list(self.head_weight.shape),
        }
        return encode_adapter_pack(header, self.factors, self.head_weight, self.head_bias)


def inject(module: nn.Module, config: AdapterTraining) -> dict[str, LoRALinear]:
    """Replace the target projections of ``module`` by LoRA-wrapped ones; name -> adapter."""
    pattern = re.compile(config.targets)
    adapters = {}
    for name, sub in list(module.named_modules()):
        if isinstance(sub, nn.Linear) and pattern.search(name):
            parent_name, _, child = name.rpartition(".")
            adapter = LoRALinear(sub, config.rank, config.alpha, config.bits)
            setattr(module.get_submodule(parent_name) if parent_name else module, child, adapter)
            adapters[f"{name}.weight"] = adapter
    if not adapters:
        raise UserError(f"no linear layer matches the adapter targets {config.targets!r}", "fix --targets")
    return adapters


def pack_adapters(
    adapters: dict[str, LoRALinear], head: nn.Linear, task: str, labels: list[str], config: AdapterTraining
) -> AdapterPack:
    """The pack of trained adapters: factors quantized to ``config.bits`` (the LoRA scaling folded into
    the up factor's scales) and the head in float16."""
    factors = {}
    with torch.no_grad():
        for name, adapter in adapters.items():
            parts = {}
            codes: torch.Tensor
            for part, weight, scaling in (("down", adapter.down, 1.0), ("up", adapter.up, adapter.scaling)):
                if config.bits == 32:
                    codes, scales = weight, torch.ones(weight.shape[0])
                else:
                    codes, scales = quantize(weight, config.bits)
                parts[part] = (
                    codes.numpy().astype(np.float32 if config.bits == 32 else np.int8),
                    (scales * scaling).numpy().astype(np.float16),
                )
            factors[name] = parts
    return AdapterPack(
        task=task,
        labels=labels,
        bits=config.bits,
        rank=config.rank,
        factors=factors,
        head_weight=head.weight.detach().numpy().astype(np.float16),
        head_bias=head.bias.detach().numpy().astype(np.float16),
    )
