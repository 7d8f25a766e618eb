"""The compile pipeline: source -> passes -> verify -> lower -> verify the artifact -> bundle.

It names no pass and no backend. Passes say what they need and add through their contract
(``passes/contract.py``); the sections their outcomes report into add files, checks, the changed
reference and manifest entries; backends say what they can do as data. Any check that fails raises
before the bundle is renamed into place, so a failed compile leaves nothing behind.
"""

from __future__ import annotations

import datetime
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from redux_edge import bundle as bundles
from redux_edge.analysis import in_memory_runner
from redux_edge.analysis.shift import GATES, Gate, failures, output_shift, weights_that_move_most
from redux_edge.backends import BACKENDS, Backend, select_backend
from redux_edge.backends.board import BoardUnavailable
from redux_edge.backends.measured import fastest
from redux_edge.errors import UserError
from redux_edge.files import save_arrays
from redux_edge.frontend import load_source
from redux_edge.frontend.source import Calibration, Reference, Source, input_specs, run_onnx_file
from redux_edge.interfaces import Step, no_progress
from redux_edge.ir.batch import Batches
from redux_edge.ir.blocks import find_structure
from redux_edge.ir.cost import model_cost
from redux_edge.ir.surgery import copy_model
from redux_edge.ir.verify import Tolerance, compare, require_match
from redux_edge.packing import share_weights
from redux_edge.passes.contract import CompileContext, PassOutcome, Rebase, Section
from redux_edge.recipe import Recipe
from redux_edge.targets import Target, load_target

__all__ = ["CompileOptions", "compile_model"]


@dataclass(frozen=True)
class CompileOptions:
    """What a compile is asked to do, besides the model: the target and recipe, the bundle folder, and the
    user's data, tolerances and backend settings.

    ``eval_data`` / ``calibration_data``: the user's files for the quality report and for passes that
    choose by data (``redux_edge.datasets.user``); ``eval_task``: what the first output is for the quality
    report ("classification": logits, "embedding", or "auto": as the checkpoint or the zoo card says).
    ``precision``: the backend's (default) or ``auto``; ``backend_flags``: what the backends' flags set
    (``tune``, ``tuning_db``, ``rpc``, ``dla_core``), see each backend's ``lower``. ``waive_gate``: write a
    result whose outputs moved beyond the default gate of its lossy passes (the report says so).
    """

    target: str
    recipe: Recipe
    out: Path
    force: bool = False
    backend: str | None = None
    tolerance: Tolerance | None = None
    shapes: dict[str, list[int]] | None = None
    inputs_file: Path | None = None
    eval_data: Path | None = None
    calibration_data: Path | None = None
    eval_task: str = "auto"
    weights: Path | None = None
    threads: int | None = None
    precision: str | None = None
    backend_flags: dict[str, Any] = field(default_factory=dict)
    waive_gate: bool = False


