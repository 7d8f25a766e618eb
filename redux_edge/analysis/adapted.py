"""The exact reference of a bundle that carries a low-bit adapter pack: the model's module with the pack's
factors, as the device's reader reads them back, added to its linear layers. In the analysis layer, so the
``adapters`` pass and training both reach it without the passes importing training."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

__all__ = ["PackedAdapters"]


class _FixedLoRA(nn.Module):
    down: torch.Tensor
    up: torch.Tensor

    def __init__(self, base: nn.Linear, down: np.ndarray, up: np.ndarray) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("down", torch.from_numpy(down))
        self.register_buffer("up", torch.from_numpy(up))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + nn.functional.linear(nn.functional.linear(x, self.down), self.up)


class PackedAdapters(nn.Module):
    """A copy of ``module`` computing with a pack as read back from its bytes (``read_adapter_pack``, the
    device's reader); returns (output, logits). This is the exact reference a bundle with the pack is
    checked against, and what task accuracy is measured on."""

    def __init__(self, module: nn.Module, pack: dict) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(module).eval()
        for name, parts in pack["factors"].items():
            parent_name, _, child = name.removesuffix(".weight").rpartition(".")
            parent = self.encoder.get_submodule(parent_name) if parent_name else self.encoder
            setattr(parent, child, _FixedLoRA(getattr(parent, child), parts["down"], parts["up"]))
        self.head = nn.Linear(pack["head_weight"].shape[1], pack["head_weight"].shape[0])
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(pack["head_weight"]))
            self.head.bias.copy_(torch.from_numpy(pack["head_bias"]))

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.encoder(*inputs)
        return output, self.head(output)
