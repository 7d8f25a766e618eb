"""ONNX Runtime bundles on the device: the only executor that takes packed N:M weights and swaps
initializers (adapter packs) when the session opens."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .packed import add_packed_weights
from .session import ranked

if TYPE_CHECKING:
    from .session import BundleSession

__all__ = ["SWAPS_INITIALIZERS", "layer_times", "open_executor"]

# Adapter packs replace initializers when a session opens (SessionOptions.add_initializer).
SWAPS_INITIALIZERS = True


def open_executor(
    bundle_dir: Path,
    backend: dict,
    threads: int,
    output_names: list[str],
    storage: dict,
    overrides: dict | None,
    profile_prefix: str | None = None,
) -> _Session:
    import onnxruntime as ort

    settings = backend["session"]
    options = ort.SessionOptions()
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    options.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, settings["load_optimization_level"]
    )
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = settings["inter_op_num_threads"]
    # The recorded order of preference, less the providers this ONNX Runtime build lacks.
    providers = [name for name in settings["providers"] if name in ort.get_available_providers()]
    buffers = add_packed_weights(options, bundle_dir, backend["artifact"], storage)
    # An adapter pack replaces the adapter initializers; ONNX Runtime uses their memory for the session's
    # life, so the arrays and OrtValues stay referenced by the returned function.
    arrays = overrides or {}
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
    for name, value in values.items():
        options.add_initializer(name, value)
    session = ort.InferenceSession(str(bundle_dir / backend["artifact"]), options, providers=providers)
    return _Session(session, output_names, [buffers, arrays, values])


class _Session:
    """``run(feeds) -> outputs``; holds the arrays behind the session's external initializers."""

    def __init__(self, session: Any, output_names: list[str], buffers: list) -> None:
        self.session, self.output_names, self.buffers = session, output_names, buffers

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feeds)


def layer_times(session: BundleSession, feeds: dict, runs: int, threads: int) -> dict:
    """ONNX Runtime's profiler: the ``*_kernel_time`` events of every node, in a Chrome trace file."""
    manifest, folder = session.manifest, session.bundle_dir
    with tempfile.TemporaryDirectory() as scratch:
        execute = open_executor(
            folder,
            manifest["backend"],
            threads,
            session.output_names,
            manifest.get("storage") or {},
            None,
            str(Path(scratch) / "ort"),
        )
        for _ in range(runs):
            execute(feeds)
        events = json.loads(Path(execute.session.end_profiling()).read_text())
    micros: dict[tuple[str, str], float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            key = (event["name"][: -len("_kernel_time")], event.get("args", {}).get("op_name", ""))
            micros[key] = micros.get(key, 0.0) + event["dur"]
    layers = [{"name": name, "op": op, "ms": total / runs / 1000.0} for (name, op), total in micros.items()]
    return ranked("onnxruntime profiler (kernel time per node)", layers, runs)