def compile_model(model: str | Source, asked: CompileOptions, step: Step = no_progress) -> bundles.Bundle:
    """Compile ``model`` (a name ``--model`` takes, or a Source) as ``asked``, into ``asked.out``."""
    recipe, out, shapes, tolerance = asked.recipe, asked.out, asked.shapes, asked.tolerance
    target_name, backend_name, force = asked.target, asked.backend, asked.force
    target = load_target(target_name)
    backend = select_backend(target, backend_name, recipe.passes)
    # The backend's settings as its ``lower`` and the passes read them (threads, precision, flags).
    options: dict[str, Any] = {"threads": asked.threads, "precision": asked.precision, **asked.backend_flags}
    _check_backend_flags(backend, options)
    options["precision"] = options.get("precision") or backend.default_precision
    measured = options["precision"] == "auto"
    if not measured:
        _check_precision(backend, target, options["precision"])
    bundles.check_destination(out, force)
    source = (
        model
        if isinstance(model, Source)
        else load_source(model, shapes, asked.inputs_file, step, asked.weights)
    )
    source.use_data(asked.eval_data, asked.calibration_data, asked.eval_task)
    choice = None
    if measured:
        with step("timing the target's backends and precisions (--precision auto)"):
            backend, options["precision"], choice = fastest(
                source, target, recipe.passes, options, backend_name
            )
    options["shapes"] = {name: list(array.shape) for name, array in source.inputs.items()} | (shapes or {})
    original_cost = model_cost(source.model, {k: v.shape for k, v in source.inputs.items()})
    exact = tolerance or Tolerance.for_precision("fp32")
    context = CompileContext(source, target, backend, options, exact, list(recipe.passes), step)
    _require_real_inputs(source, recipe)
    for configured in context.passes:
        configured.check(context)
    for configured in context.passes:
        options |= configured.backend_options(context)
    # A pass may have chosen the precision the backend computes in (quantize): the artifact is held to it.
    context.tolerance = tolerance or Tolerance.for_precision(options.get("quantized") or options["precision"])
    pass_log, outcomes = _run_passes(context)
    context.sections = _sections(outcomes)
    for section in context.sections:
        section.check(context)
    for section in context.sections:
        for key, value in section.backend_options().items():
            options.setdefault(key, value)
    changes = [change for section in context.sections if (change := section.reference()) is not None]
    rebase = next((change for change in changes if isinstance(change, Rebase)), None)
    # Rebasing passes come last (their checks say so): the first one's input is what the exact reference
    # must equal, and ONNX Runtime on the final model.onnx is the artifact's reference.
    exact_changes = [change for change in changes if not isinstance(change, Rebase)]
    with step("running the reference" + "".join(change.describes for change in exact_changes)):
        reference = source.reference(exact_changes, context.dense)
        reference.warm()
    random = [name for section in context.sections for name in section.random_outputs(source.output_names)]
    names = source.output_names
    with bundles.staging(out, force) as stage:
        context.stage = stage
        ir.save(source.model, str(stage / "model.onnx"))
        with step("verifying the transformed IR"):
            ir_outputs, ir_report, expected, rebased = _verify_ir(stage, source, reference, rebase, exact)
        with step(f"lowering with {backend.name} for {target.name}"):
            backend_entry = backend.lower(stage / "model.onnx", target, stage / "artifact", options)
            if choice is not None:
                backend_entry["choice"] = choice
        staged: dict = {}
        for section in context.sections:
            staged |= section.stage(context)
        if backend_entry["artifact"].endswith(".onnx"):
            # Two ONNX graphs of mostly the same weights: each stored once, in the artifact's folder.
            shared = share_weights(stage, bundles.IR, backend_entry["artifact"])
            if shared:
                staged["storage"] = staged.get("storage", {}) | shared
        # The health-check sample is one batch the artifact takes: all samples, or one static batch.
        batches = Batches.of(source.model)
        sample_count = batches.size(options["shapes"]) if backend.static_shapes else None
        _write_runner(stage, source, batches, sample_count)
        manifest = _manifest(context, backend_entry, recipe, pass_log, original_cost, ir_report)
        manifest["verify"]["reference"] = reference.kind
        if rebased is not None:
            manifest["verify"]["rebased"] = rebased
        if random:
            manifest["verify"]["random_outputs"] = random
        manifest |= staged
        context.manifest = manifest
        bundles.write_manifest(stage, manifest)
        with step("verifying the artifact"):
            outputs, how = _run_artifact(backend, target, stage, source.inputs, batches, sample_count, names)
            if outputs is not None:
                checks = [(expected(outputs), "artifact"), (ir_outputs, "artifact_vs_onnxruntime")]
                if random or rebase is not None:
                    checks.pop()  # two sessions draw differently; a rebased reference is model.onnx itself
                for expected_outputs, check in checks:
                    manifest["verify"][check] = compare(expected_outputs, outputs, names)
                    require_match(
                        manifest["verify"][check], context.tolerance, f"the {backend.name} artifact"
                    )
            manifest["verify"]["artifact_run"] = how
        context.verified_outputs = outputs if outputs is not None else ir_outputs
        if context.float_model is not None:
            with step("measuring the shift from the float model"):
                manifest["verify"]["shift"] = _gated_shift(context, asked.waive_gate)
        for section in context.sections:
            section.verify(context)
        verified = zip(names, context.verified_outputs, strict=True)
        save_arrays(
            stage / "sample" / "outputs.npz",
            {name: batches.first(name, value, sample_count) for name, value in verified},
        )
        for section in context.sections:
            manifest |= section.report(context)
        bundles.write_manifest(stage, manifest)
    return bundles.load_bundle(out)


