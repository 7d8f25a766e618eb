"""The exact references a structurally pruned model is checked against.

A plan (``{"heads": {layer: [head, ...]}, "ffn": {layer: [neuron, ...]}, "layers": [layer, ...]}``) applied
without removing anything: in PyTorch, forward hooks zero the chosen heads' slices of the attention output
projection's input (that is the heads' outputs), zero the chosen neurons at the input of the second
feed-forward projection, and return a skipped layer's input as its output. The hooks address modules by the
Hugging Face BERT-family layout (``encoder.layer[i].attention.output.dense``, ``output.dense``; DistilBert's
``transformer.layer[i].attention.out_lin``, ``ffn.lin2``), which our zoo's BERT also follows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["masked"]

_LAYER_LISTS = ("encoder.layer", "transformer.layer")
_OUTPUT_PROJECTIONS = ("attention.output.dense", "attention.out_lin")
_FFN_DOWN = ("output.dense", "ffn.lin2")


def _find(module: nn.Module, names: tuple[str, ...], nested: bool = False) -> nn.Module:
    """The submodule called one of ``names``; ``nested`` also finds it under a wrapper's prefix."""
    for name, sub in module.named_modules():
        if any(name == n or (nested and name.endswith("." + n)) for n in names):
            return sub
    raise ValueError(f"no submodule named {' or '.join(names)} in {type(module).__name__}")


def _zero_columns(indices: torch.Tensor):
    def hook(_: nn.Module, args: tuple) -> tuple:
        masked = args[0].clone()
        masked[..., indices] = 0.0
        return (masked, *args[1:])

    return hook


def _skip(_: nn.Module, args: tuple, kwargs: dict, output):
    hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


@contextlib.contextmanager
def masked(module: nn.Module, plan: dict, head_dim: int) -> Iterator[nn.Module]:
    """``module`` computing as if ``plan`` were applied, for the duration of the block."""
    layers = _find(module, _LAYER_LISTS, nested=True)
    handles = []
    try:
        for layer, heads in plan.get("heads", {}).items():
            columns = (torch.tensor(heads)[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
            target = _find(layers[int(layer)], _OUTPUT_PROJECTIONS)
            handles.append(target.register_forward_pre_hook(_zero_columns(columns)))
        for layer, neurons in plan.get("ffn", {}).items():
            target = _find(layers[int(layer)], _FFN_DOWN)
            handles.append(target.register_forward_pre_hook(_zero_columns(torch.tensor(neurons))))
        for layer in plan.get("layers", []):
            handles.append(layers[int(layer)].register_forward_hook(_skip, with_kwargs=True))
        yield module
    finally:
        for handle in handles:
            handle.remove()
