"""PyTorch -> IR through the dynamo-based exporter, ``torch.onnx.export(..., dynamo=True)``, and the
source of a PyTorch module (a zoo entry), whose reference is the module itself.

The exporter traces the module with ``torch.export`` and translates the FX graph with ONNX Script; its
result already is an ``onnx_ir.Model``, so nothing is serialised on the way into the pass manager.
Dynamic axes are declared per input name and shared between inputs that use the same name, so that
``input_ids`` and ``attention_mask`` agree on ``batch`` and ``sequence``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from redux_edge import zoo
from redux_edge.errors import UserError, first_line
from redux_edge.files import file_digest
from redux_edge.frontend.module_run import run_module
from redux_edge.frontend.source import Source, check_feeds, fit_inputs
from redux_edge.interfaces import Step, no_progress
from redux_edge.preprocess import read_inputs

__all__ = ["export_module", "load_weights", "module_source", "zoo_source"]

logger = logging.getLogger(__name__)

OPSET = 20


def export_module(
    module: torch.nn.Module | torch.export.ExportedProgram,
    inputs: dict[str, np.ndarray],
    dynamic_axes: dict[str, dict[int, str]],
    output_names: list[str],
) -> ir.Model:
    """``module`` in the IR; an ExportedProgram keeps its own dynamic dims (``dynamic_axes`` unused)."""
    dims: dict[str, torch.export.Dim] = {}
    # By position, not by name: the module's forward may call its arguments anything.
    dynamic_shapes = None
    if isinstance(module, torch.nn.Module):
        module = module.eval()
        dynamic_shapes = tuple(
            {
                axis: dims.setdefault(label, torch.export.Dim(label))
                for axis, label in dynamic_axes.get(name, {}).items()
            }
            for name in inputs
        )
    args = tuple(torch.from_numpy(array) for array in inputs.values())
    # The exporter narrates its steps on stdout and warns about optional torchvision ops; our CLI has its
    # own progress display and the user cannot act on either.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()) as narration:
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            input_names=list(inputs),
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
    logger.debug("torch.onnx.export: %s", narration.getvalue())
    assert program is not None, "the dynamo exporter returns the program"
    return program.model


def zoo_source(
    name: str,
    shapes: dict[str, list[int]] | None = None,
    inputs_file: Path | None = None,
    step: Step = no_progress,
    weights: Path | None = None,
) -> Source:
    """A zoo model as a source: exported with dynamo, verified against the module itself; ``weights``
    (safetensors) replace the package's parameters."""

    card = zoo.load_card(name)  # fails fast on an unknown name, before torch work
    with step(f"loading {name}"):
        entry = zoo.load_model(name)
        if weights is not None:
            entry.source = load_weights(entry.module, weights)
        inputs = (
            entry.inputs
            if inputs_file is None
            else read_inputs(inputs_file, list(entry.inputs), entry.preprocessor)
        )
        inputs = fit_inputs(inputs, shapes or {})
    with step(f"exporting {name} with torch.onnx (dynamo)"):
        exported = export_module(entry.module, entry.inputs, entry.dynamic_axes, entry.output_names)
    check_feeds(exported, inputs)
    return Source(
        name=entry.name,
        origin={"zoo": entry.name, "weights": entry.source, "description": entry.description},
        model=exported,
        inputs=inputs,
        reference_outputs=run_module(entry.module, inputs),
        reference_kind="pytorch",
        preprocessor=entry.preprocessor,
        architecture=entry.architecture,
        task_data=card.get("task_data"),
        module=entry.module,
    )


def module_source(
    module: torch.nn.Module,
    inputs: dict[str, np.ndarray],
    name: str = "model",
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    output_names: list[str] | None = None,
) -> Source:
    """A user's own module as a source: exported with dynamo (the first axis of every input is the
    batch unless ``dynamic_axes`` says otherwise), verified against the module itself on ``inputs``."""
    if not isinstance(module, torch.nn.Module) or not inputs:
        raise UserError(
            "compile takes an nn.Module and a dict of example inputs", "see the README's Python API"
        )
    axes = dynamic_axes if dynamic_axes is not None else {key: {0: "batch"} for key in inputs}
    reference = run_module(module.eval(), inputs)
    names = output_names or (
        ["output"] if len(reference) == 1 else [f"output_{i}" for i in range(len(reference))]
    )
    try:
        exported = export_module(module, inputs, axes, names)
    except Exception as exc:  # torch.export raises its own types for what it cannot trace
        raise UserError(
            f"torch.onnx.export (dynamo) cannot export this module: {first_line(exc)}",
            "make the module torch.export-able (--debug shows the exporter's report)",
        ) from exc
    check_feeds(exported, inputs)
    return Source(
        name=name,
        origin={"module": f"{type(module).__module__}.{type(module).__qualname__}"},
        model=exported,
        inputs=inputs,
        reference_outputs=reference,
        reference_kind="pytorch",
        architecture={"family": type(module).__name__},
        module=module,
    )


def load_weights(module: torch.nn.Module, path: Path) -> str:
    """Put the parameters of a .safetensors file (a format that cannot run code) into a module."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise UserError(f"cannot read weights {path}: {exc}", "give a .safetensors file") from exc
    expected = module.state_dict()
    wrong = sorted(
        name for name in expected if name not in weights or weights[name].shape != expected[name].shape
    )
    if wrong or set(weights) - set(expected):
        first = wrong[0] if wrong else sorted(set(weights) - set(expected))[0]
        raise UserError(
            f"weights {path} do not fit the model (e.g. {first})",
            "give weights of this zoo model in its original shapes, as `train recover` writes them",
        )
    module.load_state_dict(weights)
    return f"{path} (sha256 {file_digest(path)[:16]})"
