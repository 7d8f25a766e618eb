"""Run a redux-edge bundle with nothing but numpy and the backend's own runtime.

Backends: ONNX Runtime, OpenVINO and Apache TVM (the Relax virtual machine); each is imported only when a
bundle of its kind is opened, so a device needs just the runtime its bundles use.

This file is copied into every bundle as ``runner/run.py`` and is what a device executes, so it must not
import redux-edge. It reads ``manifest.json``, opens the artifact with the session settings recorded at
compile time, checks inputs against the recorded signature, and offers a latency benchmark and a health
check (the bundle's sample inputs must reproduce its sample outputs)::

    python runner/run.py --inputs x.npz --outputs y.npz
    python runner/run.py --bench --iterations 100 --json
    python runner/run.py --bench --duration 30 --layers --latencies --json   # what `profile` runs
    python runner/run.py --check
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

__all__ = [
    "BundleSession",
    "EngineBuildError",
    "InputError",
    "adapter_initializers",
    "add_packed_weights",
    "build_engine",
    "check_inputs",
    "check_sparse_tactics",
    "expand_packed",
    "latency_stats",
    "parse_adapter_pack",
    "parse_tegrastats",
    "parse_trtexec_log",
    "read_adapter_pack",
    "unpacked_weights",
]

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


class InputError(ValueError):
    """Inputs that do not fit the bundle's recorded signature."""


class BundleSession:
    """An opened bundle; ``adapter`` names the task whose adapter pack to load (swappable bundles)."""

    def __init__(self, bundle_dir: Path, threads: int | None = None, adapter: str | None = None) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.manifest = json.loads((self.bundle_dir / "manifest.json").read_text())
        backend = self.manifest["backend"]
        if backend["name"] not in ("onnxruntime", *_EXECUTORS):
            raise NotImplementedError(f"this runner cannot run {backend['name']} artifacts")
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
        path = self.bundle_dir / "adapters" / _file_name(Path(packs[task]["file"]).name)
        return adapter_initializers(read_adapter_pack(path), adapters["initializers"])

    def check_inputs(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return check_inputs(self.inputs, feeds)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._execute(self.check_inputs(feeds))

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
        if isinstance(self._execute, TrtexecEngine):
            return self._execute.benchmark(checked, warmup, iterations, duration)
        for _ in range(warmup):
            self._execute(checked)
        seconds = []
        deadline = time.perf_counter() + duration if duration else None
        while len(seconds) < iterations if deadline is None else time.perf_counter() < deadline:
            start = time.perf_counter()
            self._execute(checked)
            seconds.append(time.perf_counter() - start)
        return _bench_report(seconds, checked, resource.RUSAGE_SELF)

    def layer_times(self, feeds: dict[str, np.ndarray], runs: int, threads: int | None = None) -> dict:
        """Per-layer milliseconds from the backend's own profiler, averaged over ``runs`` runs, in a
        separate session so that profiling does not slow the latency figures."""
        backend = self.manifest["backend"]
        threads = backend["session"]["threads"] if threads is None else threads
        checked = self.check_inputs(feeds)
        if isinstance(self._execute, TrtexecEngine):
            return self._execute.layer_times(checked, runs)
        profilers = {"onnxruntime": _onnxruntime_layers, "openvino": _openvino_layers, "tvm": _tvm_layers}
        return profilers[backend["name"]](self, checked, runs, threads)


def _onnxruntime(
    bundle_dir: Path,
    backend: dict,
    threads: int,
    output_names: list[str],
    storage: dict,
    overrides: dict | None,
    profile_prefix: str | None = None,
):
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

    def execute(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return session.run(output_names, feeds)

    execute.buffers = (buffers, arrays, values)
    execute.session = session
    return execute


def _onnxruntime_layers(session: BundleSession, feeds: dict, runs: int, threads: int) -> dict:
    """ONNX Runtime's profiler: the ``*_kernel_time`` events of every node, in a Chrome trace file."""
    manifest, folder = session.manifest, session.bundle_dir
    with tempfile.TemporaryDirectory() as scratch:
        execute = _onnxruntime(
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
    return _ranked("onnxruntime profiler (kernel time per node)", layers, runs)


def _openvino_layers(session: BundleSession, feeds: dict, runs: int, threads: int) -> dict:
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
    return _ranked("OpenVINO performance counters (real time per layer)", layers, runs)


def _tvm_layers(session: BundleSession, feeds: dict, runs: int, threads: int) -> dict:
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
    return _ranked("TVM time evaluator (whole function; no per-operator profile)", layers, runs)


def _ranked(source: str, layers: list[dict], runs: int) -> dict:
    layers = sorted(layers, key=lambda layer: -layer["ms"])
    return {
        "source": source,
        "runs": runs,
        "total_ms": sum(layer["ms"] for layer in layers),
        "layers": layers,
    }


_TEGRA_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_TEGRA_GPU = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?([\d,]+)\]?)?")
# The board's input rail: VDD_IN (Orin Nano/NX, Xavier), VIN_SYS_5V0 (AGX Orin), POM_5V_IN (Nano).
_TEGRA_POWER = re.compile(r"\b(VDD_IN|VIN_SYS_5V0|POM_5V_IN) (\d+)(?:mW)?/\d+")


def parse_tegrastats(lines: list[str]) -> dict:
    """Summary of tegrastats lines: input-rail power (mW), GPU load (%) and frequency (MHz), RAM (MB)."""
    power, load, freq, ram = [], [], [], []
    rail = None
    for line in lines:
        if match := _TEGRA_POWER.search(line):
            rail = match.group(1)
            power.append(float(match.group(2)))
        if match := _TEGRA_GPU.search(line):
            load.append(float(match.group(1)))
            clocks = [float(mhz) for mhz in (match.group(2) or "").split(",") if mhz]
            freq.extend(clocks[:1])
        if match := _TEGRA_RAM.search(line):
            ram.append(float(match.group(1)))

    def summary(values: list[float]) -> dict | None:
        return {"mean": float(np.mean(values)), "max": float(np.max(values))} if values else None

    return {
        "samples": len(lines),
        "power_rail": rail,
        "power_mw": summary(power),
        "gpu_load_pct": summary(load),
        "gpu_freq_mhz": summary(freq),
        "ram_used_mb": summary(ram),
    }


class Tegrastats:
    """Samples ``tegrastats`` (Jetson) while the block runs; ``summary`` is None where it is absent."""

    def __init__(self, interval_ms: int = 100) -> None:
        self.interval_ms = interval_ms
        self.summary: dict | None = None

    def __enter__(self) -> Tegrastats:
        program = shutil.which("tegrastats")
        self._process = None
        if program:
            self._lines: list[str] = []
            self._process = subprocess.Popen(
                [program, "--interval", str(self.interval_ms)], stdout=subprocess.PIPE, text=True
            )
            self._reader = threading.Thread(
                target=lambda: self._lines.extend(self._process.stdout), daemon=True
            )
            self._reader.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=5)
            self._reader.join(timeout=5)
            self.summary = parse_tegrastats(self._lines)


