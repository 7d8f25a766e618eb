"""Backends lower the IR for a target into an artifact, and load and run that artifact.

``BACKENDS`` is the registry, one line per backend; everything else asks it by name or by capability.
"""

from __future__ import annotations

from redux_edge.backends.base import Backend
from redux_edge.backends.onnxruntime import OnnxRuntimeBackend
from redux_edge.backends.openvino import OpenVinoBackend
from redux_edge.backends.tensorrt import TensorRtBackend
from redux_edge.backends.tvm import TvmBackend
from redux_edge.errors import UserError
from redux_edge.targets import Target

__all__ = ["BACKENDS", "Backend", "backends_with", "select_backend"]

BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (OnnxRuntimeBackend(), OpenVinoBackend(), TvmBackend(), TensorRtBackend())
}


def backends_with(capability: str) -> list[Backend]:
    """The registered backends that have ``capability`` (an attribute of ``Backend``)."""
    return [backend for backend in BACKENDS.values() if getattr(backend, capability)]


def select_backend(target: Target, requested: str | None) -> Backend:
    """The backend to use for ``target``; raises UserError naming what is missing and how to get it."""
    name = requested or target.backends[0]
    if name not in BACKENDS:
        if requested is not None:
            raise UserError(
                f"unknown backend '{requested}'", f"this version has: {', '.join(sorted(BACKENDS))}"
            )
        fallback = [b for b in target.backends if b in BACKENDS]
        hint = (
            f"pass --backend {fallback[0]}"
            if fallback
            else "choose another target (see `redux-edge targets`)"
        )
        raise UserError(
            f"target {target.name} needs the {name} backend, which this version does not have", hint
        )
    backend = BACKENDS[name]
    backend.check_target(target)
    if requested is not None and requested not in target.backends:
        raise UserError(
            f"target {target.name} does not use the {requested} backend",
            f"its backends are: {', '.join(target.backends)}",
        )
    buildable, why = backend.can_build_here()
    if not buildable:
        raise UserError(
            f"the {name} backend cannot build here: {why}", "install it, or choose another --backend"
        )
    return backend
