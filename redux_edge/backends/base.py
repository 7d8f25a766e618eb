"""The backend protocol, the choice of a backend for a target, and the base of the CPU backends.

A backend lowers the IR for a target into files under ``artifact/`` and says how to open them
(``lower``); it loads an artifact and runs it (``load``). It never changes what the graph computes:
rewrites it makes for speed (operator fusion, layout) are checked by the compile's verification. A
target lists backends in order of preference; the first one is used unless ``--backend`` names another.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import ClassVar, Protocol

from redux_edge.errors import UserError
from redux_edge.runtime.runner import BundleSession
from redux_edge.targets import Target

__all__ = ["Backend", "CpuBackend", "available_backends", "select_backend"]


class Backend(Protocol):
    name: str
    precisions: tuple[str, ...]
    default_precision: str
    static_shapes: bool

    def can_build_here(self) -> tuple[bool, str]:
        """Whether this machine can lower for the backend, and why not."""

    def check_target(self, target: Target) -> None:
        """Raise UserError when the backend cannot produce an artifact for ``target`` at all."""

    def can_run_here(self, target: Target) -> tuple[bool, str]:
        """Whether an artifact for ``target`` can run on this machine, and why not."""

    def lower(self, model_file: Path, target: Target, artifact_dir: Path, options: dict) -> dict:
        """Write the artifact for ``model_file`` into ``artifact_dir``; return its manifest entry.

        ``options``: ``threads`` (None = all cores), ``precision``, ``shapes`` (static input shapes),
        and backend-specific keys (``tune``, ``rpc``, ``sparsity``, ``dla``).
        """

    def load(self, bundle_dir: Path, threads: int | None = None) -> BundleSession:
        """A session with ``run(feeds) -> outputs`` and ``benchmark(feeds, warmup, iterations)``."""


class CpuBackend:
    """What the CPU backends share: fp32, dynamic shapes, artifacts that run where the arch matches."""

    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    default_precision: ClassVar[str] = "fp32"
    static_shapes: ClassVar[bool] = False
    arches: ClassVar[frozenset[str]] = frozenset({"x86_64", "aarch64"})

    def check_target(self, target: Target) -> None:
        if target.arch not in self.arches:
            raise UserError(
                f"the {self.name} backend cannot build for {target.arch}", "choose another target"
            )

    def can_run_here(self, target: Target) -> tuple[bool, str]:
        if target.arch != platform.machine():
            return False, f"{target.arch} code"
        return True, "this CPU"

    def load(self, bundle_dir: Path, threads: int | None = None) -> BundleSession:
        return BundleSession(bundle_dir, threads)


def available_backends() -> dict[str, Backend]:
    from redux_edge.backends.onnxruntime import OnnxRuntimeBackend
    from redux_edge.backends.openvino import OpenVinoBackend
    from redux_edge.backends.tensorrt import TensorRtBackend
    from redux_edge.backends.tvm import TvmBackend

    backends = (OnnxRuntimeBackend(), OpenVinoBackend(), TvmBackend(), TensorRtBackend())
    return {backend.name: backend for backend in backends}


def select_backend(target: Target, requested: str | None) -> Backend:
    """The backend to use for ``target``; raises UserError naming what is missing and how to get it."""
    known = available_backends()
    name = requested or target.backends[0]
    if name not in known:
        if requested is not None:
            raise UserError(f"unknown backend '{requested}'", f"this version has: {', '.join(sorted(known))}")
        fallback = [b for b in target.backends if b in known]
        hint = (
            f"pass --backend {fallback[0]}"
            if fallback
            else "choose another target (see `redux-edge targets`)"
        )
        raise UserError(
            f"target {target.name} needs the {name} backend, which this version does not have", hint
        )
    backend = known[name]
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
    backend.check_target(target)
    return backend