def _openvino(bundle_dir: Path, backend: dict, threads: int, output_names: list[str]):
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


def _tvm(bundle_dir: Path, backend: dict, threads: int, output_names: list[str]):
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


class TrtexecEngine:
    """A TensorRT engine run by NVIDIA's ``trtexec`` (JetPack ships it; the Python bindings would also
    need a CUDA memory library): inputs go in as raw files (``--loadInputs``), outputs come back as JSON
    (``--exportOutput``), latencies from trtexec's own timing (``--exportTimes``) and per-layer times
    from its profiler (``--exportProfile``), so that no process start is ever timed."""

    def __init__(self, bundle_dir: Path, backend: dict, output_names: list[str]) -> None:
        self.trtexec = _trtexec()
        plan = backend["engine_build"]
        version = _tensorrt_version(self.trtexec)
        self.engine = bundle_dir / plan["engine_dir"] / f"{plan['engine_name']}-trt{version}.plan"
        if not self.engine.is_file():
            raise EngineBuildError(
                f"no engine {self.engine.name} for this TensorRT; run --build-engine first"
            )
        self.output_names = output_names

    def _export(self, feeds: dict[str, np.ndarray], flag: str, *options: str) -> list:
        """The JSON that trtexec writes to ``flag=<file>`` (one of its exports) running ``feeds``."""
        with tempfile.TemporaryDirectory() as folder:
            scratch = Path(folder)
            specs = []
            for index, (name, array) in enumerate(feeds.items()):
                path = scratch / f"input{index}.bin"
                np.ascontiguousarray(array).tofile(path)
                specs.append(f"'{name}':{path}")
            exported = scratch / "export.json"
            argv = [
                self.trtexec,
                f"--loadEngine={self.engine}",
                f"--loadInputs={','.join(specs)}",
                f"{flag}={exported}",
                *options,
            ]
            completed = subprocess.run(argv, capture_output=True, text=True, check=False)
            if completed.returncode != 0:
                tail = (completed.stdout + completed.stderr).strip().splitlines()[-1:] or ["no output"]
                raise EngineBuildError(f"trtexec failed ({completed.returncode}): {tail[0]}")
            return json.loads(exported.read_text())

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        exported = self._export(feeds, "--exportOutput", "--iterations=1", "--warmUp=0")
        outputs = {
            entry["name"]: np.asarray(entry["values"], np.float32).reshape(
                [int(size) for size in entry["dimensions"].split("x")]
            )
            for entry in exported
        }
        return [outputs[name] for name in self.output_names]

    def benchmark(
        self, feeds: dict[str, np.ndarray], warmup: int, iterations: int, duration: float | None
    ) -> dict:
        # trtexec warms up for a time, not a count; its --duration is a minimum next to --iterations.
        times = self._export(
            feeds,
            "--exportTimes",
            f"--iterations={1 if duration else iterations}",
            f"--duration={duration or 0:g}",
            f"--warmUp={200 if warmup else 0}",
        )
        seconds = [entry["latencyMs"] / 1000.0 for entry in times]
        return _bench_report(seconds, feeds, resource.RUSAGE_CHILDREN)

    def layer_times(self, feeds: dict[str, np.ndarray], runs: int) -> dict:
        profile = self._export(
            feeds,
            "--exportProfile",
            "--dumpProfile",
            "--separateProfileRun",
            f"--iterations={runs}",
            "--warmUp=0",
        )
        # The first entry is {"count": iterations}; then one entry per layer.
        layers = [{"name": entry["name"], "op": "", "ms": entry["averageMs"]} for entry in profile[1:]]
        return _ranked("trtexec profiler (average per layer)", layers, profile[0]["count"])


