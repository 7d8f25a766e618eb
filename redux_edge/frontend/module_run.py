"""A PyTorch module run on numpy feeds: the reference of every source that has a module. Apart from
``frontend/torch.py`` so that ``Source`` reaches it (deferring torch) without an import circle."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["run_module"]


def run_module(module: torch.nn.Module, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The PyTorch reference outputs for ``inputs``."""
    with torch.inference_mode():
        outputs = module(*(torch.from_numpy(array) for array in inputs.values()))
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
    return [output.numpy() for output in outputs]
