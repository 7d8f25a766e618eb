"""embedding-tables: store large lookup tables (word, position embeddings) in fp16 or per-row INT8.

A transformer's word-embedding table is often the largest tensor it has (MiniLM-L6: 30522 x 384, 44.7 MiB
of its 86.6 MiB) and no weight pass reaches it: 2:4 sparsity and INT8 kernels serve MatMul/Gemm/Conv,
and a table is read by a Gather, one row per token. This pass stores each constant Gather table in a
smaller type and widens only the rows a run gathers: ``fp16`` is ``Gather -> Cast(float)``; ``int8`` is
symmetric per-row INT8, ``Cast(Gather(q)) * Gather(scales)``, the scheme of ONNX Runtime's and
bitsandbytes' embedding quantization, kept in plain ONNX operators so that every backend opens it. A
table also read by another operator (an LM head tied to the word embeddings) stays float32: narrowing it
would change that product too. The graph stays standard ONNX; the gain is on the wire and on the device.

Numerics change on purpose (fp16 keeps 11 significant bits, INT8 1/127 of each row's largest value), so
the model before the pass is checked against the exact reference, the artifact against ONNX Runtime on
the narrowed model (``Rebase``), and the section reports quality retention, float tables vs narrowed, on
the task data. Only rebasing passes (quantize) may follow it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from redux_edge.analysis.quality import quality_line, quality_report, retention
from redux_edge.errors import UserError
from redux_edge.ir.surgery import copy_model, finish, new_initializer
from redux_edge.passes.contract import (
    CompileContext,
    Flag,
    PassOutcome,
    Rebase,
    RecipePass,
    ReferenceChange,
    Section,
    parameter,
)

__all__ = ["EmbeddingTablesPass", "EmbeddingTablesSection", "TablesNarrowed"]

logger = logging.getLogger(__name__)

DTYPES = ("fp16", "int8")


@dataclasses.dataclass
class EmbeddingTablesPass(RecipePass):
    name = "embedding-tables"
    summary = "store large Gather tables (word/position embeddings) in fp16 or per-row INT8, quality-reported"
    flags = (
        Flag(
            "--embedding-tables",
            "Store embedding tables in fp16 or int8 (per row): smaller bundles and device storage "
            "(embedding-tables pass).",
            "dtype",
            metavar="DTYPE",
        ),
    )
    compares_with_dense = True
    rebases = True
    once_per_recipe = True

    dtype: str = parameter("fp16", "fp16 (Gather then Cast) or int8 (symmetric, one scale per row)")
    min_elements: int = parameter(
        65536, "tables smaller than this stay float32: too small to gain", minimum=1
    )

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise UserError(
                f"embedding-tables: unknown dtype '{self.dtype}'", f"choose one of: {', '.join(DTYPES)}"
            )

    def gate(self) -> str | None:
        return f"tables-{self.dtype}"

    def check(self, context: CompileContext) -> None:
        position = context.passes.index(self)
        later = [p.name for p in context.passes[position + 1 :] if not (p.exact or p.rebases)]
        if later:
            raise UserError(
                f"embedding-tables changes numerics on purpose, so the passes whose exactness is checked "
                f"({', '.join(later)}) must come before it",
                "move embedding-tables after them in the recipe (quantize may follow it)",
            )

    def call(self, model: ir.Model) -> TablesNarrowed:
        graph = model.graph
        overridable = set(graph.inputs)
        chosen, kept = [], []
        for table in graph.initializers.values():
            if table.const_value is None:
                continue
            uses = table.uses()
            gathers = [n for n, index in uses if n.op_type == "Gather" and index == 0 and n.graph is graph]
            if not gathers:
                continue
            array = _constant(table)
            axes = {_normalised_axis(node, array.ndim) for node in gathers}
            entry = {"table": table.name, "shape": list(array.shape), "bytes_before": int(array.nbytes)}
            others = [node for node, _ in uses if node not in gathers]
            if why := _why_kept(array, others, axes, table in overridable, self.min_elements):
                kept.append({**entry, "why": why})
            else:
                (axis,) = axes
                chosen.append((entry, array, gathers, axis))
        # The whole model is copied only when a table will change: the quality comparison needs both sides.
        before = copy_model(model) if chosen else model
        tables = []
        for entry, array, gathers, axis in chosen:
            narrowed, scales = self._narrowed(graph, str(entry["table"]), array, axis)
            for gather in gathers:
                _widen(graph, gather, narrowed, scales, axis)
            stored = sum(_constant(value).nbytes for value in (narrowed, scales) if value is not None)
            tables.append({**entry, "bytes_after": int(stored), "axis": axis, "gathers": len(gathers)})
        if tables:
            finish(model)
        logger.info("embedding-tables %s: %d tables, %d kept float32", self.dtype, len(tables), len(kept))
        after = copy_model(model) if tables else model
        return TablesNarrowed(model, bool(tables), self.dtype, tables, kept, before, after)

    def _narrowed(
        self, graph: ir.Graph, name: str, table: np.ndarray, axis: int
    ) -> tuple[ir.Value, ir.Value | None]:
        """The table in the pass's dtype, and for INT8 its per-row scales."""
        if self.dtype == "fp16":
            return new_initializer(graph, table.astype(np.float16), f"{name}.fp16"), None
        codes, scales = _int8_rows(table, axis)
        return new_initializer(graph, codes, f"{name}.int8"), new_initializer(graph, scales, f"{name}.scales")


