"""The one rule by which outputs match a reference: at compile time (model.onnx and the artifact against
the reference) and on the device (the health check against the recorded sample).

Per output: the largest absolute difference, and the smallest cosine similarity over the batch (each
sample's output flattened), which catches a single wrong sample that a mean would hide. Outputs match
when every output has cosine >= ``min_cosine`` and max-abs <= ``atol`` scaled by the reference's own
magnitude (so logits in the hundreds and unit embeddings meet the same relative bar).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Tolerance", "compare", "mismatch"]


@dataclass(frozen=True)
class Tolerance:
    min_cosine: float = 0.9999
    atol: float = 1e-3

    def to_json(self) -> dict:
        return {"min_cosine": self.min_cosine, "atol": self.atol}

    @classmethod
    def from_json(cls, recorded: dict) -> Tolerance:
        return cls(float(recorded["min_cosine"]), float(recorded["atol"]))

    @classmethod
    def for_precision(cls, precision: str) -> Tolerance:
        """fp32 artifacts must agree closely; half-precision ones carry ~3 significant digits. INT8
        artifacts are held to ONNX Runtime running the same quantized model: integer kernels and the
        reference's dequantized arithmetic round differently, and a rounding flip upstream moves a value
        by one quantization step downstream, so they agree to the size of that noise, not to fp32."""
        if precision == "fp32":
            return cls()
        if precision.startswith("int8"):
            return cls(min_cosine=0.98, atol=0.25)
        return cls(min_cosine=0.999, atol=5e-2)


def compare(reference: list[np.ndarray], actual: list[np.ndarray], names: list[str]) -> dict:
    """Per output: max abs difference, min cosine and the reference's magnitude, over finite values
    (JSON numbers, never NaN), with the count of elements and of non-finite values on either side, which
    ``mismatch`` refuses: NaN would otherwise compare as no difference and cosine 1."""
    report: dict[str, dict] = {}
    for name, ref, got in zip(names, reference, actual, strict=True):
        ref64 = np.asarray(ref, dtype=np.float64)
        got64 = np.asarray(got, dtype=np.float64)
        if ref64.shape != got64.shape:
            report[name] = {"shape_mismatch": [list(ref64.shape), list(got64.shape)]}
            continue
        finite = np.isfinite(ref64) & np.isfinite(got64)
        ref64, got64 = np.where(finite, ref64, 0.0), np.where(finite, got64, 0.0)
        rows_ref = ref64.reshape(ref64.shape[0], -1) if ref64.ndim else ref64.reshape(1, 1)
        rows_got = got64.reshape(rows_ref.shape)
        norms = np.linalg.norm(rows_ref, axis=1) * np.linalg.norm(rows_got, axis=1)
        dots = (rows_ref * rows_got).sum(axis=1)
        # Two all-zero rows are identical; define their cosine as 1 rather than 0/0.
        cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 1.0)
        report[name] = {
            "max_abs": float(np.abs(ref64 - got64).max(initial=0.0)),
            "min_cosine": float(cosine.min(initial=1.0)),
            "ref_max_abs": float(np.abs(ref64).max(initial=0.0)),
            "elements": int(ref64.size),
            "nonfinite_reference": int((~np.isfinite(np.asarray(ref, dtype=np.float64))).sum()),
            "nonfinite_actual": int((~np.isfinite(np.asarray(got, dtype=np.float64))).sum()),
        }
    return report


def mismatch(report: dict, tolerance: Tolerance) -> str:
    """Why the outputs of ``report`` do not match within ``tolerance``; empty when they do. An output with
    no elements, or with NaN/inf on either side, matches nothing: there is no number to hold it to."""
    for name, numbers in report.items():
        if "shape_mismatch" in numbers:
            expected, got = numbers["shape_mismatch"]
            return f"output '{name}' has shape {got}, expected {expected}"
        if numbers.get("elements", 1) == 0:
            return f"output '{name}' has no elements on the sample inputs, so nothing can be compared"
        if numbers.get("nonfinite_reference"):
            return (
                f"the reference's output '{name}' holds {numbers['nonfinite_reference']} NaN/inf values on "
                "the sample inputs, so there is nothing to verify against"
            )
        if numbers.get("nonfinite_actual"):
            count = numbers["nonfinite_actual"]
            return f"output '{name}' holds {count} NaN/inf values where the reference has none"
        bound = tolerance.atol * max(1.0, numbers["ref_max_abs"])
        if numbers["min_cosine"] < tolerance.min_cosine or numbers["max_abs"] > bound:
            return (
                f"output '{name}' diverges from the reference (max abs {numbers['max_abs']:.3g} > "
                f"{bound:.3g} or cosine {numbers['min_cosine']:.6f} < {tolerance.min_cosine})"
            )
    return ""