def _bench_report(seconds: list[float], feeds: dict[str, np.ndarray], who: int) -> dict:
    """Statistics, every latency, and the peak RSS of ``who`` (this process, or its children: trtexec)."""
    batch = next(iter(feeds.values())).shape[0] if feeds else 1
    # ru_maxrss is in KiB on Linux.
    peak = resource.getrusage(who).ru_maxrss / 1024
    return {
        **latency_stats(seconds, batch),
        "latencies_ms": [round(value * 1000.0, 4) for value in seconds],
        "peak_rss_mb": round(peak, 1),
    }


def _trtexec() -> str:
    # JetPack installs trtexec under /usr/src/tensorrt/bin, outside PATH.
    found = shutil.which("trtexec") or shutil.which("trtexec", path="/usr/src/tensorrt/bin")
    if found is None:
        raise EngineBuildError("trtexec is not installed here (it comes with TensorRT / JetPack)")
    return found


# Compiled artifacts; ONNX Runtime's executor also takes packed weights and initializer overrides.
_EXECUTORS = {
    "openvino": _openvino,
    "tvm": _tvm,
    "tensorrt": lambda bundle_dir, backend, threads, output_names: TrtexecEngine(
        bundle_dir, backend, output_names
    ),
}


def open_artifact(
    bundle_dir: Path,
    backend: dict,
    threads: int,
    output_names: list[str],
    storage: dict | None = None,
    overrides: dict | None = None,
):
    """``run(feeds) -> outputs`` for an artifact described by a manifest's backend entry; ``storage``
    is the manifest's index of packed weights, ``overrides`` initializer values (an adapter pack)."""
    # Packed weights and swapped initializers exist only in ONNX files run by ONNX Runtime.
    if backend["name"] == "onnxruntime":
        return _onnxruntime(Path(bundle_dir), backend, threads, output_names, storage or {}, overrides)
    if overrides:
        raise InputError(f"adapter packs swap on ONNX Runtime bundles; this one is {backend['name']}")
    return _EXECUTORS[backend["name"]](Path(bundle_dir), backend, threads, output_names)


