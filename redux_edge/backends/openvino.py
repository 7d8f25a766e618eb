"""OpenVINO (Intel's inference runtime) for x86-64 and ARM CPUs.

Lowering follows OpenVINO's documented model-preparation flow: ``openvino.convert_model`` reads the ONNX
graph through OpenVINO's ONNX frontend, and ``openvino.save_model`` writes the OpenVINO IR (``.xml``
topology + ``.bin`` weights). Weights are stored in fp32 unless the precision is fp16 (``save_model``
compresses to fp16 by default; we make it an explicit choice). The inference precision is a recorded
hint: OpenVINO's CPU plugin otherwise picks bf16 on CPUs that have it, which changes numerics silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from redux_edge.backends.base import CpuBackend
from redux_edge.errors import UserError, first_line
from redux_edge.targets import Target

__all__ = ["OpenVinoBackend"]


# redux-edge precision name -> OpenVINO's INFERENCE_PRECISION_HINT
_INFERENCE_PRECISION = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}


class OpenVinoBackend(CpuBackend):
    name = "openvino"
    precisions = tuple(_INFERENCE_PRECISION)
    # The ONNX frontend reads QDQ (as FakeQuantize) and dynamic INT8 graphs; the CPU plugin's
    # low-precision transformations run them on integer kernels.
    quantized: ClassVar[dict[str, str]] = {
        "int8": "integer",
        "int8-dynamic": "integer",
        "fp16": "runtime",
        "bf16": "runtime",
    }
    # The CPU plugin computes bf16 and f16 only where the CPU has them, f32 otherwise (OpenVINO's
    # precision-control guide).
    precision_features: ClassVar[dict[str, dict[str, tuple[str, ...]]]] = {
        "bf16": {"x86_64": ("avx512_bf16", "amx_bf16")},
        "fp16": {"x86_64": ("avx512_fp16", "amx_fp16"), "aarch64": ("fullfp16",)},
    }
    device_runtime = "openvino"
    device_modules: ClassVar[dict[str, str]] = {"openvino": "openvino"}

    def can_build_here(self) -> tuple[bool, str]:
        try:
            import openvino
        except ImportError:
            return False, "openvino is not installed (pip install openvino==2026.4.0)"
        return True, f"openvino {openvino.get_version()}"

    def lower(self, model_file: Path, target: Target, artifact_dir: Path, options: dict) -> dict:
        import openvino as ov

        precision = options["precision"]
        artifact_dir.mkdir(parents=True, exist_ok=True)
        try:
            converted = ov.convert_model(str(model_file))
        except Exception as exc:  # OpenVINO's frontend raises its own OpConversionFailure and RuntimeError
            raise UserError(
                f"OpenVINO cannot convert this model: {first_line(exc)}", "--debug for details"
            ) from exc
        ov.save_model(converted, str(artifact_dir / "model.xml"), compress_to_fp16=precision == "fp16")
        return {
            "name": self.name,
            "version": ov.get_version(),
            "artifact": "artifact/model.xml",
            "precision": precision,
            "session": {
                "device": "CPU",
                "inference_precision": _INFERENCE_PRECISION[precision],
                "threads": options.get("threads") or 0,
            },
        }

    def quantized_operators(self, stage: Path, entry: dict) -> dict[str, int]:
        """The compiled model's operators by the precision the CPU plugin runs them in (i8, u8, bf16,
        f16), as ``runtimePrecision`` reports it."""
        import openvino as ov

        compiled = ov.Core().compile_model(
            str(stage / entry["artifact"]),
            "CPU",
            {"INFERENCE_PRECISION_HINT": entry["session"]["inference_precision"]},
        )
        counts: dict[str, int] = {}
        for op in compiled.get_runtime_model().get_ordered_ops():
            precision = op.get_rt_info()["runtimePrecision"].astype(str)
            if precision in ("i8", "u8", "bf16", "f16"):
                counts[precision] = counts.get(precision, 0) + 1
        return counts
