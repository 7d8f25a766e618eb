"""The compile report, printed by ``compile`` and ``inspect``: what every bundle has, then each section
of the manifest as the section itself renders it (``passes.contract.Section.render``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from rich.table import Table

from redux_edge.cli.common import human_bytes, out
from redux_edge.manifest import Manifest
from redux_edge.passes.compression import per_layer
from redux_edge.passes.contract import Section

__all__ = ["print_report"]


def _origin(model: Mapping[str, Any]) -> str:
    """Where the model came from, in the words of the frontend that read it."""
    if model.get("description"):
        return str(model["description"])
    if "huggingface" in model:
        return f"Hugging Face {', '.join(model.get('architectures') or ['model'])} in {model['huggingface']}"
    for kind in ("onnx", "pt2", "module"):
        if kind in model:
            return f"{kind} {model[kind]}"
    return "unknown origin"


_SHIFT_LABELS = {"rel_l2": "rel L2", "min_cosine": "min cosine", "top1": "top-1 kept", "equal": "equal"}


def shift_lines(shift: Mapping[str, Any]) -> list[str]:
    """The shift from the float model and its gate: passed, or refused but waived (said loudly)."""
    gate = shift["gate"]
    bounds = (
        f"rel L2 <= {gate['max_rel_l2']}, min cosine >= {gate['min_cosine']}, "
        f"top-1 kept >= {gate['min_top1']}"
    )
    changed, where = " + ".join(shift["passes"]), shift.get("on", "the samples")
    lines = [f"  shift    {changed} vs the float model, on {where}:"]
    for name, numbers in shift["outputs"].items():
        shown = ", ".join(
            f"{_SHIFT_LABELS[key]} {value:.4g}" for key, value in numbers.items() if key in _SHIFT_LABELS
        )
        lines.append(f"           {name}: {shown or numbers}")
    if not shift["beyond"]:
        lines.append(f"  gate     passed ({bounds})")
    else:
        beyond = "; ".join(shift["beyond"])
        lines.append(f"  [bold red]gate     WAIVED[/] (--waive-gate): {beyond} ({bounds})")
        if movers := shift.get("moves_most"):
            named = ", ".join(f"{name} (+{jump:.3g})" for name, jump in movers.items())
            lines.append(f"           the outputs start to move at the weights {named}")
    return lines


def print_report(path: Path, manifest: Manifest, problems: list[str]) -> None:
    recorded = cast(Mapping[str, Any], manifest)  # sections are read by their registered keys
    model, target, backend = manifest["model"], manifest["target"], manifest["backend"]
    original, compiled = manifest["metrics"]["original"], manifest["metrics"]["compiled"]
    out.print(f"[bold]bundle[/] {path}  [dim](created {manifest['created']})[/]")
    out.print(f"  model    {model['name']} — {_origin(model)}")
    out.print(
        f"  target   {target['name']} ({target['arch']}, cpu {target['cpu']})   backend {backend['name']} "
        f"{backend['version']}, threads {backend['session']['threads'] or 'all cores'}"
    )
    out.print(
        f"  recipe   {manifest['recipe']['name']}: "
        + " → ".join(f"{p['pass']}{'' if p['modified'] else ' (no change)'}" for p in manifest["passes"])
    )
    if fusions := recorded["backend"].get("fusions"):
        out.print("  fusions  " + ", ".join(f"{name} x{count}" for name, count in fusions.items()))
    if skipped := recorded["backend"].get("fusions_skipped"):
        out.print(f"  fusions  none: {skipped}")
    if (choice := recorded["backend"].get("choice")) and choice["measured"]:
        timed = ", ".join(
            f"{c['candidate']} {c['p50_ms']:.1f} ms" if c["kept"] else f"{c['candidate']} (diverges)"
            for c in choice["candidates"]
        )
        out.print(f"  chosen   {choice['chosen']} by --precision auto, p50 at {choice['shapes']}: {timed}")
    table = Table("metric", "original", "compiled", title=f"cost at {manifest['metrics']['at_shapes']}")
    table.add_row("parameters", f"{original['params']:,}", f"{compiled['params']:,}")
    if "nonzero_params" in compiled and compiled["nonzero_params"] != compiled["params"]:
        # Bundles from before the count was recorded lack it.
        table.add_row(
            "non-zero parameters",
            f"{original.get('nonzero_params', original['params']):,}",
            f"{compiled['nonzero_params']:,}",
        )
    table.add_row(
        "weight bytes", human_bytes(original["weight_bytes"]), human_bytes(compiled["weight_bytes"])
    )
    table.add_row("MACs", f"{original['macs']:,}", f"{compiled['macs']:,}")
    out.print(table)
    if uncounted := recorded["metrics"]["compiled"].get("macs_not_counted"):
        out.print(
            f"  MACs     not counted inside {', '.join(uncounted)} (their work depends on run-time values)"
        )
    if "structure" in manifest["metrics"]:
        structure = manifest["metrics"]["structure"]
        out.print(
            f"  layers   {structure['layers']}   heads per layer {per_layer(structure['heads_per_layer'])}"
        )
        out.print(f"  feed-forward width per layer {per_layer(structure['ffn_width_per_layer'])}")
    # In the manifest's order, which is the recipe's; the sections are the registered passes' (importing
    # any module of redux_edge.passes, as above, registers them all).
    for key, entry in recorded.items():
        if key in Section.known and entry:
            for line in Section.known[key].render(entry, recorded):
                out.print(line)
    verify = manifest["verify"]
    checks = Table(
        "checked",
        "output",
        "max abs diff",
        "min cosine",
        title=f"verification vs {verify['reference']} on {verify['samples']} samples",
    )
    labels = {
        "ir": "model.onnx",
        "artifact": backend["artifact"],
        "artifact_vs_onnxruntime": f"{backend['artifact']} vs ONNX Runtime on model.onnx",
    }
    rows = [(label, recorded["verify"].get(stage, {})) for stage, label in labels.items()]
    if rebased := recorded["verify"].get("rebased"):
        # A pass changed numerics on purpose: the exact check is of the model before it, the artifact's
        # is against ONNX Runtime on the changed model.onnx.
        rows = [
            (rebased["ir_checked"], recorded["verify"]["ir"]),
            (f"model.onnx vs{rebased['ir_checked'].removeprefix('the model')}", rebased["shift"]),
            (f"{backend['artifact']} vs ONNX Runtime on model.onnx", recorded["verify"].get("artifact", {})),
        ]
    for label, entries in rows:
        for name, numbers in entries.items():
            checks.add_row(label, name, f"{numbers['max_abs']:.3g}", f"{numbers['min_cosine']:.7f}")
    out.print(checks)
    if made_up := recorded["verify"].get("made_up_inputs"):
        out.print(f"  inputs   made up (no --inputs): {'; '.join(made_up)}")
    if "artifact_run" in verify:
        out.print(f"  artifact {verify['artifact_run']}")
    if shift := recorded["verify"].get("shift"):
        for line in shift_lines(shift):
            out.print(line)
    files = manifest["files"]
    out.print(
        f"  files    {len(files)}, {human_bytes(sum(f['bytes'] for f in files.values()))}, sha256 "
        + ("[green]all match[/]" if not problems else f"[red]{len(problems)} differ: {problems[0]}[/]")
    )
