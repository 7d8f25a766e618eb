"""ONNX Runtime (CPU execution provider), the embedded default backend.

Lowering follows ONNX Runtime's documented offline-optimisation flow: first the transformer fusions of
``onnxscript.rewriter.ort_fusions`` (the fusion set written for dynamo-exported graphs: scaled dot-product
attention -> ``MultiHeadAttention``, skip + LayerNorm -> ``SkipLayerNormalization``, bias + GELU ->
``BiasGelu``), then ONNX Runtime's own graph optimiser at the *extended* level, saved with
``SessionOptions.optimized_model_filepath``. Extended-level graphs are portable across CPUs; the
layout-specific *all* level is applied when the artifact is loaded on the device. Thread settings are
recorded in the manifest and reused by the runner.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import ClassVar

import onnx_ir as ir
import onnxruntime as ort
from onnxscript.rewriter import ort_fusions

from redux_edge.backends.base import CpuBackend, quantized_onnx_operators
from redux_edge.errors import UserError, first_line
from redux_edge.files import human_bytes
from redux_edge.targets import Target

__all__ = ["OnnxRuntimeBackend"]


_PROVIDERS = ["CPUExecutionProvider"]
# On a Jetson, ONNX Runtime (NVIDIA's Jetson builds) runs through TensorRT, then CUDA, then the CPU.
_GPU_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", *_PROVIDERS]


def _refuse_a_full_disk(artifact_dir: Path, model_file: Path, exc: Exception) -> None:
    """ONNX Runtime reports a write that ran out of space as its own error ("Protobuf serialization
    failed") or as an OSError: either way it is the disk, which is named. Saving takes room for the model
    and its optimised copy (measured: a 0.8 MiB model failed with 1.2 MiB free)."""
    free = shutil.disk_usage(artifact_dir).free
    if isinstance(exc, OSError) or free < 2 * model_file.stat().st_size:
        raise UserError(
            f"cannot write the artifact under {artifact_dir.parent.parent}: its file system has "
            f"{human_bytes(free)} free, "
            f"and the model alone is {human_bytes(model_file.stat().st_size)} ({first_line(exc)})",
            "free disk space there or choose another -o",
        ) from exc


class OnnxRuntimeBackend(CpuBackend):
    name = "onnxruntime"
    # Its CPU kernels for QDQ (fused to QLinear*/MatMulIntegerToFloat) and dynamic INT8 (MLAS); it has
    # no bf16 kernels on CPUs, and fp16 ones only on ARM.
    quantized: ClassVar[dict[str, str]] = {"int8": "integer", "int8-dynamic": "integer"}
    swaps_initializers = True
    runs_random_ops = True
    device_runtime = "onnxruntime"
    device_modules: ClassVar[dict[str, str]] = {"onnxruntime": "onnxruntime"}

    def can_build_here(self) -> tuple[bool, str]:
        return True, f"onnxruntime {ort.__version__}"

    def lower(self, model_file: Path, target: Target, artifact_dir: Path, options: dict) -> dict:
        artifact_dir.mkdir(parents=True, exist_ok=True)
        fused, fusion_counts = ort_fusions.optimize_for_ort(ir.load(str(model_file)))
        fusions = {name: count for name, count in fusion_counts.items() if count}
        skipped: dict = {}
        try:
            _save_optimized(fused, artifact_dir)
        except Exception as exc:  # ORT raises its own pybind types (Fail, NotImplemented, InvalidGraph)
            # A fusion rule that misreads a graph (onnxscript's Gemm rewrite on GPT-2's Conv1D, for one)
            # must not cost the model: the graph as given, with ONNX Runtime's own optimiser only.
            fusions, skipped = {}, {"fusions_skipped": f"the fused graph does not load: {first_line(exc)}"}
            try:
                _save_optimized(ir.load(str(model_file)), artifact_dir)
            except Exception as plain_exc:  # as above
                _refuse_a_full_disk(artifact_dir, model_file, plain_exc)
                raise UserError(
                    f"ONNX Runtime cannot run this model: {first_line(plain_exc)}", "--debug for details"
                ) from plain_exc
        return {
            "name": self.name,
            "version": ort.__version__,
            "artifact": "artifact/model.onnx",
            "precision": "fp32",
            "fusions": fusions,
            **skipped,
            "session": {
                "providers": _GPU_PROVIDERS if target.gpu_compute_capability else _PROVIDERS,
                "save_optimization_level": "ORT_ENABLE_EXTENDED",
                "load_optimization_level": "ORT_ENABLE_ALL",
                # 0 lets ONNX Runtime use one thread per physical core of the device it runs on.
                "threads": options.get("threads") or 0,
                "inter_op_num_threads": 1,
            },
        }

    def quantized_operators(self, stage: Path, entry: dict) -> dict[str, int]:
        return quantized_onnx_operators(stage / entry["artifact"])


def _save_optimized(model: ir.Model, artifact_dir: Path) -> None:
    """``artifact_dir/model.onnx``: ``model`` saved by ONNX Runtime's offline optimiser (portable level)."""
    unoptimized = artifact_dir / "fused.onnx"
    ir.save(model, str(unoptimized))
    session = ort.SessionOptions()
    session.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    session.optimized_model_filepath = str(artifact_dir / "model.onnx")
    try:
        ort.InferenceSession(str(unoptimized), session, providers=_PROVIDERS)
    finally:
        unoptimized.unlink()
