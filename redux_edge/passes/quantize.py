"""quantize: INT8 (static QDQ or dynamic), FP16 or BF16, chosen for the target, with the field's tools.

INT8 is ONNX Runtime's post-training quantization (``onnxruntime.quantization``; the affine scheme of
Jacob et al., 2018). ``int8`` is static, in the QDQ format: per-channel symmetric INT8 weights and
activation ranges calibrated on real data (``method``: min-max, percentile or entropy), on the card's
task data or the user's ``--calibration-data``. ``int8-dynamic`` quantizes the weights offline and each
activation when it is computed (ONNX Runtime's advice for transformers on CPUs). Only the inputs of
MatMul/Gemm/Conv with a constant weight are quantized, where the integer kernels are; LayerNorm,
Softmax, GELU and the residual sums stay fp32, since quantizing them costs accuracy and buys no kernel.
Static INT8 also keeps each transformer layer's feed-forward down projection in fp32
(``ffn_down_in_float``): its input carries the outliers that one per-tensor INT8 range cannot hold
(Bondarenko et al., 2021, "Understanding and Overcoming the Challenges of Efficient Transformer
Quantization"); on MiniLM-L6 quantizing them too takes the embedding cosine to fp32 from 0.990 to 0.927.

The data types follow the target, as ONNX Runtime's quantization guide and TensorRT's rules for explicit
quantization say (``scheme``): x86 with VNNI multiplies u8 activations by s8 weights into 32-bit sums;
x86 without it adds u8 x s8 pairs into a saturating 16-bit sum (VPMADDUBSW), so weights get 7 bits
(``reduce_range``); arm64 with dot-product instructions multiplies s8 by s8 (SDOT), older arm64 is
faster at u8 x s8; TensorRT takes symmetric signed INT8 only, weights as float constants behind their own
Q/DQ pair and biases in float, built with ``--int8``.

FP16 and BF16 leave the graph fp32: the backend computes in that precision (OpenVINO's inference
precision hint, TensorRT's builder flag) where the hardware has it; which backend takes which precision,
and what CPU features it needs, is backend data, so the target's next backend serves when its first
cannot.

Checks: the model before the pass is verified against the exact reference; the artifact against ONNX
Runtime on the quantized model (``Rebase``); quality retention, float vs quantized, is measured on the
task data, and ``min_quality`` fails the compile below it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir

from redux_edge.analysis.quality import quality_line, quality_report, retention
from redux_edge.errors import UserError, first_line
from redux_edge.frontend.source import check_feeds
from redux_edge.ir.batch import Batches
from redux_edge.ir.blocks import find_structure
from redux_edge.ir.surgery import copy_model
from redux_edge.ir.weights import find_weights
from redux_edge.passes.compression import speed_against
from redux_edge.passes.contract import (
    CompileContext,
    Flag,
    PassOutcome,
    Rebase,
    RecipePass,
    ReferenceChange,
    Section,
    gathered,
    parameter,
)

if TYPE_CHECKING:
    from redux_edge.backends.base import Backend
    from redux_edge.targets import Target

__all__ = ["PRECISIONS", "QuantizationSection", "QuantizePass", "Scheme", "scheme_for"]

logger = logging.getLogger(__name__)

PRECISIONS = ("int8", "int8-dynamic", "fp16", "bf16")
METHODS = ("minmax", "percentile", "entropy")
_CALIBRATION_BATCH = 16
_OTHERS_IN_FLOAT = (
    "every operator but MatMul/Gemm/Conv with a constant weight (LayerNorm, Softmax, GELU, residual "
    "sums): quantizing them costs accuracy and buys no integer kernel"
)


@dataclasses.dataclass(frozen=True)
class Scheme:
    """The INT8 data types for a target and why: activations u8 or s8 (weights are always s8)."""

    activations: str
    why: str
    reduce_range: bool = False
    # TensorRT's explicit quantization: symmetric activations, float weights behind a Q/DQ pair.
    symmetric: bool = False

    def to_json(self) -> dict:
        return {
            "activations": self.activations,
            "weights": "s8",
            "reduce_range": self.reduce_range,
            "symmetric_activations": self.symmetric,
            "why": self.why,
        }


def scheme_for(target: Target, backend: Backend, dla_core: int | None = None) -> Scheme:
    """The INT8 form the target's hardware runs best, by ONNX Runtime's guide and TensorRT's rules."""
    if backend.symmetric_int8:
        dla = (
            f"; on DLA core {dla_core}, layers the DLA cannot run in INT8 fall back to the GPU"
            if dla_core is not None
            else ""
        )
        return Scheme(
            "s8",
            "TensorRT's explicit quantization takes symmetric signed INT8 (zero point 0), float weights "
            "behind their own Q/DQ pair and float biases" + dla,
            symmetric=True,
        )
    if target.arch == "x86_64":
        if any(target.has(feature) for feature in ("avx512vnni", "avxvnni", "amx_int8")):
            return Scheme("u8", "VNNI multiplies u8 activations by s8 weights into 32-bit sums (VPDPBUSD)")
        return Scheme(
            "u8",
            "without VNNI, u8 x s8 kernels add pairs into a saturating 16-bit sum (VPMADDUBSW): 7-bit "
            "weights keep it in range (ONNX Runtime's quantization guide)",
            reduce_range=True,
        )
    if target.has("dotprod"):
        return Scheme("s8", "the dot-product instructions (SDOT) multiply s8 by s8")
    return Scheme("u8", "without dot-product instructions, u8 x s8 kernels are the faster ones on ARM64")


