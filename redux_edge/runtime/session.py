"""Open a bundle and run it: the recorded signature checked first, the artifact through the executor of
its backend (``backend_<name>.py`` beside this file), benchmarks and per-layer profiles."""

from __future__ import annotations

import importlib
import json
import logging
import posixpath
import re
import resource
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .adapter_pack import adapter_initializers, read_adapter_pack
from .packed import file_name

__all__ = [
    "BundleSession",
    "EngineBuildError",
    "InputError",
    "bench_report",
    "check_inputs",
    "executor_module",
    "latency_stats",
    "named_paths",
    "one_line",
    "open_artifact",
    "paths_outside",
    "ranked",
    "refuse_unlisted_files",
    "unlisted_files",
]

Executor = Callable[[dict[str, np.ndarray]], list[np.ndarray]]

_DTYPES = {
    "FLOAT": np.float32,
    "FLOAT16": np.float16,
    "DOUBLE": np.float64,
    "INT64": np.int64,
    "INT32": np.int32,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}


def one_line(exc: BaseException, limit: int = 400) -> str:
    """A runtime's error message on one line, its end kept (where the runtimes say what went wrong)."""
    return " ".join(str(exc).split())[-limit:]


class EngineBuildError(RuntimeError):
    """trtexec failed, or 2:4 sparsity was asked for and TensorRT picked no sparse tactic (the device's
    problem, not the input's: exit code 1)."""


class InputError(ValueError):
    """Inputs that do not fit the bundle's recorded signature."""


def executor_module(backend_name: str) -> Any:
    """The runner module of a backend: ``backend_<name>.py`` beside this file."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", backend_name):
        raise InputError(f"the manifest names backend {backend_name!r}")
    try:
        return importlib.import_module(f"{__package__}.backend_{backend_name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.backend_{backend_name}":
            raise  # the backend's runtime (onnxruntime, openvino, tvm) is missing on this machine
        raise NotImplementedError(f"this runner cannot run {backend_name} artifacts") from exc


def open_artifact(
    bundle_dir: Path,
    backend: dict,
    threads: int,
    output_names: list[str],
    storage: dict | None = None,
    overrides: dict | None = None,
) -> Executor:
    """``run(feeds) -> outputs`` for an artifact described by a manifest's backend entry; ``storage``
    is the manifest's index of packed weights, ``overrides`` initializer values (an adapter pack)."""
    module = executor_module(backend["name"])
    if overrides and not getattr(module, "SWAPS_INITIALIZERS", False):
        raise InputError(
            f"adapter packs are swapped into ONNX Runtime sessions; this is a {backend['name']} bundle"
        )
    return module.open_executor(Path(bundle_dir), backend, threads, output_names, storage or {}, overrides)


def refuse_unlisted_files(bundle_dir: Path) -> None:
    """The runner's check before it opens a bundle it is handed (a compile's staging folder is not one):
    every path the manifest names stays inside the bundle, and the bundle holds nothing else."""
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    if outside := paths_outside(bundle_dir, manifest):
        raise InputError(
            f"the manifest names a path outside the bundle ({outside[0]}): copy the bundle again"
        )
    if unlisted := unlisted_files(bundle_dir, manifest):
        raise InputError(
            f"the bundle holds files its manifest does not list ({', '.join(unlisted[:3])}): "
            "remove them, or flash or copy the bundle again"
        )


def named_paths(manifest: Mapping[str, Any]) -> list[Any]:
    """Every path a manifest names: its files, the artifact, packed weights and their dense twins, the
    engine folder, adapter packs and the tokenizer (values as found: the caller checks they are text)."""
    backend = manifest["backend"]
    paths = [*manifest["files"], backend["artifact"]]
    for relative, index in ((manifest.get("storage") or {}).get("packed_files") or {}).items():
        paths += [relative, posixpath.join(posixpath.dirname(relative), index["dense"])]
    if engine_dir := (backend.get("engine_build") or {}).get("engine_dir"):
        paths.append(engine_dir)
    paths += [pack["file"] for pack in (manifest.get("adapters") or {}).get("packs", [])]
    if tokenizer := (manifest.get("preprocess") or {}).get("tokenizer"):
        paths.append(tokenizer)
    return paths


def paths_outside(bundle_dir: Path, manifest: Mapping[str, Any]) -> list[str]:
    """The paths a manifest names that are not relative, lead outside the bundle (links followed), or,
    for the artifact, are not among the files it lists and checksums."""
    root = Path(bundle_dir).resolve()
    outside = [
        str(path)
        for path in named_paths(manifest)
        if not isinstance(path, str)
        or not path
        or "\x00" in path
        or posixpath.isabs(path)
        or not (root / path).resolve().is_relative_to(root)
    ]
    artifact = manifest["backend"]["artifact"]
    if not outside and artifact not in manifest["files"]:
        outside.append(f"{artifact}, which it does not list")
    return outside


