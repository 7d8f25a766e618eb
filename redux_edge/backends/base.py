"""The backend protocol, and the choice of a backend for a target.

A backend lowers the IR for a target into files under ``artifact/`` and says how to open them
(``lower``); it loads an artifact and runs it (``load``). It never changes what the graph computes:
rewrites it makes for speed (operator fusion, layout) are checked by the compile's verification. A
target lists backends in order of preference; the first one is used unless ``--backend`` names another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from redux_edge.errors import UserError
from redux_edge.targets import Target

__all__ = ["Backend", "available_backends", "select_backend"]


class Backend(Protocol):
    name: str

    def can_build_here(self) -> tuple[bool, str]:
        """Whether this machine can lower for the backend, and why not."""

    def can_run_here(self, target: Target) -> tuple[bool, str]:
        """Whether an artifact for ``target`` can run on this machine, and why not."""

    def lower(self, model_file: Path, target: Target, artifact_dir: Path, options: dict) -> dict:
        """Write the artifact for ``model_file`` into ``artifact_dir``; return its manifest entry."""

    def load(self, bundle_dir: Path, threads: int | None = None):
        """A session with ``run(feeds) -> outputs`` and ``benchmark(feeds, warmup, iterations)``."""


def available_backends() -> dict[str, Backend]:
    from redux_edge.backends.onnxruntime import OnnxRuntimeBackend

    return {backend.name: backend for backend in (OnnxRuntimeBackend(),)}


def select_backend(target: Target, requested: str | None) -> Backend:
    built = available_backends()
    if requested is not None:
        if requested not in built:
            raise UserError(f"unknown backend '{requested}'", f"this version has: {', '.join(sorted(built))}")
        if requested not in target.backends:
            raise UserError(
                f"target {target.name} does not run the {requested} backend",
                f"its backends are: {', '.join(target.backends)}",
            )
        return built[requested]
    preferred = target.backends[0]
    if preferred not in built:
        fallback = [name for name in target.backends if name in built]
        hint = (
            f"pass --backend {fallback[0]}"
            if fallback
            else "choose another target (see `redux-edge targets`)"
        )
        raise UserError(
            f"target {target.name} needs the {preferred} backend, which this version does not have yet", hint
        )
    return built[preferred]
