"""``--precision auto``: the fastest backend and precision of the target that keep the numbers, measured.

Compiling for the machine it runs on (``host``), every backend of the target that builds and runs here,
takes any input shape and serves the recipe is lowered at every precision it computes on this CPU; each
artifact runs the verification inputs, must match the fp32 reference within its precision's tolerance
(cosine 0.999 below fp32), and is timed in one process, same inputs and threads (``analysis/speed.py``).
The fastest wins. For another target nothing can be timed, so its first backend computes fp32, as
without ``auto``. The manifest records every candidate with its time and agreement, and why it lost.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import onnx_ir as ir

from redux_edge.analysis.speed import alternating_p50, timing_feeds
from redux_edge.backends import BACKENDS, objections
from redux_edge.backends.base import Backend
from redux_edge.errors import UserError
from redux_edge.frontend.source import Source
from redux_edge.runtime.session import open_artifact
from redux_edge.runtime.tolerance import Tolerance, compare, mismatch
from redux_edge.targets import Target

if TYPE_CHECKING:
    from redux_edge.passes.contract import RecipePass

__all__ = ["fastest"]


def fastest(
    source: Source, target: Target, passes: Sequence[RecipePass], options: dict, requested: str | None
) -> tuple[Backend, str, dict]:
    """The backend and precision to compile with, and the manifest's record of the choice."""

    names = [requested] if requested else list(target.backends)
    first = BACKENDS[names[0]]
    if target.cpu != "native":
        return first, first.default_precision, {"measured": False, "why": "not this machine: not timed"}
    candidates, rejected = [], []
    for backend in [BACKENDS[name] for name in names if name in BACKENDS]:
        if why := _not_timed(backend, target, passes):
            rejected.append({"backend": backend.name, "why": why})
            continue
        candidates += [
            (backend, precision)
            for precision in backend.precisions
            if not backend.precision_refusal(precision, target)
        ]
    if not candidates:
        raise UserError(
            "--precision auto found no backend of this target to time here",
            "; ".join(f"{entry['backend']}: {entry['why']}" for entry in rejected) or "choose --precision",
        )
    feeds = timing_feeds(source.model, source)
    threads = options.get("threads") or 0
    record: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="redux-edge-auto-") as scratch:
        ir.save(source.model, str(Path(scratch) / "model.onnx"))
        runs = {}
        for backend, precision in candidates:
            label = f"{backend.name} {precision}"
            folder = Path(scratch) / label.replace(" ", "-")
            entry = backend.lower(
                Path(scratch) / "model.onnx", target, folder / "artifact", {**options, "precision": precision}
            )
            run = open_artifact(folder, entry, threads, source.output_names)
            report = compare(source.reference_outputs, run(source.inputs), source.output_names)
            if diverges := mismatch(report, Tolerance.for_precision(precision)):
                record.append({"candidate": label, "kept": False, "why": diverges})
                continue
            cosine = min(numbers["min_cosine"] for numbers in report.values())
            record.append({"candidate": label, "kept": True, "min_cosine": cosine})
            runs[label] = run
        p50 = alternating_p50(runs, feeds)
    for entry in record:
        if entry["kept"]:
            entry["p50_ms"] = p50[entry["candidate"]]
    winner = min(p50, key=p50.__getitem__)
    backend, precision = next((b, p) for b, p in candidates if f"{b.name} {p}" == winner)
    return (
        backend,
        precision,
        {
            "measured": True,
            "shapes": {name: list(array.shape) for name, array in feeds.items()},
            "candidates": record,
            "not_timed": rejected,
            "chosen": winner,
            "why": f"the fastest p50 of the candidates that match the fp32 reference ({p50[winner]:.2f} ms)",
        },
    )


def _not_timed(backend: Backend, target: Target, passes: Sequence[RecipePass]) -> str:
    """Why ``backend`` is no candidate here (empty: it is one)."""
    if refusals := objections(backend, target, passes):
        return refusals[0]
    for able, why in (backend.can_build_here(), backend.can_run_here(target)):
        if not able:
            return why
    return "static input shapes: compare it with tools/bench.py" if backend.static_shapes else ""
