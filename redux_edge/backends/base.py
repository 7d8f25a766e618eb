"""The backend contract and what the CPU backends share.

A backend lowers the IR for a target into files under ``artifact/`` and says how to open them
(``lower``); it loads an artifact and runs it (``load``, through the bundle's runner, whose
``backend_<name>.py`` is the device half of the backend). It never changes what the graph computes:
rewrites it makes for speed (operator fusion, layout) are checked by the compile's verification. What it
can do is data, read by the pipeline, the CLI and ``flash`` instead of backend names: precisions, static
shapes, whether it swaps initializers when a session opens (adapter packs), runs random operators
(mac-prune), builds its engine on the device, and the ``compile`` flags it takes.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from redux_edge.errors import UserError
from redux_edge.passes.contract import Flag
from redux_edge.runtime.session import BundleSession
from redux_edge.targets import Target

__all__ = ["Backend", "CpuBackend", "Emulation"]

# A runner for an artifact that cannot run here but can be checked another way, and how it runs.
Emulation = tuple[Callable[[dict[str, np.ndarray]], list[np.ndarray]] | None, str]


class Backend:
    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    default_precision: ClassVar[str] = "fp32"
    static_shapes: ClassVar[bool] = False
    # ONNX Runtime's SessionOptions.add_initializer: adapter packs swapped when a session opens.
    swaps_initializers: ClassVar[bool] = False
    # Executes ONNX RandomUniformLike draws per run (mac-prune's masks).
    runs_random_ops: ClassVar[bool] = False
    # The engine is built on the device, during flash, before the release is activated.
    builds_on_device: ClassVar[bool] = False
    # What a device needs to run this backend's bundles (a Python module, or trtexec), and the Python
    # modules `devices check` looks for there, with their distributions (for the version).
    device_runtime: ClassVar[str]
    device_modules: ClassVar[dict[str, str]] = {}
    flags: ClassVar[tuple[Flag, ...]] = ()

    def options_from_flags(self, values: Mapping[str, Any]) -> dict:
        """Lowering options from this backend's ``compile`` flags."""
        return {flag.parameter: values[flag.dest] for flag in self.flags if flag.given(values)}

    def can_build_here(self) -> tuple[bool, str]:
        """Whether this machine can lower for the backend, and why not."""
        raise NotImplementedError

    def check_target(self, target: Target) -> None:
        """Raise UserError when the backend cannot produce an artifact for ``target`` at all."""

    def can_run_here(self, target: Target) -> tuple[bool, str]:
        """Whether an artifact for ``target`` can run on this machine, and why not."""
        raise NotImplementedError

    def lower(self, model_file: Path, target: Target, artifact_dir: Path, options: dict) -> dict:
        """Write the artifact for ``model_file`` into ``artifact_dir``; return its manifest entry.

        ``options``: ``threads`` (None = all cores), ``precision``, ``shapes`` (static input shapes),
        and what the backend's flags set.
        """
        raise NotImplementedError

    def load(self, bundle_dir: Path, threads: int | None = None) -> BundleSession:
        """A session with ``run(feeds) -> outputs`` and ``benchmark(feeds, warmup, iterations)``."""
        return BundleSession(bundle_dir, threads)

    def emulate(self, stage: Path, target: Target) -> Emulation:
        """A runner for an artifact that cannot run here, or (None, why not; empty: no emulation)."""
        return None, ""


class CpuBackend(Backend):
    """What the CPU backends share: fp32, dynamic shapes, artifacts that run where the arch matches."""

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
