"""A side-channel campaign on a protected bundle's first layer: simulate traces into a file, attack a trace
file, t-test two trace files. The CLI's ``leakage`` commands and tools/macpruning_eval.py call these."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from redux_edge.errors import UserError
from redux_edge.files import write_atomically
from redux_edge.leakage import attack, report, simulate, traces, tvla
from redux_edge.leakage.kernel import QuantizedLayer
from redux_edge.untrusted import check_memory

__all__ = ["attack_file", "load_layer", "simulate_file", "tvla_files"]

DEFAULT_CHECKPOINTS = [10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000]
ATTACKS = (*attack.STATISTICS, "accumulator")


def load_layer(bundle: Path) -> QuantizedLayer:
    path = bundle / "c" / "layer.npz"
    if not path.is_file():
        raise UserError(f"{bundle} has no c/layer.npz", "compile it with --mac-prune P --emit-c")
    return QuantizedLayer.load(path)


def simulate_file(
    bundle: Path,
    out: Path,
    count: int,
    leakage: simulate.LeakageModel,
    protected: bool = True,
    seed: int = 0,
    fixed: bool = False,
    shuffle_span: int | None = None,
    masking: bool = True,
) -> dict:
    """Simulated traces of ``bundle``'s kernel into an ETS file ``out``, with a JSON sidecar describing the
    kernel layout (what an attacker reads from the public C code) and the simulation."""
    if count < 1:
        raise UserError("--traces must be at least 1", "e.g. --traces 1000")
    layer = load_layer(bundle)
    # Every trace is simulated in memory: float64 noise and its float32 copy per sample, each attacked
    # MAC's slot up to jitter + 2 samples long, and its product and operand.
    check_memory(
        count * layer.weights.size * ((leakage.jitter + 2) * 12 + 16),
        f"{count:,} simulated traces of {layer.weights.size} MACs with jitter {leakage.jitter}",
        "simulate fewer --traces (several files can be attacked in turn) or a smaller --jitter",
    )
    hidden = protected and layer.hiding == "shuffle"
    if (shuffle_span is not None or not masking) and not hidden:
        raise UserError(
            "--shuffle-span and --no-masking simulate the kernel with hiding",
            "compile the bundle with --mac-hiding shuffle --emit-c (and leave out --unprotected)",
        )
    if shuffle_span is not None and shuffle_span < 1:
        raise UserError("--shuffle-span must be at least 1", "e.g. --shuffle-span 4")
    fixed_input = None
    if fixed:
        shape = (layer.weights.shape[1], layer.height, layer.width)
        fixed_input = np.random.default_rng(seed + 1).integers(-128, 128, size=shape, dtype=np.int8)
    simulated = simulate.simulate(
        layer,
        count,
        leakage,
        protected,
        seed=seed,
        fixed_input=fixed_input,
        shuffle_span=shuffle_span,
        masking=masking,
    )
    slots = int(np.prod(layer.weights.shape))
    write_atomically(
        out, lambda path: traces.write_ets(path, simulated.samples, simulated.operands, keep=simulated.keep)
    )
    description = {
        "simulated": True,
        "bundle": str(bundle),
        "traces": count,
        "samples": simulated.samples.shape[1],
        "slots": simulated.operands.shape[1],
        "protected": protected,
        "hiding": layer.hiding if protected else "none",
        "masking": masking,
        "shuffle_span": (min(shuffle_span or slots, slots) if hidden else None),
        "prefix": simulate.shuffle_prefix(layer) if hidden else 0,
        "per_channel": int(np.prod(layer.weights.shape[1:])),
        "fixed_input": fixed,
        "seed": seed,
        "leakage": vars(leakage),
        "keep_rate": float(simulated.keep.mean()),
    }
    out.with_name(out.name + ".json").write_text(json.dumps(description, indent=1))
    return description | {"file": str(out)}


def attack_file(
    path: Path,
    out: Path,
    inputs: Path | None = None,
    bundle: Path | None = None,
    realign: float | None = None,
    checkpoints: list[int] | None = None,
    limit: int | None = None,
    statistic: str = "windowed",
) -> dict:
    """CPA on a trace file (``statistic``: one of ``ATTACKS``); weights are looked for in their kernel
    windows when the file's sidecar describes the kernel, and scored against the true weights when
    ``bundle`` is given."""
    if statistic not in ATTACKS:
        raise UserError(f"unknown attack '{statistic}'", f"choose one of {', '.join(ATTACKS)}")
    trace_set = traces.read_traces(path, inputs)
    sidecar = path.with_name(path.name + ".json")
    layout = json.loads(sidecar.read_text()) if sidecar.is_file() else None
    truth = load_layer(bundle).weights.reshape(-1) if bundle is not None else None
    if truth is not None and len(truth) != trace_set.operands.shape[1]:
        raise UserError(
            f"{path} has inputs for {trace_set.operands.shape[1]} weights, {bundle}'s layer has {len(truth)}",
            "attack traces of that bundle's kernel",
        )
    chunks, windows = _prepared(trace_set, layout, realign, statistic, limit)
    counts = checkpoints or DEFAULT_CHECKPOINTS
    if statistic == "accumulator":
        result = _accumulator(trace_set, layout, realign, truth, counts, limit)
    else:
        result = attack.recovery_report(chunks, truth, counts, windows, statistic)
    result |= {
        "attack": statistic,
        "source": str(path),
        "windows": "kernel loop" if windows is not None else "whole trace",
        "realigned_on_control_flow": realign,
        "simulation": layout,
    }
    if truth is not None and result["checkpoints"]:
        result["traces_to_disclosure"] = report.disclosure(result["checkpoints"])
    result["files"] = [str(p) for p in report.write_attack_report(result, out)]
    return result


def _prepared(
    trace_set: traces.TraceSet, layout: dict | None, realign: float | None, statistic: str, limit: int | None
) -> tuple[Iterator[tuple[np.ndarray, ...]], np.ndarray | None]:
    """The chunks an attack reads (realigned, or with the keep bits a select leaked) and where each
    weight's MAC can be (from the kernel layout the sidecar describes; None: the whole trace)."""
    slots = trace_set.operands.shape[1]
    chunks: Iterator[tuple[np.ndarray, ...]] = trace_set.chunks(limit=limit)
    if layout is not None and layout.get("shuffle_span"):
        windows = attack.shuffled_windows(
            slots, layout["shuffle_span"], layout["prefix"], layout["leakage"]["jitter"]
        )
        if realign is None:
            return chunks, windows
        if statistic not in ("integrated", "second-order"):
            raise UserError(
                f"{trace_set.source} holds traces of the kernel with hiding: it has no keep/skip branch to "
                "realign on; --realign T there reads the keep bits its select leaks and leaves dropped "
                "pixels' MACs out",
                "add --attack integrated or --attack second-order",
            )
        prefix = layout["prefix"]
        return (
            (samples, operands, attack.selected_keep(samples, prefix, slots, realign))
            for samples, operands in chunks
        ), windows
    if realign is not None:
        realigned = ((attack.realign(samples, slots, realign)[0], operands) for samples, operands in chunks)
        return realigned, attack.kernel_windows(slots, protected=False)
    if layout is None:
        return chunks, None
    return chunks, attack.kernel_windows(slots, layout["protected"], layout["leakage"]["jitter"])


