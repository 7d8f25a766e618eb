"""A side-channel campaign on a protected bundle's first layer: simulate traces into a file, attack a trace
file, t-test two trace files. The CLI's ``leakage`` commands and tools/macpruning_eval.py call these."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from redux_edge.errors import UserError
from redux_edge.files import write_atomically
from redux_edge.leakage import attack, report, simulate, traces, tvla
from redux_edge.leakage.kernel import QuantizedLayer

__all__ = ["attack_file", "load_layer", "simulate_file", "tvla_files"]

DEFAULT_CHECKPOINTS = [10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000]


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
) -> dict:
    """Simulated traces of ``bundle``'s kernel into an ETS file ``out``, with a JSON sidecar describing the
    kernel layout (what an attacker reads from the public C code) and the simulation."""
    if count < 1:
        raise UserError("--traces must be at least 1", "e.g. --traces 1000")
    layer = load_layer(bundle)
    fixed_input = None
    if fixed:
        shape = (layer.weights.shape[1], layer.height, layer.width)
        fixed_input = np.random.default_rng(seed + 1).integers(-128, 128, size=shape, dtype=np.int8)
    simulated = simulate.simulate(layer, count, leakage, protected, seed=seed, fixed_input=fixed_input)
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
) -> dict:
    """CPA on a trace file; weights are looked for in their kernel windows when the file's sidecar
    describes the kernel, and scored against the true weights when ``bundle`` is given."""
    trace_set = traces.read_traces(path, inputs)
    sidecar = path.with_name(path.name + ".json")
    layout = json.loads(sidecar.read_text()) if sidecar.is_file() else None
    truth = load_layer(bundle).weights.reshape(-1) if bundle is not None else None
    if truth is not None and len(truth) != trace_set.operands.shape[1]:
        raise UserError(
            f"{path} has inputs for {trace_set.operands.shape[1]} weights, {bundle}'s layer has {len(truth)}",
            "attack traces of that bundle's kernel",
        )
    slots = trace_set.operands.shape[1]
    windows = None
    chunks = trace_set.chunks(limit=limit)
    if realign is not None:
        chunks = ((attack.realign(samples, slots, realign)[0], operands) for samples, operands in chunks)
        windows = attack.kernel_windows(slots, protected=False)
    elif layout is not None:
        windows = attack.kernel_windows(slots, layout["protected"], layout["leakage"]["jitter"])
    result = attack.recovery_report(chunks, truth, checkpoints or DEFAULT_CHECKPOINTS, windows)
    result |= {
        "source": str(path),
        "windows": "kernel loop" if windows is not None else "whole trace",
        "realigned_on_control_flow": realign,
        "simulation": layout,
    }
    if truth is not None and result["checkpoints"]:
        result["traces_to_disclosure"] = report.disclosure(result["checkpoints"])
    result["files"] = [str(p) for p in report.write_attack_report(result, out)]
    return result


def tvla_files(fixed: Path, random: Path, out: Path) -> dict:
    result = tvla.welch_t(
        traces.read_traces(fixed, need_inputs=False), traces.read_traces(random, need_inputs=False)
    )
    result["files"] = [str(p) for p in report.write_tvla_report(result, out)]
    return result
