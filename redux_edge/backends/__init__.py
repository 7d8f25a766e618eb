"""Backends lower the IR for a target into an artifact, and load and run that artifact.

``BACKENDS`` is the registry, one line per backend; everything else asks it by name or by capability.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from redux_edge.backends.base import Backend
from redux_edge.backends.onnxruntime import OnnxRuntimeBackend
from redux_edge.backends.openvino import OpenVinoBackend
from redux_edge.backends.tensorrt import TensorRtBackend
from redux_edge.backends.tvm import TvmBackend
from redux_edge.errors import UserError
from redux_edge.targets import Target

if TYPE_CHECKING:
    from redux_edge.passes.contract import RecipePass

__all__ = ["BACKENDS", "Backend", "backends_with", "objections", "select_backend"]

BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (OnnxRuntimeBackend(), OpenVinoBackend(), TvmBackend(), TensorRtBackend())
}


def backends_with(capability: str) -> list[Backend]:
    """The registered backends that have ``capability`` (an attribute of ``Backend``)."""
    return [backend for backend in BACKENDS.values() if getattr(backend, capability)]


def select_backend(target: Target, requested: str | None, passes: Sequence[RecipePass] = ()) -> Backend:
    """The backend to use for ``target``: the one asked for, else the target's first that the recipe's
    passes can work with; raises UserError naming what is missing and how to get it."""
    if requested is None and objections(BACKENDS.get(target.backends[0]), target, passes):
        # The first backend cannot serve this recipe: the next one of the target's that builds here can.
        reasons = []
        for backend in [BACKENDS[name] for name in target.backends if name in BACKENDS]:
            if not (refusals := objections(backend, target, passes)) and backend.can_build_here()[0]:
                return _checked(target, backend, requested)
            reasons.append(refusals[0] if refusals else backend.can_build_here()[1])
        raise UserError(
            f"no backend of target {target.name} can run this recipe: {'; '.join(reasons)}",
            "choose another --target or change the recipe (`redux-edge targets` lists the precisions)",
        )
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
    backend = _checked(target, BACKENDS[name], requested)
    if refusals := objections(backend, target, passes):
        serving = [
            other
            for other in target.backends
            if other in BACKENDS and not objections(BACKENDS[other], target, passes)
        ]
        raise UserError(
            refusals[0],
            f"use --backend {serving[0]}" if serving else "choose another --target or change the recipe",
        )
    return backend


def objections(backend: Backend | None, target: Target, passes: Sequence[RecipePass]) -> list[str]:
    """Why the recipe's passes cannot work with ``backend`` for ``target`` (empty: they can)."""
    if backend is None:
        return []
    return [why for configured in passes if (why := configured.refuses(backend, target))]


def _checked(target: Target, backend: Backend, requested: str | None) -> Backend:
    backend.check_target(target)
    if requested is not None and requested not in target.backends:
        raise UserError(
            f"target {target.name} does not use the {requested} backend",
            f"its backends are: {', '.join(target.backends)}",
        )
    buildable, why = backend.can_build_here()
    if not buildable:
        raise UserError(
            f"the {backend.name} backend cannot build here: {why}", "install it, or choose another --backend"
        )
    return backend
