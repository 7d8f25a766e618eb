"""TensorRT bundles on the device: the engine built there by ``trtexec`` (its log kept, 2:4 tactics
checked) and run by ``trtexec`` too, so that a Jetson needs JetPack alone."""

from __future__ import annotations

import json
import re
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .packed import expand_packed
from .session import EngineBuildError, bench_report, ranked

__all__ = [
    "EngineBuildError",
    "TrtexecEngine",
    "build_engine",
    "check_sparse_tactics",
    "open_executor",
    "parse_trtexec_log",
]


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


def build_engine(bundle_dir: Path, trtexec: str | None = None, board: str | None = None) -> dict:
    """Build the bundle's TensorRT engine with trtexec, keep the log, and check the sparse tactics. A
    family bundle (``--target jetson``) builds with the options resolved for ``board``, the device's own
    target (sparse tactics and DLA only where it has them), and reports them."""
    trtexec = trtexec or _trtexec()
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    plan = manifest["backend"]["engine_build"]
    boards = plan.get("members") or {}
    if boards and board not in boards:
        raise EngineBuildError(
            f"this bundle is for {', '.join(boards)}; give the device's own with --board (got {board!r})"
        )
    options = boards[board] if boards else plan
    engines = bundle_dir / plan["engine_dir"]
    engines.mkdir(exist_ok=True)
    # trtexec reads the ONNX file itself, so packed 2:4 weights go back into their dense file first; the
    # engine holds the weights after that, so the expanded file does not stay on the device's storage.
    engine = engines / f"{plan['engine_name']}-trt{_tensorrt_version(trtexec)}.plan"
    argv = [trtexec if arg == "trtexec" else arg.replace("{engine}", str(engine)) for arg in options["argv"]]
    expanded = expand_packed(bundle_dir, manifest.get("storage", {}))
    try:
        completed = subprocess.run(argv, cwd=bundle_dir, capture_output=True, text=True, check=False)
    finally:
        for path in expanded:
            path.unlink(missing_ok=True)
    engine.with_suffix(".log").write_text(completed.stdout + completed.stderr)
    if completed.returncode != 0:
        raise EngineBuildError(f"trtexec failed ({completed.returncode}); log: {engine.with_suffix('.log')}")
    report = parse_trtexec_log(completed.stdout + completed.stderr)
    check_sparse_tactics(report, options["sparsity"])
    resolved = {"board": board, "sparsity": options["sparsity"], "dla_core": options["dla_core"]}
    return {"engine": str(engine), "resolved": resolved, **report}


def _tensorrt_version(trtexec: str) -> str:
    # trtexec's banner reads "&&&& RUNNING TensorRT.trtexec [TensorRT v100300]"
    banner = subprocess.run([trtexec, "--help"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"TensorRT v(\d+)", banner)
    return match.group(1) if match else "unknown"


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
        return bench_report(seconds, feeds, resource.RUSAGE_CHILDREN)

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
        return ranked("trtexec profiler (average per layer)", layers, profile[0]["count"])


def open_executor(
    bundle_dir: Path,
    backend: dict,
    threads: int,
    output_names: list[str],
    storage: dict,
    overrides: dict | None,
) -> TrtexecEngine:
    return TrtexecEngine(bundle_dir, backend, output_names)


def _trtexec() -> str:
    # JetPack installs trtexec under /usr/src/tensorrt/bin, outside PATH.
    found = shutil.which("trtexec") or shutil.which("trtexec", path="/usr/src/tensorrt/bin")
    if found is None:
        raise EngineBuildError("trtexec is not installed here (it comes with TensorRT / JetPack)")
    return found