def unpacked_weights(folder: Path, index: dict) -> dict[str, np.ndarray]:
    """The dense weights of one packed ONNX file in ``folder`` (see redux_edge/packing.py): per group of
    M along the reduction axis, N kept float32 values and their positions in ceil(log2 M) bits each."""
    n, m = (int(part) for part in index["pattern"].split(":"))
    bits = (m - 1).bit_length()
    blob = (folder / _file_name(index["packed"])).read_bytes()
    weights = {}
    for name, entry in index["tensors"].items():
        values = np.frombuffer(blob, np.float32, entry["values"], entry["values_offset"]).reshape(-1, n)
        raw = np.frombuffer(blob, np.uint8, entry["positions_bytes"], entry["positions_offset"])
        position_bits = np.unpackbits(raw)[: values.size * bits].reshape(-1, bits).astype(np.int64)
        positions = (position_bits @ (1 << np.arange(bits - 1, -1, -1))).reshape(-1, n)
        grouped = np.zeros((values.shape[0], m), np.float32)
        np.put_along_axis(grouped, positions, values, axis=1)
        shape, axis = entry["shape"], entry["axis"]
        moved = [size for i, size in enumerate(shape) if i != axis] + [shape[axis]]
        weights[name] = np.ascontiguousarray(np.moveaxis(grouped.reshape(moved), -1, axis))
    return weights


def add_packed_weights(options, bundle_dir: Path, relative: str, storage: dict) -> list:
    """Give an ONNX Runtime session the expanded packed weights of the bundle file ``relative``. Returns
    the arrays and OrtValues, which the caller keeps as long as the session: an OrtValue made from numpy
    shares the array's memory and does not keep the array alive."""
    import onnxruntime as ort

    packed = storage.get("packed_files", {}).get(relative)
    if not packed:
        return []
    weights = unpacked_weights((bundle_dir / relative).parent, packed)
    values = [ort.OrtValue.ortvalue_from_numpy(array) for array in weights.values()]
    options.add_external_initializers(list(weights), values)
    return [weights, values]


def expand_packed(bundle_dir: Path, storage: dict) -> list[Path]:
    """Write the dense external-data files of every packed ONNX file, for tools that read ONNX files
    (trtexec, onnx, OpenVINO's reader); returns the files written."""
    written = []
    for relative, index in storage.get("packed_files", {}).items():
        folder = (bundle_dir / relative).parent
        dense = bytearray(sum(entry["dense_bytes"] for entry in index["tensors"].values()))
        for name, array in unpacked_weights(folder, index).items():
            entry = index["tensors"][name]
            dense[entry["dense_offset"] : entry["dense_offset"] + entry["dense_bytes"]] = array.tobytes()
        target = folder / _file_name(index["dense"])
        target.write_bytes(bytes(dense))
        written.append(target)
    return written


_ADAPTER_MAGIC = b"RXADPT1\n"


def read_adapter_pack(path: Path) -> dict:
    return parse_adapter_pack(Path(path).read_bytes(), str(path))


