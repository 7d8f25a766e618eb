"""PyTorch -> IR through the dynamo-based exporter, ``torch.onnx.export(..., dynamo=True)``.

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

import numpy as np
import onnx_ir as ir
import torch

__all__ = ["export_module", "run_module"]

logger = logging.getLogger(__name__)

OPSET = 20


def export_module(
    module: torch.nn.Module,
    inputs: dict[str, np.ndarray],
    dynamic_axes: dict[str, dict[int, str]],
    output_names: list[str],
) -> ir.Model:
    dims: dict[str, torch.export.Dim] = {}
    dynamic_shapes = {
        name: {axis: dims.setdefault(label, torch.export.Dim(label)) for axis, label in axes.items()}
        for name, axes in dynamic_axes.items()
    }
    args = tuple(torch.from_numpy(array) for array in inputs.values())
    # The exporter narrates its steps on stdout and warns about optional torchvision ops; our CLI has its
    # own progress display and the user cannot act on either.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()) as narration:
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(),
            args,
            input_names=list(inputs),
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
    logger.debug("torch.onnx.export: %s", narration.getvalue())
    return program.model


def run_module(module: torch.nn.Module, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The PyTorch reference outputs for ``inputs``."""
    with torch.inference_mode():
        outputs = module(*(torch.from_numpy(array) for array in inputs.values()))
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
    return [output.numpy() for output in outputs]