def _accumulator(
    trace_set: traces.TraceSet,
    layout: dict | None,
    realign: float | None,
    truth: np.ndarray | None,
    checkpoints: list[int],
    limit: int | None,
) -> dict:
    """The accumulator attack needs each MAC at a known sample: an unprotected kernel's, or realigned."""
    aligned = layout is not None and not layout["protected"] and not layout["leakage"]["jitter"]
    if layout is None or not (aligned or realign is not None):
        raise UserError(
            "--attack accumulator needs aligned traces: a simulation of the unprotected kernel without "
            "jitter, or --realign T on the kernel without hiding",
            "against the shuffled kernel use --attack windowed, integrated or second-order",
        )
    slots = trace_set.operands.shape[1]
    parts = []
    for samples, operands in trace_set.chunks(limit=limit):
        if realign is not None:
            values, executed = attack.realign(samples, slots, realign)
        else:
            values, executed = samples[:, :slots], np.ones(operands.shape, bool)
        parts.append((values, operands, executed))
    values, operands, executed = (np.concatenate(part) for part in zip(*parts, strict=True))
    return attack.accumulator_recovery(values, operands, executed, layout["per_channel"], truth, checkpoints)


def tvla_files(fixed: Path, random: Path, out: Path) -> dict:
    result = tvla.welch_t(
        traces.read_traces(fixed, need_inputs=False), traces.read_traces(random, need_inputs=False)
    )
    result["files"] = [str(p) for p in report.write_tvla_report(result, out)]
    return result