# Samples the shift is measured on: the verification inputs are a handful, and one flipped class among
# three is a third of them (seen with mac-prune's hiding on MNIST).
SHIFT_SAMPLES = 64


def _gated_shift(context: CompileContext, waived: bool) -> dict:
    """How far the compiled model's outputs moved from the float model's, on up to ``SHIFT_SAMPLES`` real
    inputs (the calibration data: the card's, the user's, else the verification inputs), against the
    loosest default gate of the passes that changed numerics; beyond it the compile is refused unless
    ``waived``. Both run under ONNX Runtime: the artifact was verified against the compiled model."""
    assert context.float_model is not None
    source = context.source
    lossy = [p for p in context.passes if p.gate() is not None]
    gate = Gate.loosest(GATES[p.gate() or ""] for p in lossy)
    calibration = source.calibration(SHIFT_SAMPLES)
    if calibration.synthetic and source.eval_data is not None:
        rows = min(SHIFT_SAMPLES, len(source.eval_data))
        feeds = source.feeds_of(source.eval_data, slice(0, rows))
        calibration = Calibration(feeds, f"{rows} rows of the {source.eval_data.described}")
    float_outputs = in_memory_runner(context.float_model)(calibration.feeds)
    compiled = in_memory_runner(source.model)(calibration.feeds)
    compiled_outputs = dict(zip(source.output_names, compiled, strict=True))
    # Outputs a pass added (mac-prune's pixel mask) have nothing to be compared with.
    names = [str(value.name) for value in context.float_model.graph.outputs]
    logits = names[:1] if source.classifier else []
    shift = output_shift(float_outputs, [compiled_outputs[name] for name in names], names, logits)
    beyond = failures(shift, gate)
    entry = {
        "passes": [p.name for p in lossy],
        "on": calibration.described + (" (made-up inputs)" if calibration.synthetic else ""),
        "gate": gate.to_json(),
        "outputs": shift,
        "beyond": beyond,
        "waived": waived,
    }
    if not beyond:
        return entry
    movers = weights_that_move_most(context.float_model, source.model, calibration.feeds)
    entry["moves_most"] = {name: round(jump, 4) for name, jump in movers}
    if waived:
        return entry
    more = f" (and {len(beyond) - 1} more)" if len(beyond) > 1 else ""
    changed = " + ".join(p.name for p in lossy)
    named = ", ".join(f"{name} (+{jump:.3g})" for name, jump in movers)
    raise UserError(
        f"{changed} moved the outputs beyond the default gate from the float model: "
        f"{beyond[0]}{more} on {entry['on']}"
        + (f"; the weights where they start to move: {named}" if named else ""),
        (
            f"exclude them with a --recipe whose {changed} has exclude = {[name for name, _ in movers]}; "
            if named
            else ""
        )
        + "or use a milder change (int8-dynamic, fp16, learned masks), or pass --waive-gate to write it "
        "anyway (judge it by --eval-data and --min-quality)",
    )


def _require_real_inputs(source: Source, recipe: Recipe) -> None:
    """A pass that changes numerics on purpose is judged by how far the outputs move; on made-up inputs
    that says little about the inputs the model is for, so real ones are required."""
    lossy = [p.name for p in recipe.passes if p.gate() is not None]
    if lossy and source.synthetic_inputs and source.calibration_data is None and source.eval_data is None:
        raise UserError(
            f"{' + '.join(lossy)} changes numerics on purpose, and {source.name} came without inputs: its "
            "shift would be measured on made-up ones",
            "give real samples with --inputs FILE.npz, or --calibration-data / --eval-data",
        )


