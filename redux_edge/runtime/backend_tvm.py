"""TVM bundles on the device: the shared library run by the Relax virtual machine."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .session import Executor, ranked

if TYPE_CHECKING:
    from .session import BundleSession

__all__ = ["layer_times", "open_executor"]


def open_executor(
    bundle_dir: Path,
    backend: dict,
    threads: int,
    output_names: list[str],
    storage: dict,
    overrides: dict | None,
) -> Executor:
    import tvm
    from tvm import relax

    if threads:
        tvm.get_global_func("runtime.config_threadpool")(0, threads)
    machine = relax.VirtualMachine(tvm.runtime.load_module(str(bundle_dir / backend["artifact"])), tvm.cpu())
    order = backend["session"]["input_order"]

    def execute(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = machine["main"](*(tvm.runtime.tensor(feeds[name]) for name in order))
        # One output comes back as a tensor, several as a tuple of tensors.
        results = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        return [np.asarray(item.numpy()) for item in results]

    return execute


def layer_times(session: BundleSession, feeds: dict, runs: int, threads: int) -> dict:
    """The Relax VM offers no per-operator profile in this TVM; its time evaluator times ``main``."""
    import tvm
    from tvm import relax

    backend = session.manifest["backend"]
    if threads:
        tvm.get_global_func("runtime.config_threadpool")(0, threads)
    machine = relax.VirtualMachine(
        tvm.runtime.load_module(str(session.bundle_dir / backend["artifact"])), tvm.cpu()
    )
    arguments = [tvm.runtime.tensor(feeds[name]) for name in backend["session"]["input_order"]]
    timed = machine.time_evaluator("main", tvm.cpu(), number=1, repeat=runs)(*arguments)
    layers = [{"name": "main", "op": "relax function", "ms": float(timed.mean) * 1000.0}]
    return ranked("TVM time evaluator (whole function; no per-operator profile)", layers, runs)