def unlisted_files(bundle_dir: Path, manifest: Mapping[str, Any]) -> list[str]:
    """Files in the bundle that its manifest does not list, and links: nothing but what was compiled may be
    there to be read or run, and nothing may lead outside. The manifest itself and the engines a TensorRT
    device builds into its own folder are the bundle's; a device may hold fewer files than listed."""
    listed = set(manifest["files"]) | {"manifest.json"}
    engine_dir = (manifest["backend"].get("engine_build") or {}).get("engine_dir")
    found = []
    for path in sorted(bundle_dir.rglob("*")):
        relative = path.relative_to(bundle_dir).as_posix()
        if path.is_symlink():
            found.append(f"{relative} (a link)")
            continue
        if path.is_dir() or relative in listed:
            continue
        if engine_dir and relative.startswith(f"{engine_dir}/"):
            continue
        found.append(relative)
    return found


class BundleSession:
    """An opened bundle; ``adapter`` names the task whose adapter pack to load (swappable bundles)."""

    def __init__(self, bundle_dir: Path, threads: int | None = None, adapter: str | None = None) -> None:
        try:
            self._open(Path(bundle_dir), threads, adapter)
        except (InputError, EngineBuildError, NotImplementedError, ImportError):
            raise
        except Exception as exc:
            # The manifest and artifact are data from elsewhere: a field the schema does not pin, or an
            # artifact the runtime refuses (ONNX Runtime's, OpenVINO's and TVM's own error types).
            raise InputError(
                f"the bundle cannot be opened ({type(exc).__name__}: {one_line(exc, 300)})"
            ) from exc

    def _open(self, bundle_dir: Path, threads: int | None, adapter: str | None) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = json.loads((self.bundle_dir / "manifest.json").read_text())
        backend = self.manifest["backend"]
        self.inputs = self.manifest["inputs"]
        self.output_names = [output["name"] for output in self.manifest["outputs"]]
        threads = backend["session"]["threads"] if threads is None else threads
        overrides = self._adapter_values(adapter) if adapter is not None else None
        self._execute = open_artifact(
            self.bundle_dir, backend, threads, self.output_names, self.manifest.get("storage"), overrides
        )

    def _adapter_values(self, task: str) -> dict[str, np.ndarray]:
        adapters = self.manifest.get("adapters") or {}
        packs = {pack["task"]: pack for pack in adapters.get("packs", [])}
        if adapters.get("merged") or task not in packs:
            have = "merged into the weights" if adapters.get("merged") else ", ".join(packs) or "none"
            raise InputError(f"this bundle has no swappable adapter '{task}' (its adapters: {have})")
        path = self.bundle_dir / "adapters" / file_name(Path(packs[task]["file"]).name)
        return adapter_initializers(read_adapter_pack(path), adapters["initializers"])

    def check_inputs(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return check_inputs(self.inputs, feeds)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._run_checked(self.check_inputs(feeds))

    def _run_checked(self, checked: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self._execute(checked)
        except Exception as exc:
            # The artifact ran its sample at compile time; what fails now is these inputs' values
            # (a token id outside the vocabulary, a sequence longer than the position table). Each runtime
            # raises its own types (ONNX Runtime's pybind errors, OpenVINO's and TVM's RuntimeError).
            raise InputError(
                f"the {self.manifest['backend']['name']} runtime cannot run these inputs: {one_line(exc)}"
            ) from exc

    def sample(self) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        with (
            np.load(self.bundle_dir / "sample" / "inputs.npz", allow_pickle=False) as inputs,
            np.load(self.bundle_dir / "sample" / "outputs.npz", allow_pickle=False) as outputs,
        ):
            return {k: inputs[k] for k in inputs.files}, [outputs[name] for name in self.output_names]

    def benchmark(
        self, feeds: dict[str, np.ndarray], warmup: int, iterations: int, duration: float | None = None
    ) -> dict:
        """Latency statistics of ``iterations`` runs after ``warmup``, or of as many runs as fit in
        ``duration`` seconds; ``latencies_ms`` holds every run, ``peak_rss_mb`` this process's peak."""
        checked = self.check_inputs(feeds)
        # An executor that times itself (trtexec) measures without a process start per run.
        own = getattr(self._execute, "benchmark", None)
        if own is not None:
            return own(checked, warmup, iterations, duration)
        self._run_checked(checked)  # fails on the inputs before anything is timed
        for _ in range(warmup):
            self._execute(checked)
        seconds: list[float] = []
        deadline = time.perf_counter() + duration if duration else None
        while len(seconds) < iterations if deadline is None else time.perf_counter() < deadline:
            start = time.perf_counter()
            self._execute(checked)
            seconds.append(time.perf_counter() - start)
        return bench_report(seconds, checked, resource.RUSAGE_SELF)

    def layer_times(self, feeds: dict[str, np.ndarray], runs: int, threads: int | None = None) -> dict:
        """Per-layer milliseconds from the backend's own profiler, averaged over ``runs`` runs, in a
        separate session so that profiling does not slow the latency figures."""
        backend = self.manifest["backend"]
        threads = backend["session"]["threads"] if threads is None else threads
        checked = self.check_inputs(feeds)
        # An executor that profiles itself (trtexec's --exportProfile) needs no second session.
        own = getattr(self._execute, "layer_times", None)
        if own is not None:
            return own(checked, runs)
        return executor_module(backend["name"]).layer_times(self, checked, runs, threads)


def check_inputs(specs: list[dict], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` cast to the recorded dtypes; InputError when a name, rank, size or dtype does not fit."""
    expected = [spec["name"] for spec in specs]
    if sorted(feeds) != sorted(expected):
        raise InputError(f"inputs are {sorted(feeds)}, the model takes {expected}")
    checked: dict[str, np.ndarray] = {}
    sizes: dict[str, int] = {}
    for spec in specs:
        array = np.asarray(feeds[spec["name"]])
        shape = spec["shape"]
        if array.ndim != len(shape):
            raise InputError(f"input '{spec['name']}' has shape {list(array.shape)}, expected {shape}")
        for axis, (dim, size) in enumerate(zip(shape, array.shape, strict=True)):
            # A named dimension must agree across inputs (batch, sequence); a number must match exactly.
            if isinstance(dim, str):
                if sizes.setdefault(dim, size) != size:
                    raise InputError(
                        f"input '{spec['name']}' axis {axis} ({dim}) is {size}, "
                        f"another input has {dim}={sizes[dim]}"
                    )
            elif dim != size:
                raise InputError(f"input '{spec['name']}' has shape {list(array.shape)}, expected {shape}")
        checked[spec["name"]] = _cast_losslessly(spec["name"], array, np.dtype(_DTYPES[spec["dtype"]]))
        if checked[spec["name"]].dtype.kind == "f" and np.isnan(checked[spec["name"]]).any():
            # A NaN input gives NaN outputs, which would be printed as an answer ("class 0").
            raise InputError(f"input '{spec['name']}' holds NaN values")
    return checked


def _cast_losslessly(name: str, array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``array`` as ``dtype`` when every value survives the cast (int64 token ids given for int32, a bool
    mask for float), said on stderr; otherwise the mismatch is the user's to fix, not ours to round."""
    if array.dtype == dtype:
        return array
    cast = array.astype(dtype) if np.can_cast(array.dtype, dtype, casting="same_kind") else None
    exact = cast is not None and np.array_equal(
        cast.astype(array.dtype), array, equal_nan=array.dtype.kind == "f"
    )
    if cast is None:
        raise InputError(f"input '{name}' has dtype {array.dtype}, expected {dtype}")
    if not exact:
        raise InputError(
            f"input '{name}' has dtype {array.dtype} and its values do not all fit {dtype}: give {dtype} "
            f"(e.g. array.astype(numpy.{dtype.name}))"
        )
    logging.getLogger(__name__).warning(
        "input '%s' given as %s, cast to %s (no value changed)", name, array.dtype, dtype
    )
    return cast


def latency_stats(seconds: list[float], batch: int) -> dict:
    ms = np.asarray(seconds) * 1000.0
    return {
        "iterations": len(seconds),
        "batch": batch,
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "std_ms": float(ms.std()),
        "throughput_per_s": float(batch * 1000.0 / ms.mean()),
    }


def bench_report(seconds: list[float], feeds: dict[str, np.ndarray], who: int) -> dict:
    """Statistics, every latency, and the peak RSS of ``who`` (this process, or its children: trtexec)."""
    batch = next(iter(feeds.values())).shape[0] if feeds else 1
    # ru_maxrss is in KiB on Linux.
    peak = resource.getrusage(who).ru_maxrss / 1024
    return {
        **latency_stats(seconds, batch),
        "latencies_ms": [round(value * 1000.0, 4) for value in seconds],
        "peak_rss_mb": round(peak, 1),
    }


def ranked(source: str, layers: list[dict], runs: int) -> dict:
    layers = sorted(layers, key=lambda layer: -layer["ms"])
    return {
        "source": source,
        "runs": runs,
        "total_ms": sum(layer["ms"] for layer in layers),
        "layers": layers,
    }