def parse_adapter_pack(blob: bytes, origin: str = "the pack") -> dict:
    """An adapter pack (written by redux_edge/train/adapters.py): its header, and per target weight the
    dequantized LoRA factors ``down`` [rank, in] and ``up`` [out, rank] (scaling included), and the head."""
    import zlib

    if not blob.startswith(_ADAPTER_MAGIC):
        raise ValueError(f"{origin} is not a redux-edge adapter pack")
    length = int.from_bytes(blob[8:12], "little")
    header = json.loads(zlib.decompress(blob[12 : 12 + length]))
    offset, bits = 12 + length, header["bits"]

    def take(count: int, dtype: type) -> np.ndarray:
        nonlocal offset
        size = count * np.dtype(dtype).itemsize
        array = np.frombuffer(blob, dtype, count, offset)
        offset += size
        return array

    def factor(shape: list[int]) -> np.ndarray:
        nonlocal offset
        count = shape[0] * shape[1]
        if bits == 32:
            codes = take(count, np.float32)
        else:
            raw = np.frombuffer(blob, np.uint8, (count * bits + 7) // 8, offset)
            offset += raw.size
            planes = np.unpackbits(raw)[: count * bits].reshape(count, bits).astype(np.int64)
            unsigned = planes @ (1 << np.arange(bits - 1, -1, -1))
            codes = unsigned * 2 - 1 if bits == 1 else unsigned - 2 ** (bits - 1)
        scales = take(shape[0], np.float16).astype(np.float32)
        return (codes.reshape(shape) * scales[:, None]).astype(np.float32)

    factors = {
        name: {part: factor(shapes[part]) for part in ("down", "up")}
        for name, shapes in header["factors"].items()
    }
    classes, hidden = header["head"]
    head = take(classes * hidden, np.float16).reshape(classes, hidden).astype(np.float32)
    bias = take(classes, np.float16).astype(np.float32)
    if offset != len(blob):
        raise ValueError(f"{origin} is {len(blob)} bytes, its header describes {offset}")
    return {"header": header, "factors": factors, "head_weight": head, "head_bias": bias}


def adapter_initializers(pack: dict, names: dict) -> dict[str, np.ndarray]:
    """The graph initializers (``names`` from the manifest's adapters entry) holding ``pack``: factors
    transposed to the graph's [in, rank] and [rank, out], the head as [hidden, classes]."""
    values = {}
    for weight, parts in names["factors"].items():
        values[parts["down"]] = np.ascontiguousarray(pack["factors"][weight]["down"].T)
        values[parts["up"]] = np.ascontiguousarray(pack["factors"][weight]["up"].T)
    values[names["head_weight"]] = np.ascontiguousarray(pack["head_weight"].T)
    values[names["head_bias"]] = pack["head_bias"]
    return values


def _file_name(name: str) -> str:
    """A file name from the manifest, which must not lead out of the bundle's folder."""
    if Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"the manifest names a packed-weights file outside its folder: {name!r}")
    return name


class EngineBuildError(RuntimeError):
    """trtexec failed, or 2:4 sparsity was asked for and TensorRT picked no sparse tactic."""


_SPARSE_ELIGIBLE = re.compile(r"\(Sparsity\) Layers eligible for sparse math:(.*)$")
_SPARSE_PICKED = re.compile(r"\(Sparsity\) TRT inference plan picks sparse implementation for layers:(.*)$")


def parse_trtexec_log(text: str) -> dict:
    """Which layers TensorRT found eligible for 2:4 sparse math and which took sparse tactics."""

    def layers(pattern: re.Pattern) -> list[str]:
        found: list[str] = []
        for line in text.splitlines():
            if match := pattern.search(line):
                found.extend(name.strip() for name in match.group(1).split(",") if name.strip())
        return found

    return {"sparse_eligible": layers(_SPARSE_ELIGIBLE), "sparse_picked": layers(_SPARSE_PICKED)}


def check_sparse_tactics(report: dict, sparsity_requested: bool) -> None:
    if sparsity_requested and not report["sparse_picked"]:
        eligible = ", ".join(report["sparse_eligible"]) or "none"
        raise EngineBuildError(
            "2:4 sparsity was requested but TensorRT picked no sparse tactic "
            f"(layers eligible: {eligible}); the engine would run dense"
        )


def build_engine(bundle_dir: Path, trtexec: str | None = None) -> dict:
    """Build the bundle's TensorRT engine with trtexec, keep the log, and check the sparse tactics."""
    trtexec = trtexec or _trtexec()
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    plan = manifest["backend"]["engine_build"]
    engines = bundle_dir / plan["engine_dir"]
    engines.mkdir(exist_ok=True)
    # trtexec reads the ONNX file itself, so packed 2:4 weights go back into their dense file first.
    expand_packed(bundle_dir, manifest.get("storage", {}))
    engine = engines / f"{plan['engine_name']}-trt{_tensorrt_version(trtexec)}.plan"
    argv = [trtexec if arg == "trtexec" else arg.replace("{engine}", str(engine)) for arg in plan["argv"]]
    completed = subprocess.run(argv, cwd=bundle_dir, capture_output=True, text=True, check=False)
    engine.with_suffix(".log").write_text(completed.stdout + completed.stderr)
    if completed.returncode != 0:
        raise EngineBuildError(f"trtexec failed ({completed.returncode}); log: {engine.with_suffix('.log')}")
    report = parse_trtexec_log(completed.stdout + completed.stderr)
    check_sparse_tactics(report, plan["sparsity"])
    return {"engine": str(engine), **report}


