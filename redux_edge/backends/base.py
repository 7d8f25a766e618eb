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

from redux_edge.backends.board import board_runner
from redux_edge.errors import UserError
from redux_edge.interfaces import Flag
from redux_edge.runtime.session import BundleSession
from redux_edge.targets import Target

__all__ = ["Backend", "CpuBackend", "Emulation", "quantized_onnx_operators"]

# A runner for an artifact that cannot run here but can be checked another way, and how it runs.
Emulation = tuple[Callable[[dict[str, np.ndarray]], list[np.ndarray]] | None, str]


class Backend:
    name: ClassVar[str]
    # The precisions the backend computes a float graph in (``--precision``).
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    default_precision: ClassVar[str] = "fp32"
    # What the quantize pass can make of a model for this backend, by precision: "integer" (the pass
    # rewrites the graph into QDQ or dynamic INT8 operators and the backend runs integer kernels),
    # "dequantized" (the backend imports that graph but computes the dequantized values in fp32: the
    # same numbers, no speed), "runtime" (the graph stays fp32; the backend computes at that precision).
    quantized: ClassVar[dict[str, str]] = {}
    # CPU features a precision needs, by architecture (any one of them), where the backend would
    # otherwise fall back to fp32 without saying so; an architecture not listed cannot have it.
    precision_features: ClassVar[dict[str, dict[str, tuple[str, ...]]]] = {}
    # INT8 must be symmetric and signed, weights float behind their own Q/DQ pair (TensorRT's explicit
    # quantization); otherwise the target's CPU decides the form.
    symmetric_int8: ClassVar[bool] = False
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

    def precision_refusal(self, precision: str, target: Target) -> str:
        """Why the backend cannot compute ``precision`` (``--precision`` or ``--quantize``) for
        ``target``; empty when it can."""
        if precision not in self.precisions and precision not in self.quantized:
            known = ", ".join(sorted({*self.precisions, *self.quantized}))
            return f"the {self.name} backend has no precision '{precision}' (it has {known})"
        needs = self.precision_features.get(precision)
        if needs is None:
            return ""
        features = needs.get(target.arch, ())
        if not features:
            return f"the {self.name} backend computes {precision} on no {target.arch} CPU"
        if not any(target.has(feature) for feature in features):
            return (
                f"{self.name} computes {precision} only with {' or '.join(features)}, "
                f"which target {target.name} does not list"
            )
        return ""

    def precisions_for(self, target: Target) -> list[str]:
        """Every precision the backend can compute for ``target`` (``redux-edge targets``)."""
        known = dict.fromkeys([*self.precisions, *self.quantized])
        return [precision for precision in known if not self.precision_refusal(precision, target)]

    def quantized_operators(self, stage: Path, entry: dict) -> dict[str, int]:
        """Operators of the built artifact in ``stage`` that compute in integer or half precision, by
        kind: the evidence that a precision is real. Empty where the artifact cannot be read here."""
        return {}

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

    def emulate(self, stage: Path, target: Target) -> Emulation:
        """aarch64 code on another machine runs on the emulated board where it is set up."""
        if target.arch == "aarch64":
            return board_runner(stage, target)
        return None, ""


def quantized_onnx_operators(onnx_file: Path) -> dict[str, int]:
    """The integer-arithmetic and quantize/dequantize operators of an ONNX file, by type (ONNX's QDQ
    and integer operators, ONNX Runtime's fused ``com.microsoft`` ones)."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(onnx_file), load_external_data=False).graph.node:
        op = node.op_type
        if "Integer" in op or "quantize" in op.lower() or op.startswith(("QLinear", "QGemm", "QAttention")):
            counts[op] = counts.get(op, 0) + 1
    return counts