def _check_backend_flags(backend: Backend, options: dict) -> None:
    """A flag of another backend (``--tune`` while lowering with ONNX Runtime) is refused, not ignored."""
    for other in BACKENDS.values():
        for flag in other.flags:
            if flag.parameter in options and flag not in backend.flags:
                raise UserError(
                    f"{flag.option} is an option of the {other.name} backend, and this compile lowers "
                    f"with {backend.name}",
                    f"add --backend {other.name}, or drop {flag.option}",
                )


def _check_precision(backend: Backend, target: Target, precision: str) -> None:
    if precision not in backend.precisions:
        raise UserError(
            f"the {backend.name} backend has no precision '{precision}'",
            f"choose one of: {', '.join(backend.precisions)}, or auto; for INT8: --quantize int8",
        )
    if why := backend.precision_refusal(precision, target):
        raise UserError(why, "choose another --precision, --backend or --target")


def _verify_ir(
    stage: Path, source: Source, reference: Reference, rebase: Rebase | None, exact: Tolerance
) -> tuple[list[np.ndarray], dict, Callable[[list[np.ndarray]], list[np.ndarray]], dict | None]:
    """Check ``model.onnx`` against the reference, or with a rebasing pass the model before it. Returns
    model.onnx's outputs, the report, what the artifact's outputs must equal, and the manifest's entry
    for a rebase (how far the pass moved the outputs)."""
    names = source.output_names
    ir_outputs = run_onnx_file(stage / "model.onnx", source.inputs)
    if rebase is None:
        report = compare(reference.expected(ir_outputs), ir_outputs, names)
        require_match(report, exact, "the transformed IR (model.onnx)")
        return ir_outputs, report, reference.expected, None
    with tempfile.TemporaryDirectory(prefix="redux-edge-before-") as scratch:
        ir.save(rebase.before, str(Path(scratch) / "before.onnx"))
        before_outputs = run_onnx_file(Path(scratch) / "before.onnx", source.inputs)
    report = compare(reference.expected(before_outputs), before_outputs, names)
    require_match(report, exact, "the IR before" + rebase.describes)
    rebased = {
        "ir_checked": "the model before" + rebase.describes,
        "exact_tolerance": exact.to_json(),
        "artifact_reference": "onnxruntime (optimisations off) on model.onnx",
        "shift": compare(before_outputs, ir_outputs, names),
    }
    return ir_outputs, report, lambda _: ir_outputs, rebased


def _run_passes(context: CompileContext) -> tuple[list[dict], list[PassOutcome]]:
    """Run the recipe; keep the model as the first pass that compares with it found it (the dense model
    that exact references, quality and speed are measured against)."""
    model, log, outcomes = context.source.model, [], []
    for index, configured in enumerate(context.passes):
        if context.dense is None and configured.compares_with_dense:
            context.dense = copy_model(model)
        if context.float_model is None and configured.gate() is not None:
            context.float_model = copy_model(model)
        # What it gathers goes into a new pass of the same configuration, kept on the context.
        configured = context.passes[index] = configured.prepared(configured.prepare(context))
        with context.step(f"pass {configured.name}"):
            started = time.perf_counter()
            try:
                result = configured(model)
            except ir.passes.PreconditionError as exc:
                # onnx_ir wraps what requires() raises; a bad parameter is the user's to fix.
                if isinstance(exc.__cause__, UserError):
                    raise exc.__cause__ from None
                raise
        entry = {
            "pass": configured.name,
            "modified": result.modified,
            "seconds": round(time.perf_counter() - started, 3),
        }
        if isinstance(result, PassOutcome):
            entry |= result.log()
            outcomes.append(result)
        log.append(entry)
    return log, outcomes