@dataclasses.dataclass
class QuantizePass(RecipePass):
    name = "quantize"
    summary = "INT8 (static QDQ or dynamic), FP16 or BF16 for the target's hardware, quality-gated"
    flags = (
        Flag(
            "--quantize",
            "Quantize: int8 (static, calibrated), int8-dynamic, fp16 or bf16 (quantize pass).",
            "precision",
            metavar="PRECISION",
        ),
        Flag(
            "--calibration-method",
            "Static INT8: how activation ranges are calibrated: minmax, percentile or entropy [minmax].",
            "method",
            enables=False,
            alone=("--calibration-method needs --quantize int8", "add --quantize int8"),
        ),
        Flag(
            "--min-quality",
            "Fail the compile when quantized quality retention is below this (0-1): embedding cosine "
            "to fp32 for encoders, accuracy ratio for classifiers.",
            "min_quality",
            float,
            enables=False,
            alone=("--min-quality needs --quantize", "add --quantize int8 (or int8-dynamic, fp16, bf16)"),
        ),
    )
    compares_with_dense = True
    rebases = True
    once_per_recipe = True

    precision: str = parameter("int8", "int8 (static, calibrated QDQ), int8-dynamic, fp16 or bf16")
    method: str = parameter("minmax", "int8: activation range calibration: minmax, percentile or entropy")
    samples: int = parameter(128, "int8: calibration samples", minimum=1)
    per_channel: bool = parameter(True, "int8: one weight scale per output channel")
    ffn_down_in_float: bool = parameter(
        True, "int8: keep transformer feed-forward down projections in fp32 (activation outliers)"
    )
    exclude: list[str] = parameter([], "regular expressions: weights whose names match stay in fp32")
    min_quality: float = parameter(0.0, "fail below this quality retention (0-1) of quantized vs fp32")
    # Gathered by prepare: how the backend computes the precision, the target's INT8 form, calibration.
    computes: str = gathered("")
    scheme: Scheme | None = gathered()
    calibration: dict[str, np.ndarray] | None = gathered()
    calibrated_on: str = gathered("")

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UserError(
                f"quantize: unknown precision '{self.precision}'", f"choose one of: {', '.join(PRECISIONS)}"
            )
        if self.method not in METHODS:
            raise UserError(
                f"quantize: unknown calibration method '{self.method}'",
                f"choose one of: {', '.join(METHODS)}",
            )
        if not 0.0 <= self.min_quality <= 1.0:
            raise UserError(
                f"quantize: min_quality {self.min_quality} is not a retention", "give a number in 0-1"
            )
        if self.samples < 1:
            raise UserError(f"quantize: samples {self.samples} < 1", "calibrate on at least one sample")
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise UserError(f"quantize: bad pattern {pattern!r}: {exc}", "give a regex") from exc

    def gate(self) -> str | None:
        return self.precision

    def refuses(self, backend: Backend, target: Target) -> str:
        if self.precision not in backend.quantized:
            return f"the {backend.name} backend cannot run --quantize {self.precision}"
        return backend.precision_refusal(self.precision, target)

    def check(self, context: CompileContext) -> None:
        position = context.passes.index(self)
        if later := [p.name for p in context.passes[position + 1 :] if not p.exact]:
            raise UserError(
                f"quantize must be the last pass that changes numerics, and {', '.join(later)} follow it",
                "move quantize to the end of the recipe",
            )

    def backend_options(self, context: CompileContext) -> dict[str, Any]:
        """The artifact is held to the quantized precision; one the backend computes itself is its own."""
        runtime = context.backend.quantized[self.precision] == "runtime"
        return {"quantized": self.precision} | ({"precision": self.precision} if runtime else {})

    def prepare(self, context: CompileContext) -> dict[str, Any]:
        """How the backend computes it; the target's INT8 form; static INT8: real calibration inputs,
        checked against the model."""
        found: dict[str, Any] = {"computes": context.backend.quantized[self.precision]}
        if self.precision.startswith("int8"):
            found["scheme"] = scheme_for(context.target, context.backend, context.options.get("dla_core"))
        if self.precision != "int8":
            return found
        calibration = context.source.calibration(self.samples)
        if calibration.synthetic:
            raise UserError(
                "static INT8 needs real calibration data, and this model has only random inputs",
                "give --calibration-data (the model's inputs as .npz, texts or images), or --quantize "
                "int8-dynamic",
            )
        check_feeds(context.source.model, calibration.feeds)
        return found | {"calibration": calibration.feeds, "calibrated_on": calibration.described}

    def call(self, model: ir.Model) -> Quantized:
        if self.computes == "runtime":
            return Quantized(model, False, self.precision, self.computes, min_quality=self.min_quality)
        assert self.scheme is not None, "prepare() chose the scheme"
        before = copy_model(model)
        chosen, in_float = self._choose(model)
        if not chosen:
            raise UserError(
                "quantize: no MatMul, Gemm or Conv with a constant weight is left to quantize"
                + _why_none(model, in_float),
                "use --quantize fp16/bf16 where the backend has them, or compile without --quantize",
            )
        if model.opset_imports.get("", 0) < _PER_AXIS_OPSET:
            # Per-channel QuantizeLinear/DequantizeLinear take an axis from opset 13: ONNX Runtime's
            # quantizer writes it whatever the opset, which made an opset-11 file invalid. ONNX's own
            # converter brings it up (onnxscript's takes 18 and newer only).
            upgraded = ir.from_proto(
                onnx.version_converter.convert_version(ir.to_proto(model), _PER_AXIS_OPSET)
            )
            model.graph = upgraded.graph  # the graph holds the opset imports
        _name_nodes(model)
        with tempfile.TemporaryDirectory(prefix="redux-edge-quantize-") as scratch:
            given, written = Path(scratch) / "float.onnx", Path(scratch) / "quantized.onnx"
            ir.save(model, str(given))
            try:
                self._quantize(given, written, [weight.node.name for weight in chosen], Batches.of(model))
            except Exception as exc:  # onnxruntime.quantization raises bare errors from its calibrators
                raise UserError(
                    f"quantize: ONNX Runtime's quantizer failed: {first_line(exc)}",
                    "the calibration data must fit the model's inputs; --debug shows more",
                ) from exc
            quantized = ir.load(str(written))
            quantized_model = ir.from_proto(ir.to_proto(quantized))  # detached from the scratch folder
        # An in-place pass returns the model it was given: it takes the quantized graph.
        model.graph = quantized_model.graph
        logger.info("quantize %s: %d weights, %d in float", self.precision, len(chosen), len(in_float))
        static = self.precision == "int8"
        return Quantized(
            model,
            True,
            self.precision,
            self.computes,
            scheme=self.scheme,
            quantized=[weight.name for weight in chosen],
            in_float=in_float,
            before=before,
            calibrated_on=self.calibrated_on if static else "",
            method=self.method if static else None,
            min_quality=self.min_quality,
        )

    def _choose(self, model: ir.Model) -> tuple[list, list[dict]]:
        """The weights to quantize, and each weight kept in float with the reason."""

        down = set()
        if self.precision == "int8" and self.ffn_down_in_float:
            down = {id(block.down.matmul) for block in find_structure(model).feed_forward}
        chosen, in_float = [], []
        in_float += [{"weight": name, "why": _IN_BRANCH} for name in _branch_weights(model.graph)]
        for weight in find_weights(model):
            if id(weight.node) in down:
                why = "feed-forward down projection: its input's outliers do not fit one INT8 range"
            elif any(re.search(pattern, weight.name) for pattern in self.exclude):
                why = "matches an exclude pattern"
            else:
                chosen.append(weight)
                continue
            in_float.append({"weight": weight.name, "why": why})
        return chosen, in_float

    def _quantize(self, given: Path, written: Path, nodes: list[str], axes: Batches) -> None:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

        assert self.scheme is not None
        if self.precision == "int8-dynamic":
            quantize_dynamic(
                given,
                written,
                per_channel=self.per_channel,
                reduce_range=self.scheme.reduce_range,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=nodes,
                extra_options={"MatMulConstBOnly": True},
            )
            return
        assert self.calibration is not None, "prepare() read the calibration data"
        quantize_static(
            given,
            written,
            _Batches(self.calibration, axes),
            quant_format=QuantFormat.QDQ,
            per_channel=self.per_channel,
            reduce_range=self.scheme.reduce_range,
            activation_type=QuantType.QUInt8 if self.scheme.activations == "u8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes,
            calibrate_method=_calibration_method(self.method),
            extra_options=_extra_options(self.scheme),
        )