def _widen(graph: ir.Graph, gather: ir.Node, narrowed: ir.Value, scales: ir.Value | None, axis: int) -> None:
    """Point ``gather`` at the narrowed table and give its readers the gathered rows in float32."""
    gathered = gather.outputs[0]
    uses = list(gathered.uses())  # its readers, before the widening nodes join them
    cast = ir.node("Cast", [gathered], {"to": ir.DataType.FLOAT})
    widen = [cast]
    if scales is not None:
        row_scales = ir.node("Gather", [scales, gather.inputs[1]], {"axis": axis})
        widen += [row_scales, ir.node("Mul", [cast.outputs[0], row_scales.outputs[0]])]
    gather.replace_input_with(0, narrowed)
    gathered.dtype = ir.DataType.from_numpy(_constant(narrowed).dtype)
    graph.insert_after(gather, widen)
    widened = widen[-1].outputs[0]
    widened.name = f"{gathered.name}.widened"
    for use in uses:
        use.node.replace_input_with(use.idx, widened)
    if gathered.is_graph_output():
        graph.outputs[graph.outputs.index(gathered)] = widened
        gathered.name, widened.name = f"{gathered.name}.narrow", gathered.name
        widened.shape = gathered.shape
    widened.dtype = ir.DataType.FLOAT


def _constant(value: ir.Value) -> np.ndarray:
    assert value.const_value is not None, "an initializer with its tensor"
    return value.const_value.numpy()


def _why_kept(
    array: np.ndarray, others: list[ir.Node], axes: set[int], overridable: bool, min_elements: int
) -> str:
    if array.dtype != np.float32:
        return f"stored as {array.dtype}, not float32"
    if overridable:
        return "also a graph input: a caller may replace it"
    if others:
        readers = ", ".join(sorted({node.op_type for node in others}))
        return f"also read by {readers} (a tied weight): narrowing it would change that too"
    if len(axes) > 1:
        return "gathered along different axes"
    if array.size < min_elements:
        return f"{array.size} elements, under min_elements"
    return ""


def _normalised_axis(gather: ir.Node, rank: int) -> int:
    attribute = gather.attributes.get("axis")
    axis = attribute.as_int() if attribute is not None else 0
    return axis + rank if axis < 0 else axis


def _int8_rows(table: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT8 codes and one float32 scale per row along ``axis``, the scales shaped to broadcast
    over the gathered rows (1 in every other dimension)."""
    others = tuple(d for d in range(table.ndim) if d != axis)
    largest = np.abs(table).max(axis=others, keepdims=True)
    scales = np.where(largest > 0, largest / 127.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint(table / scales), -127, 127).astype(np.int8)
    return codes, scales


class EmbeddingTablesSection(Section):
    """Which tables were narrowed (and which kept float32, with why), the bytes saved, and the quality
    retention of float tables vs narrowed on the task data."""

    key = "embedding_tables"

    def __init__(self, outcomes: list[PassOutcome]) -> None:
        super().__init__(outcomes)
        (self.outcome,) = [o for o in outcomes if isinstance(o, TablesNarrowed)]

    def reference(self) -> ReferenceChange | None:
        if not self.outcome.tables:
            return None
        return Rebase(self.outcome.before, f" embedding-tables ({self.outcome.dtype})")

    def report(self, context: CompileContext) -> dict:

        outcome = self.outcome
        before = sum(table["bytes_before"] for table in outcome.tables)
        after = sum(table["bytes_after"] for table in outcome.tables)
        report: dict = {
            "dtype": outcome.dtype,
            "tables": outcome.tables,
            "kept_float32": outcome.kept,
            "bytes_before": before,
            "bytes_after": after,
        }
        if outcome.tables:
            with context.step(f"measuring quality, float32 vs {outcome.dtype} tables"):
                report["quality"] = quality_report(outcome.before, outcome.after, context.source)
            report["retention"] = retention(report["quality"])
        return {self.key: report}

    @staticmethod
    def render(section: dict, manifest: Mapping[str, Any]) -> list[str]:

        tables = section["tables"]
        if not tables:
            why = section["kept_float32"][0]["why"] if section["kept_float32"] else "the model has none"
            return [f"  tables   none narrowed ({why})"]
        mib = 1 << 20
        largest = max(tables, key=lambda table: table["bytes_before"])
        lines = [
            f"  tables   {len(tables)} in {section['dtype']}: {section['bytes_before'] / mib:.1f} MiB -> "
            f"{section['bytes_after'] / mib:.1f} MiB (largest {largest['table']} {largest['shape']})"
        ]
        lines.append(quality_line(section["quality"], ("fp32 tables", f"{section['dtype']} tables")))
        return lines


@dataclasses.dataclass
class TablesNarrowed(PassOutcome):
    """The embedding-tables outcome: the dtype, each table narrowed and each kept, and the model before
    and right after the pass (the quality comparison, whatever passes follow)."""

    dtype: str
    tables: list[dict]
    kept: list[dict]
    before: ir.Model
    after: ir.Model

    section = EmbeddingTablesSection

    def log(self) -> dict:
        return {"dtype": self.dtype, "tables": len(self.tables)}
