"""Which heads, feed-forward neurons and layers matter: scores, budgets and plans for the structural passes.

Three sources of importance, lower = removed first:

- ``magnitude`` (data-free): a head's output-value circuit, ||W_V[:, h]|| * ||W_O[h, :]||; a neuron's
  ||W_1[:, j]|| * ||W_2[j, :]||. Layers have no data-free score.
- ``calibration`` (measured on real inputs with ONNX Runtime): a head's score is the change of the model's
  output when that head alone is switched off (ablation, as in Michel et al., 2019, "Are Sixteen Heads
  Really Better than One?"); a neuron's is its mean absolute activation times ||W_2[j, :]|| (the size of
  what it writes into the residual stream); a layer's is its block influence 1 - cos(layer input, layer
  output) over tokens (Men et al., 2024, "ShortGPT"), over whole feature maps for CNN residual blocks.
- ``random``: a seeded baseline for comparisons. A ``plan`` file names the units directly.

Budgets are a fraction removed, the same share in every layer (regular shapes, predictable speed) or ranked
across layers after per-layer L2 normalisation as Michel et al. do (``scope = "global"``), or counts per
layer; a layer always keeps at least one head and one neuron, and a plan or count that would empty one is
refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from redux_edge.analysis import in_memory_runner
from redux_edge.errors import UserError
from redux_edge.interfaces import Feeds
from redux_edge.ir.blocks import AttentionBlock, FeedForwardBlock, Layer, find_structure
from redux_edge.ir.surgery import copy_model

__all__ = ["IMPORTANCE", "head_scores", "layer_scores", "load_plan", "neuron_scores", "select_lowest"]

IMPORTANCE = ("magnitude", "calibration", "random", "plan")


def load_plan(path: str, key: str) -> dict:
    """One section of a plan JSON file: ``{"heads": {"<layer>": [head, ...]}, "ffn": {"<layer>": [neuron,
    ...]}, "layers": [layer, ...]}``, with indices of the original model."""
    if not path:
        raise UserError("importance 'plan' needs a plan file", 'add plan = "path/to/plan.json"')
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read plan {path}: {exc}", "give a JSON plan file") from exc
    section = document.get(key) if isinstance(document, dict) else None
    if key == "layers":
        if not isinstance(section, list) or not all(isinstance(i, int) for i in section):
            raise UserError(f"plan {path} has no list of layer indices under 'layers'", "see docs")
        return {"layers": section}
    if not isinstance(section, dict) or not all(
        isinstance(units, list) and all(isinstance(i, int) for i in units) for units in section.values()
    ):
        raise UserError(f"plan {path} has no '{key}' mapping of layer -> indices", "see docs/ARCHITECTURE.md")
    try:
        return {int(layer): sorted(set(units)) for layer, units in section.items()}
    except ValueError as exc:
        raise UserError(f"plan {path}: layer keys must be integers", 'write "0": [1, 2]') from exc


def select_lowest(
    scores: dict[int, np.ndarray], fraction: float, per_layer: list[int], across_layers: bool = False
) -> dict[int, list[int]]:
    """The lowest-scoring units to remove per layer, keeping at least one in every layer."""
    layers = sorted(scores)
    if per_layer:
        if len(per_layer) != len(layers):
            raise UserError(
                f"per_layer gives {len(per_layer)} counts for {len(layers)} layers",
                "give one count per layer",
            )
        counts = dict(zip(layers, per_layer, strict=True))
    elif across_layers:
        normalised = {layer: s / (np.linalg.norm(s) or 1.0) for layer, s in scores.items()}
        ranked = sorted((value, layer) for layer, s in normalised.items() for value in s)
        budget = round(fraction * len(ranked))
        counts = dict.fromkeys(layers, 0)
        for _, layer in ranked:
            if budget == 0:
                break
            if counts[layer] < len(scores[layer]) - 1:
                counts[layer] += 1
                budget -= 1
    else:
        counts = {layer: round(fraction * len(scores[layer])) for layer in layers}
    for layer, count in counts.items():
        if count >= len(scores[layer]) or count < 0:
            raise UserError(
                f"cannot remove {count} of the {len(scores[layer])} units of layer {layer}",
                "every layer keeps at least one head and one neuron: lower the budget",
            )
    return {
        layer: sorted(np.argsort(scores[layer], kind="stable")[: counts[layer]].tolist()) for layer in layers
    }


def head_scores(
    model: ir.Model, blocks: list[AttentionBlock], method: str, calibration: Feeds | None, seed: int
) -> dict[int, np.ndarray]:
    if method == "magnitude":
        return {
            block.layer: np.linalg.norm(_heads(block.value.weight.T, block.heads), axis=(1, 2))
            * np.linalg.norm(_heads(block.output.weight, block.heads), axis=(1, 2))
            for block in blocks
        }
    if method == "random":
        rng = np.random.default_rng(seed)
        return {block.layer: rng.random(block.heads) for block in blocks}
    return _head_ablation(model, _require(calibration, "prune-heads"))


def neuron_scores(
    model: ir.Model, blocks: list[FeedForwardBlock], method: str, calibration: Feeds | None, seed: int
) -> dict[int, np.ndarray]:
    writes = {block.layer: np.linalg.norm(block.down.weight, axis=1) for block in blocks}
    if method == "magnitude":
        return {
            block.layer: np.linalg.norm(block.up.weight, axis=0) * writes[block.layer] for block in blocks
        }
    if method == "random":
        rng = np.random.default_rng(seed)
        return {block.layer: rng.random(block.width) for block in blocks}
    values = [block.down.input for block in blocks]
    activations = _intermediates(model, values, _require(calibration, "prune-ffn"))
    return {
        block.layer: np.abs(act).reshape(-1, block.width).mean(axis=0) * writes[block.layer]
        for block, act in zip(blocks, activations, strict=True)
    }


def layer_scores(
    model: ir.Model, layers: list[Layer], method: str, calibration: Feeds | None
) -> dict[int, float]:
    if method != "calibration":
        raise UserError(
            f"drop-layers has no '{method}' importance",
            'use importance = "calibration" (block influence), a plan, or name the layers',
        )
    values = [v for layer in layers for v in (layer.entry, layer.exit)]
    outputs = _intermediates(model, values, _require(calibration, "drop-layers"))
    scores = {}
    for index, layer in enumerate(layers):
        entry, exit_ = (_vectors(a) for a in outputs[2 * index : 2 * index + 2])
        cosine = (entry * exit_).sum(1) / (
            np.linalg.norm(entry, axis=1) * np.linalg.norm(exit_, axis=1) + 1e-12
        )
        scores[layer.index] = float(1.0 - cosine.mean())
    return scores


def _vectors(states: np.ndarray) -> np.ndarray:
    """Token vectors of [batch, seq, hidden] states; one vector per sample for feature maps."""
    return states.reshape(-1, states.shape[-1]) if states.ndim == 3 else states.reshape(states.shape[0], -1)


def _heads(matrix: np.ndarray, heads: int) -> np.ndarray:
    """[heads * head_dim, other] -> [heads, head_dim, other]."""
    return matrix.reshape(heads, -1, matrix.shape[-1])


def _require(calibration: Feeds | None, pass_name: str) -> Feeds:
    if not calibration:
        raise UserError(
            f"{pass_name} with calibration importance needs calibration inputs",
            "give --calibration-data with real samples (or compile a zoo model)",
        )
    return calibration


def _intermediates(model: ir.Model, values: list[ir.Value], feeds: Feeds) -> list[np.ndarray]:
    """The given intermediate values of ``model`` on ``feeds``."""
    names = [value.name for value in values]
    copy = copy_model(model)
    by_name = {output.name: output for node in copy.graph for output in node.outputs}
    copy.graph.outputs[:] = [by_name[name] for name in names]
    return in_memory_runner(copy)(feeds)


def _head_ablation(model: ir.Model, feeds: Feeds) -> dict[int, np.ndarray]:
    """Output change when each head alone is switched off."""
    change, heads = _gated(model, feeds)
    return {
        layer: np.array([change({layer: [head]}) for head in range(count)]) for layer, count in heads.items()
    }


def _gated(model: ir.Model, feeds: Feeds) -> tuple[Callable[[dict[int, list[int]]], float], dict[int, int]]:
    """``change(closed)``: 1 - cosine between the model's output with the ``closed`` heads switched off and
    its intact output, mean over samples; and the head count per layer. Every block gets a gate input
    multiplying the merged heads before the output projection ([.., heads * head size], whatever layout
    the attention used inside), so one ONNX Runtime session serves every run."""
    copy = copy_model(model)
    heads, head_dims = {}, {}
    for block in find_structure(copy).attention:
        gate = ir.Value(
            name=f"redux_edge_head_gate_{block.layer}",
            type=ir.TensorType(ir.DataType.FLOAT),
            shape=ir.Shape([block.heads * block.head_dim]),
        )
        copy.graph.inputs.append(gate)
        gated = ir.node("Mul", [block.output.input, gate], name=f"{block.output.matmul.name}_gate")
        copy.graph.insert_before(block.output.matmul, gated)
        block.output.matmul.replace_input_with(0, gated.outputs[0])
        heads[block.layer], head_dims[block.layer] = block.heads, block.head_dim
    run = in_memory_runner(copy)

    def outputs(closed: dict[int, list[int]]) -> np.ndarray:
        gates = {}
        for layer, count in heads.items():
            gate = np.ones(count, np.float32)
            gate[closed.get(layer, [])] = 0.0
            gates[f"redux_edge_head_gate_{layer}"] = np.repeat(gate, head_dims[layer])
        return _flat(run({**feeds, **gates})[0])

    baseline = outputs({})

    def change(closed: dict[int, list[int]]) -> float:
        ablated = outputs(closed)
        cosine = (baseline * ablated).sum(1) / (
            np.linalg.norm(baseline, axis=1) * np.linalg.norm(ablated, axis=1) + 1e-12
        )
        return float(1.0 - cosine.mean())

    return change, heads


def _flat(output: np.ndarray) -> np.ndarray:
    return output.reshape(output.shape[0], -1).astype(np.float64)
