"""OpenVINO bundles on the device: the IR (.xml/.bin) compiled with the recorded precision hint."""

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
    import openvino as ov

    settings = backend["session"]
    config = {"INFERENCE_PRECISION_HINT": settings["inference_precision"], "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(str(bundle_dir / backend["artifact"]), settings["device"], config)
    request = compiled.create_infer_request()

    def execute(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = request.infer(feeds)
        return [np.array(results[compiled.output(name)]) for name in output_names]

    return execute


def layer_times(session: BundleSession, feeds: dict, runs: int, threads: int) -> dict:
    """OpenVINO's performance counters (``PERF_COUNT``): real time per executed layer."""
    import openvino as ov

    settings = session.manifest["backend"]["session"]
    config = {"INFERENCE_PRECISION_HINT": settings["inference_precision"], "PERF_COUNT": True}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    path = str(session.bundle_dir / session.manifest["backend"]["artifact"])
    request = ov.Core().compile_model(path, settings["device"], config).create_infer_request()
    micros: dict[tuple[str, str], float] = {}
    for _ in range(runs):
        request.infer(feeds)
        for layer in request.profiling_info:
            key = (layer.node_name, layer.node_type)
            micros[key] = micros.get(key, 0.0) + layer.real_time.total_seconds() * 1e6
    layers = [{"name": name, "op": op, "ms": total / runs / 1000.0} for (name, op), total in micros.items()]
    return ranked("OpenVINO performance counters (real time per layer)", layers, runs)
