"""The ``compression`` section of a bundle: what the structural and weight-masking passes removed, the
exact reference they are checked against, and what it cost and bought.

Structural passes (``prune-heads``, ``prune-ffn``, ``drop-layers``) report the units they removed
(``UnitsRemoved``), merged into one *plan* in original layer numbers; weight-masking passes (``sparsity``)
report keep masks by PyTorch parameter name (``WeightsMasked``). The reference is the original
computation with the plan masked in and the masks multiplied into the weights: PyTorch hooks for a
BERT-family module, zeroed weights on the dense ONNX copy otherwise (``analysis/reference.py``). The
report: architecture before and after, task quality of dense vs compressed on the card's data, latency of
both through the same backend, and for N:M masks the per-weight report and the packed storage.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from redux_edge.analysis.quality import quality_line, quality_report
from redux_edge.analysis.speed import BLOCKS, CALLS, alternating_p50, timing_feeds
from redux_edge.files import human_bytes
from redux_edge.ir.blocks import find_structure
from redux_edge.ir.nm import parse_pattern
from redux_edge.packing import pack_bundle_models
from redux_edge.passes.contract import CompileContext, PassOutcome, ReferenceChange, Section
from redux_edge.runtime.session import open_artifact
from redux_edge.targets import load_target

if TYPE_CHECKING:
    from torch import nn

__all__ = ["CompressionSection", "UnitsRemoved", "WeightsMasked", "speed_against"]


class CompressionSection(Section):
    key = "compression"

    def __init__(self, outcomes: list[PassOutcome]) -> None:
        super().__init__(outcomes)
        self.plan = {
            key: units
            for outcome in outcomes
            if isinstance(outcome, UnitsRemoved)
            for key, units in outcome.removed.items()
            if units
        }
        self.masking = [outcome for outcome in outcomes if isinstance(outcome, WeightsMasked)]
        self.masks = {name: keep for outcome in self.masking for name, keep in outcome.masks.items()}
        self.calibration = next(
            (o.calibration for o in outcomes if isinstance(o, UnitsRemoved) and o.calibration), None
        )
        self.storage: dict | None = None

    def backend_options(self) -> dict:
        # TensorRT builds sparse tactics only when asked (trtexec --sparsity=enable).
        return {"sparsity": self.masking[-1].pattern} if self.masks else {}

    def reference(self) -> ReferenceChange | None:
        return _Masked(self.plan, self.masks) if self.plan or self.masks else None

    def stage(self, context: CompileContext) -> dict:
        """Store the bundle's N:M weights packed (kept values and positions); the manifest's index."""

        patterns = {outcome.pattern for outcome in self.masking if outcome.masks}
        if len(patterns) != 1 or context.stage is None:
            return {}
        self.storage = pack_bundle_models(context.stage, *parse_pattern(patterns.pop()))
        return {"storage": self.storage}

    def report(self, context: CompileContext) -> dict:
        if not (self.plan or self.masks):
            return {}
        report = _report(self, context)
        if self.masking:
            report["sparsity"] = self._sparsity(context)
        return {self.key: report}

    def _sparsity(self, context: CompileContext) -> dict:
        entries = [entry for outcome in self.masking for entry in outcome.report]
        return {
            "pattern": self.masking[-1].pattern,
            # Without sparse tensor cores the weights run dense: the gain is the bundle's size only.
            "target_has_sparse_tensor_cores": bool(context.target.sparse_tensor_cores),
            # A family's boards differ: sparse tactics are built on those that have the cores.
            "boards_with_sparse_tensor_cores": [
                name for name in context.target.members if load_target(name).sparse_tensor_cores
            ],
            "sparsified": sum(entry["sparsified"] for entry in entries),
            "weights": len(entries),
            "layers": entries,
            "storage": {k: v for k, v in (self.storage or {}).items() if k != "packed_files"},
        }

    @staticmethod
    def render(section: dict, manifest: Mapping[str, Any]) -> list[str]:

        lines = []
        before = section["architecture"]["original"]
        if section["plan"]:
            calibrated = f"  (calibrated on {section['calibration']})" if section["calibration"] else ""
            heads = per_layer(before["heads_per_layer"])
            lines.append(
                f"  removed  from {before['layers']} layers with heads {heads}: "
                + ", ".join(f"{key} {_count_units(units)}" for key, units in section["plan"].items())
                + calibrated
            )
        if sparsity := section.get("sparsity"):
            storage = sparsity["storage"]
            packed = (
                f"; stored packed: {human_bytes(storage['sparse_weights_dense_bytes'])} -> "
                f"{human_bytes(storage['sparse_weights_packed_bytes'])} ({storage['packed_to_dense']:.2f}x)"
                if storage.get("packed_to_dense")
                else ""
            )
            masks = sorted({entry["mask"] for entry in sparsity["layers"] if entry["sparsified"]})
            boards = sparsity.get("boards_with_sparse_tensor_cores")
            runs = (
                "sparse tensor cores on this target"
                if sparsity["target_has_sparse_tensor_cores"]
                else f"sparse tensor cores on {', '.join(boards)}, dense on the other boards"
                if boards
                else "this target has no sparse tensor cores: it runs dense"
            )
            lines.append(
                f"  sparsity {sparsity['pattern']} in {sparsity['sparsified']} of {sparsity['weights']} "
                f"weights ({', '.join(masks) or 'none'} masks){packed}; {runs}"
            )
        lines.append(quality_line(section["quality"]))
        speed = section["speed"]
        if speed.get("measured", True):
            shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in speed["shapes"].items())
            lines.append(
                f"  speed    {manifest['backend']['name']}, {shapes}, p50 of {speed['calls']} calls each, "
                f"alternating blocks: dense {speed['dense_p50_ms']:.1f} ms -> "
                f"{speed['compressed_p50_ms']:.1f} ms ({speed['speedup']:.2f}x)"
            )
        else:
            lines.append(f"  speed    not measured: {speed['why']}")
        return lines


@dataclass
class UnitsRemoved(PassOutcome):
    """A structural pass's outcome: the units it removed, in original indices (``{"heads": {layer:
    [head, ...]}}``, ``{"ffn": ...}`` or ``{"layers": [...]}``), and the calibration data it was
    chosen on."""

    removed: dict
    calibration: str | None = None

    section = CompressionSection

    def log(self) -> dict:
        return {"removed": {key: _count(units) for key, units in self.removed.items()}}


@dataclass
class WeightsMasked(PassOutcome):
    """A weight-masking pass's outcome: keep masks by weight name (PyTorch layout) and, per weight, what
    was done or why not."""

    masks: dict[str, np.ndarray]
    report: list[dict]
    pattern: str

    section = CompressionSection


class _Masked(ReferenceChange):
    def __init__(self, plan: dict, masks: dict) -> None:
        self.plan, self.masks = plan, masks
        self.describes = ", with " + " and ".join(
            ["the removed heads/neurons zeroed and dropped layers skipped"] * bool(plan)
            + ["the sparsity masks multiplied into the weights"] * bool(masks)
        )

    def applies_to_module(self, architecture: dict) -> bool:
        return not self.plan or architecture.get("family") == "bert"  # the hooks address BERT modules

    def on_module(self, module: nn.Module, architecture: dict, stack: contextlib.ExitStack) -> nn.Module:
        from redux_edge.analysis.reference import masked

        head_dim = architecture.get("hidden_size", 1) // architecture.get("num_heads", 1)
        return stack.enter_context(masked(module, self.plan, head_dim, self.masks))

    def on_graph(self, model: ir.Model) -> None:
        from redux_edge.analysis.reference import masked_graph

        masked_graph(model, self.plan, self.masks)


def _report(section: CompressionSection, context: CompileContext) -> dict:
    """Architecture before and after, quality on the card's real task, latency against the dense model
    through the same backend."""

    source, dense = context.source, context.dense
    assert dense is not None, "the pipeline keeps the dense model for compression passes"
    report: dict = {
        "plan": section.plan,
        "calibration": section.calibration,
        "architecture": {
            "original": find_structure(dense).summary(),
            "compiled": find_structure(source.model).summary(),
        },
    }

    with context.step("measuring quality, dense vs compressed"):
        report["quality"] = quality_report(dense, source.model, source)
    if not section.plan:
        report["speed"] = {
            "measured": False,
            "why": "weight sparsity keeps every shape: it runs faster only on sparse tensor cores "
            "(TensorRT on Ampere/Orin), not on CPUs",
        }
        return report
    with context.step("timing dense vs compressed through the same backend"):
        report["speed"] = speed_against(context, dense)
    return report


def speed_against(context: CompileContext, dense: ir.Model, options: dict | None = None) -> dict:
    """p50 latency of ``dense`` (lowered with ``options``, default the compile's) and the compiled
    artifact in one process, same inputs and threads (``analysis/speed.py``)."""

    backend, source, manifest = context.backend, context.source, context.manifest
    runs, why = backend.can_run_here(context.target)
    if not runs or backend.static_shapes:
        why = why if not runs else "static-shape artifact: compare with tools/bench.py"
        return {"measured": False, "why": why}
    feeds = timing_feeds(dense, source)
    entry = manifest["backend"]
    threads = entry["session"]["threads"]
    assert context.stage is not None
    with tempfile.TemporaryDirectory() as scratch:
        ir.save(dense, str(Path(scratch) / "model.onnx"))
        artifact = Path(scratch) / "artifact"
        dense_entry = backend.lower(
            Path(scratch) / "model.onnx", context.target, artifact, options or context.options
        )
        p50 = alternating_p50(
            {
                "dense": open_artifact(Path(scratch), dense_entry, threads, source.output_names),
                "compressed": open_artifact(
                    context.stage, entry, threads, source.output_names, manifest.get("storage")
                ),
            },
            feeds,
        )
    return {
        "shapes": {name: list(array.shape) for name, array in feeds.items()},
        "threads": threads or "all cores",
        "calls": BLOCKS * CALLS,
        "dense_p50_ms": p50["dense"],
        "compressed_p50_ms": p50["compressed"],
        "speedup": p50["dense"] / p50["compressed"],
    }


def _count(units: dict | list) -> int:
    return sum(len(v) for v in units.values()) if isinstance(units, dict) else len(units)


def _count_units(units: dict | list) -> str:
    return str(units) if isinstance(units, list) else str(_count(units))


def per_layer(counts: dict) -> str:
    return " ".join(f"{layer}:{count}" for layer, count in counts.items()) or "-"
