"""The exact references a structurally pruned model is checked against.

For a model given as an ONNX file, ``masked_graph`` does the same on a copy of the original graph: the
removed heads' rows of the output projection and the removed neurons' rows of the second feed-forward
projection are zeroed, and dropped layers are bypassed, all without slicing anything.

A plan (``{"heads": {layer: [head, ...]}, "ffn": {layer: [neuron, ...]}, "layers": [layer, ...]}``) applied
without removing anything: in PyTorch, forward hooks zero the chosen heads' slices of the attention output
projection's input (that is the heads' outputs), zero the chosen neurons at the input of the second
feed-forward projection, and return a skipped layer's input as its output. The hooks address modules by the
Hugging Face BERT-family layout (``encoder.layer[i].attention.output.dense``, ``output.dense``; DistilBert's
``transformer.layer[i].attention.out_lin``, ``ffn.lin2``; ViT's ``layers[i].attention.o_proj``,
``mlp.fc2``), which our zoo's BERT also follows.

Weight masks (``{weight name: keep mask}``, names and layout as in ``redux_edge.ir.weights``) are
multiplied into the PyTorch parameters of those names, or into the graph's weights, for the duration.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NoReturn

import onnx_ir as ir
import torch
from torch import nn

from redux_edge.errors import UserError
from redux_edge.ir.blocks import find_structure
from redux_edge.ir.surgery import bypass, head_columns, new_initializer, replace_linear
from redux_edge.ir.weights import find_weights

__all__ = ["masked", "masked_graph", "output_projection", "transformer_layers"]

_LAYER_LISTS = ("encoder.layer", "transformer.layer", "layers")
_OUTPUT_PROJECTIONS = ("attention.output.dense", "attention.out_lin", "attention.o_proj")
_FFN_DOWN = ("output.dense", "ffn.lin2", "mlp.fc2")


def _find(module: nn.Module, names: tuple[str, ...], nested: bool = False) -> nn.Module:
    """The submodule called one of ``names``; ``nested`` also finds it under a wrapper's prefix."""
    for name, sub in module.named_modules():
        if any(name == n or (nested and name.endswith("." + n)) for n in names):
            return sub
    raise ValueError(f"no submodule named {' or '.join(names)} in {type(module).__name__}")


def transformer_layers(module: nn.Module) -> nn.ModuleList:
    """The transformer layers of a BERT-family or ViT module (or a wrapper around one)."""
    layers = _find(module, _LAYER_LISTS, nested=True)
    assert isinstance(layers, nn.ModuleList), "the layer list of the BERT-family layout"
    return layers


def output_projection(layer: nn.Module) -> nn.Module:
    """A transformer layer's attention output projection (its input: the heads' contexts)."""
    return _find(layer, _OUTPUT_PROJECTIONS)


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
def masked(module: nn.Module, plan: dict, head_dim: int, weights: dict | None = None) -> Iterator[nn.Module]:
    """``module`` computing as if ``plan`` were applied and ``weights`` masks multiplied in, for the
    duration of the block."""
    handles = []
    originals = _mask_parameters(module, weights or {})
    try:
        layers: Any = transformer_layers(module) if plan else []
        for layer, heads in plan.get("heads", {}).items():
            columns = torch.from_numpy(head_columns(heads, head_dim))
            target = output_projection(layers[int(layer)])
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
        with torch.no_grad():
            for parameter, original in originals:
                parameter.copy_(original)


def _unfit(name: str) -> NoReturn:
    raise UserError(
        f"the sparsity mask of {name} does not fit the original model: was it pruned before?",
        "sparsify a pruned model in a second compile: --model <pruned bundle>/model.onnx --sparsity 2:4",
    )


def _mask_parameters(module: nn.Module, weights: dict) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Multiply the named parameters by their keep masks; the originals, to put back."""
    parameters = dict(module.named_parameters())
    originals: list[tuple[nn.Parameter, torch.Tensor]] = []
    with torch.no_grad():
        for name, keep in weights.items():
            parameter = parameters.get(name)
            if parameter is None or tuple(parameter.shape) != keep.shape:
                for restored, original in originals:
                    restored.copy_(original)
                _unfit(name)
            originals.append((parameter, parameter.detach().clone()))
            parameter.mul_(torch.from_numpy(keep).to(parameter.dtype))
    return originals


def masked_graph(model: ir.Model, plan: dict, weights: dict | None = None) -> ir.Model:
    """``model`` (changed in place and returned) computing as if ``plan`` were applied and ``weights``
    masks multiplied in."""
    masks = weights or {}
    for found in find_weights(model):
        if found.name in masks:
            if found.torch_layout.shape != masks[found.name].shape:
                _unfit(found.name)
            masked_weight = found.stored(found.torch_layout * masks[found.name])
            found.node.replace_input_with(
                1, new_initializer(model.graph, masked_weight, str(found.value.name))
            )
    structure = find_structure(model)
    attention = {block.layer: block for block in structure.attention}
    feed_forward = {block.layer: block for block in structure.feed_forward}
    for layer, heads in plan.get("heads", {}).items():
        heads_block = attention[int(layer)]
        weight = heads_block.output.weight.copy()
        weight[head_columns(heads, heads_block.head_dim)] = 0.0
        replace_linear(model.graph, heads_block.output, weight, heads_block.output.bias)
    for layer, neurons in plan.get("ffn", {}).items():
        ffn_block = feed_forward[int(layer)]
        weight = ffn_block.down.weight.copy()
        weight[neurons] = 0.0
        replace_linear(model.graph, ffn_block.down, weight, ffn_block.down.bias)
    layers = {layer.index: layer for layer in structure.layers}
    for index in sorted(plan.get("layers", []), reverse=True):
        bypass(model.graph, layers[index].exit, layers[index].entry)
    return model