_IN_BRANCH = "inside a control-flow branch (If/Loop/Scan): ONNX Runtime's quantizer leaves subgraphs alone"
_PER_AXIS_OPSET = 13


_QUANTIZED_OPERATORS = {"ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "DequantizeLinear"}


def _why_none(model: ir.Model, in_float: list[dict]) -> str:
    """Why no weight is left to quantize, as the end of the refusal's sentence."""
    branched = [entry for entry in in_float if entry["why"] == _IN_BRANCH]
    if branched:
        return (
            f": the model's {len(branched)} weights sit inside control-flow branches "
            f"({branched[0]['weight']}), which are not quantized"
        )
    if done := sorted({node.op_type for node in model.graph} & _QUANTIZED_OPERATORS):
        return f": the model is quantized already ({', '.join(done)})"
    return " (the exclude patterns keep every weight in float)" if in_float else ""


def _branch_weights(graph: ir.Graph) -> list[str]:
    """The constant MatMul/Gemm/Conv weights inside the subgraphs of ``graph``'s nodes."""
    found = []
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.graph is graph or node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if weight is not None and (weight.const_value is not None or weight.is_initializer()):
            found.append(f"{weight.name} of a {node.op_type}")
    return found


def _calibration_method(method: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[method]


def _extra_options(scheme: Scheme) -> dict:
    options: dict = {"WeightSymmetric": True, "ActivationSymmetric": scheme.symmetric}
    if scheme.symmetric:
        options |= {"AddQDQPairToWeight": True, "DedicatedQDQPair": True, "QuantizeBias": False}
    return options


class _Batches:
    """Calibration inputs in equal batches (the percentile and entropy calibrators stack them), each input
    cut along its own batch axis (a recurrent state's is 1; a scalar, such as a sample rate, has none)."""

    def __init__(self, feeds: Mapping[str, np.ndarray], axes: Batches) -> None:
        count = axes.size({name: list(array.shape) for name, array in feeds.items()}) or 1
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            [
                axes.take(dict(feeds), start, min(start + _CALIBRATION_BATCH, count))
                for start in range(0, count, _CALIBRATION_BATCH)
            ]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _name_nodes(model: ir.Model) -> None:
    """ONNX Runtime's quantizer addresses nodes by name: give each a unique one."""
    taken: set[str] = set()
    for index, node in enumerate(model.graph):
        if not node.name or node.name in taken:
            node.name = f"{node.op_type}_{index}"
        taken.add(node.name)


class QuantizationSection(Section):
    """What the quantize pass did, how the backend computes it, and what it cost in quality."""

    key = "quantization"

    def __init__(self, outcomes: list[PassOutcome]) -> None:
        super().__init__(outcomes)
        (self.outcome,) = [o for o in outcomes if isinstance(o, Quantized)]

    def check(self, context: CompileContext) -> None:
        if any(section.random_outputs(context.source.output_names) for section in context.sections):
            raise UserError(
                "quantize cannot be checked with a pass whose outputs change run by run (mac-prune)",
                "compile the protected model without --quantize",
            )

    def reference(self) -> ReferenceChange | None:
        if self.outcome.before is None:
            return None  # the graph is unchanged; the backend computes it at the precision
        return Rebase(self.outcome.before, f" quantize ({self.outcome.precision})")

    def report(self, context: CompileContext) -> dict:

        outcome, stage = self.outcome, context.stage
        assert stage is not None and context.dense is not None
        entry = context.manifest["backend"]
        report: dict = {
            "precision": outcome.precision,
            "computes": _COMPUTES[outcome.computes].format(backend=context.backend.name),
            "backend_operators": context.backend.quantized_operators(stage, entry),
        }
        if outcome.scheme is not None:
            report |= {
                "scheme": outcome.scheme.to_json(),
                "quantized_weights": len(outcome.quantized),
                "kept_in_float": outcome.in_float,
                "others": _OTHERS_IN_FLOAT,
            }
        if outcome.method:
            report["calibration"] = {"method": outcome.method, "data": outcome.calibrated_on}
        before = outcome.before or context.dense
        runs, why = context.backend.can_run_here(context.target)
        with context.step("measuring quality, fp32 vs quantized"):
            if outcome.before is not None:
                report["quality"] = quality_report(before, context.source.model, context.source)
            elif runs:
                session = context.backend.load(stage)
                report["quality"] = quality_report(before, session.run, context.source)
            else:
                report["quality"] = {"measured": False, "why": f"the artifact cannot run here: {why}"}
        report["retention"] = retention(report["quality"])
        report["min_quality"] = outcome.min_quality
        if report["retention"] is None and outcome.min_quality > 0:
            raise UserError(
                "quantize: --min-quality cannot be checked: quality was not measured "
                f"({report['quality'].get('why', 'no task data')})",
                "give --eval-data, or drop --min-quality",
            )
        if report["retention"] is not None and report["retention"] < outcome.min_quality:
            raise UserError(
                f"quantize: quality retention {report['retention']:.4f} is below the --min-quality "
                f"{outcome.min_quality} asked for",
                "keep more in float (exclude), calibrate on better data (--calibration-data), or use "
                "int8-dynamic / bf16",
            )
        with context.step("timing fp32 vs quantized through the same backend"):
            float_options = {**context.options, "precision": "fp32", "quantized": None}
            report["speed"] = speed_against(context, before, float_options)
        return {self.key: report}

    @staticmethod
    def render(section: dict, manifest: Mapping[str, Any]) -> list[str]:

        operators = ", ".join(f"{k} {v}" for k, v in section["backend_operators"].items()) or "none read"
        lines = [f"  precision {section['precision']}: {section['computes']} (artifact: {operators})"]
        if scheme := section.get("scheme"):
            lines.append(
                f"  int8     {scheme['activations']} activations x s8 weights"
                + (", 7-bit weights" if scheme["reduce_range"] else "")
                + f": {scheme['why']}"
            )
            kept = len(section["kept_in_float"])
            lines.append(
                f"  weights  {section['quantized_weights']} quantized, {kept} kept in fp32"
                + (
                    f" (e.g. {section['kept_in_float'][0]['weight']}: {section['kept_in_float'][0]['why']})"
                    if kept
                    else ""
                )
            )
        if calibration := section.get("calibration"):
            lines.append(f"  calibrated {calibration['method']} on {calibration['data']}")
        lines.append(quality_line(section["quality"], ("fp32", section["precision"])))
        speed = section["speed"]
        if speed.get("measured", True):
            lines.append(
                f"  speed    fp32 {speed['dense_p50_ms']:.1f} ms -> {section['precision']} "
                f"{speed['compressed_p50_ms']:.1f} ms ({speed['speedup']:.2f}x), "
                f"p50 of {speed['calls']} calls"
            )
        else:
            lines.append(f"  speed    not measured: {speed['why']}")
        return lines


_COMPUTES = {
    "integer": "the graph holds QDQ / dynamic INT8 operators; {backend} runs them on integer kernels",
    "dequantized": "the graph holds QDQ / dynamic INT8 operators; {backend} computes the dequantized "
    "values in fp32 (same numbers, no integer kernels)",
    "runtime": "the graph stays fp32; {backend} computes it at this precision",
}


@dataclasses.dataclass
class Quantized(PassOutcome):
    """The quantize pass's outcome: the precision, how the backend computes it, the INT8 scheme, the
    weights quantized and those kept in float (with why), and the float model before it."""

    precision: str
    computes: str
    scheme: Scheme | None = None
    quantized: list[str] = dataclasses.field(default_factory=list)
    in_float: list[dict] = dataclasses.field(default_factory=list)
    before: ir.Model | None = None
    calibrated_on: str = ""
    method: str | None = None
    min_quality: float = 0.0

    section = QuantizationSection

    def log(self) -> dict:
        return {"precision": self.precision, "quantized_weights": len(self.quantized)}