def _sections(outcomes: list[PassOutcome]) -> list[Section]:
    """One section per kind the outcomes report into, with its outcomes in recipe order."""
    grouped: dict[type[Section], list[PassOutcome]] = {}
    for outcome in outcomes:
        if outcome.section is not None:
            grouped.setdefault(outcome.section, []).append(outcome)
    return [kind(members) for kind, members in grouped.items()]


def _run_artifact(
    backend: Backend,
    target: Target,
    stage: Path,
    inputs: dict[str, np.ndarray],
    batches: Batches,
    batch: int | None,
    names: list[str],
) -> tuple[list[np.ndarray] | None, str]:
    """The artifact's outputs where this machine can produce them, and how they were produced."""
    runs, why = backend.can_run_here(target)
    run: Callable[[dict[str, np.ndarray]], list[np.ndarray]]
    if runs:
        run, how = backend.load(stage).run, f"ran here ({why})"
    else:
        emulated, how = backend.emulate(stage, target)
        if emulated is None:
            return None, f"not run here: {why}" + (f"; {how}" if how else "")
        run = emulated
    total = batches.size({name: list(array.shape) for name, array in inputs.items()})
    try:
        if batch is None or total is None or total == batch:
            return run(inputs), how
        # A static-shape artifact takes one batch at a time, each input cut along its own batch axis.
        chunks = [run(batches.take(inputs, start, start + batch)) for start in range(0, total, batch)]
    except BoardUnavailable as exc:
        return None, f"not run here: {why}; {exc}"
    parts = zip(*chunks, strict=True)
    return [batches.join(name, part) for name, part in zip(names, parts, strict=True)], how


def _write_runner(stage: Path, source: Source, batches: Batches, sample_count: int | None) -> None:
    bundles.write_runner(stage)
    (stage / "sample").mkdir()
    samples = {name: batches.first(name, array, sample_count) for name, array in source.inputs.items()}
    save_arrays(stage / "sample" / "inputs.npz", samples)
    if source.preprocessor is not None:
        for relative, path in source.preprocessor.assets().items():
            (stage / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, stage / relative)


def _manifest(
    context: CompileContext,
    backend_entry: dict,
    recipe: Recipe,
    pass_log: list[dict],
    original_cost: dict,
    ir_report: dict,
) -> dict:
    source, target = context.source, context.target
    shapes = {k: v.shape for k, v in source.inputs.items()}
    outputs = [
        {
            "name": value.name,
            "dtype": value.dtype.name if value.dtype is not None else "FLOAT",
            "shape": [d if isinstance(d, int) else str(d) for d in value.shape or ()],
        }
        for value in source.model.graph.outputs
    ]
    static = backend_entry.get("static_shapes")
    return {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": {"name": source.name, **source.origin, "architecture": source.architecture},
        "target": target.to_json(),
        "backend": backend_entry,
        "recipe": recipe.to_json(),
        "passes": pass_log,
        # The input signature as the artifact takes it: a static-shape backend fixes every dimension.
        "inputs": [
            {**spec, "shape": static[spec["name"]]} if static else spec for spec in input_specs(source.model)
        ],
        "outputs": outputs,
        "preprocess": source.preprocessor.to_manifest() if source.preprocessor else None,
        "metrics": {
            "at_shapes": {k: list(v) for k, v in shapes.items()},
            "original": original_cost,
            "compiled": model_cost(source.model, shapes),
            **_structure(source.model),
        },
        "verify": {
            **({"made_up_inputs": source.made_up} if source.made_up else {}),
            "reference": source.reference_kind,
            "samples": int(next(iter(source.inputs.values())).shape[0]) if source.inputs else 0,
            "tolerance": context.tolerance.to_json(),
            "ir": ir_report,
        },
        "toolchain": bundles.toolchain(),
    }


def _structure(model: ir.Model) -> dict:
    """Heads and feed-forward widths per layer, for transformer models."""

    found = find_structure(model)
    return {"structure": found.summary()} if found.attention else {}