def _tensorrt_version(trtexec: str) -> str:
    # trtexec's banner reads "&&&& RUNNING TensorRT.trtexec [TensorRT v100300]"
    banner = subprocess.run([trtexec, "--help"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"TensorRT v(\d+)", banner)
    return match.group(1) if match else "unknown"


def check_inputs(specs: list[dict], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` cast to the recorded dtypes; InputError when a name, rank, size or dtype does not fit."""
    expected = [spec["name"] for spec in specs]
    if sorted(feeds) != sorted(expected):
        raise InputError(f"inputs are {sorted(feeds)}, the model takes {expected}")
    checked = {}
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
        dtype = _DTYPES[spec["dtype"]]
        if not np.can_cast(array.dtype, dtype, casting="same_kind"):
            raise InputError(f"input '{spec['name']}' has dtype {array.dtype}, expected {np.dtype(dtype)}")
        checked[spec["name"]] = array.astype(dtype, copy=False)
    return checked


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a redux-edge bundle")
    parser.add_argument("--bundle", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--inputs", type=Path, help=".npz with one array per input (default: the sample)")
    parser.add_argument("--outputs", type=Path, help="write outputs to this .npz")
    parser.add_argument(
        "--check", action="store_true", help="health check: sample inputs give sample outputs"
    )
    parser.add_argument("--bench", action="store_true")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--duration", type=float, help="bench: run for this many seconds instead")
    parser.add_argument("--layers", type=int, default=0, help="bench: also profile layers over N runs")
    parser.add_argument("--latencies", action="store_true", help="bench: print every run's latency")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--adapter", help="load this task's adapter pack (bundles with swappable adapters)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--build-engine", action="store_true", help="TensorRT: build this device's engine")
    parser.add_argument(
        "--expand", action="store_true", help="write the dense weights of packed 2:4 models for other tools"
    )
    args = parser.parse_args(argv)
    if args.expand:
        manifest = json.loads((args.bundle / "manifest.json").read_text())
        for path in expand_packed(args.bundle, manifest.get("storage", {})):
            print(path)
        return 0
    if args.build_engine:
        try:
            print(json.dumps(build_engine(args.bundle)))
        except EngineBuildError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    try:
        session = BundleSession(args.bundle, args.threads, args.adapter)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except EngineBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    feeds, expected = session.sample()
    if args.inputs:
        with np.load(args.inputs, allow_pickle=False) as archive:
            feeds = {k: archive[k] for k in archive.files}
    try:
        if args.bench:
            started = time.time()
            with Tegrastats() as tegrastats:
                report = session.benchmark(feeds, args.warmup, args.iterations, args.duration)
            report |= {"started": started, "finished": time.time(), "tegrastats": tegrastats.summary}
            if args.layers:
                report["layers"] = session.layer_times(feeds, args.layers, args.threads)
            if not args.latencies:
                del report["latencies_ms"]
            if args.json:
                print(json.dumps(report))
            else:
                print("  ".join(f"{k}={v:.4g}" for k, v in report.items() if isinstance(v, float | int)))
            return 0
        outputs = session.run(feeds)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.outputs:
        np.savez(args.outputs, **dict(zip(session.output_names, outputs, strict=True)))
    if args.check:
        atol = session.manifest["verify"]["tolerance"]["atol"]
        # A mac-prune bundle without a seed draws a new mask every run: only its shapes can be checked.
        random = set(session.manifest.get("protection", {}).get("random_outputs", []))
        pairs = [
            (got, want)
            for name, got, want in zip(session.output_names, outputs, expected, strict=True)
            if name not in random
        ]
        shapes_match = all(got.shape == want.shape for got, want in zip(outputs, expected, strict=True))
        healthy = shapes_match and all(
            float(np.abs(got - want).max()) <= atol * max(1.0, float(np.abs(want).max()))
            for got, want in pairs
        )
        worst = max((float(np.abs(got - want).max()) for got, want in pairs), default=None)
        print(json.dumps({"healthy": healthy, "max_abs": worst, "shapes_only": sorted(random)}))
        return 0 if healthy else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
