"""mac-prune: randomised input-pixel masking against EM side-channel weight extraction.

Follows MACPruning (HOST 2025; docs/PAPERS.md): on every inference, each input pixel outside an
importance-aware map is deactivated with probability ``drop`` and the first layer's multiply-accumulates on
it are skipped, so the weight-dependent EM leakage of those MACs moves in time or disappears; the pixels
whose occlusion importance (``redux_edge.analysis.pixels``) is in the top ``keep_top`` fraction are always
kept, which is what keeps the accuracy. In the graph a deactivated pixel is zeroed in the normalised
input, which is the same as skipping its MACs. The draw is an ONNX ``RandomUniformLike``, anew on every
run; ``seed`` (>= 0) fixes the sequence of a session for tests. The mask each run used is the extra output
``pixel_keep``, so the run can be checked exactly against the model fed the masked input.

``hiding="shuffle"`` adds what the published defence lacks against Double Strike (HOST 2026): a dropped
pixel is not zeroed but takes a fresh random value in the range of the calibration images, so that on the
device its MACs run on that value (constant time: no keep/skip branch, a dummy MAC looks like a real one),
and the emitted kernel runs each output position's MACs in a fresh random order (``leakage.c_source``).
The values a run drew are the extra output ``pixel_fill``. A model meant to run with it is fine-tuned with
the same masks (mask-aware fine-tuning).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import onnx_ir as ir

from redux_edge.analysis.pixels import occlusion_importance
from redux_edge.analysis.quality import quality_line, quality_report
from redux_edge.errors import UserError
from redux_edge.ir.surgery import new_initializer
from redux_edge.leakage import kernel
from redux_edge.leakage.kernel import KEEP_OUTPUT
from redux_edge.passes.contract import (
    CompileContext,
    Flag,
    PassOutcome,
    RecipePass,
    ReferenceChange,
    Section,
    gathered,
    parameter,
)

if TYPE_CHECKING:
    from torch import nn

    from redux_edge.backends.base import Backend
    from redux_edge.targets import Target

__all__ = ["KEEP_OUTPUT", "MacPrunePass"]

FILL_OUTPUT = "pixel_fill"
HIDING = ("none", "shuffle")
_FIRST_CHANNEL = (("starts", 0), ("ends", 1), ("axes", 1))
_PIXEL_CALIBRATION = 64
_ALONE = ("--mac-keep-top, --mac-seed and --mac-hiding go with --mac-prune P", "e.g. --mac-prune 0.5")


class ProtectionSection(Section):
    key = "protection"

    def __init__(self, outcomes: list[PassOutcome]) -> None:
        super().__init__(outcomes)
        outcome = outcomes[0]
        assert (
            isinstance(outcome, PixelsMasked) and len(outcomes) == 1
        )  # mac-prune runs in a compile of its own
        self.outcome = outcome

    def reference(self) -> ReferenceChange:
        return _PixelMasked(self.outcome.protected_input, self.outcome.hiding != "none")

    def random_outputs(self, output_names: list[str]) -> list[str]:
        # Without a seed every run draws anew, so a health check can compare only shapes.
        return output_names if self.outcome.seed < 0 else []

    def stage(self, context: CompileContext) -> dict:
        assert context.stage is not None
        folder = context.stage / "mac_prune"
        folder.mkdir()
        np.save(folder / "critical.npy", self.outcome.critical)
        np.save(folder / "importance.npy", self.outcome.importance)
        return {}

    def report(self, context: CompileContext) -> dict:
        """The defence's parameters, its pixel map (in the bundle) and what it costs on the card's task."""
        outcome, source = self.outcome, context.source
        critical = outcome.critical
        report: dict = {
            "pass": "mac-prune",
            "input": outcome.protected_input,
            "drop": outcome.drop,
            "keep_top": outcome.keep_top,
            "seed": outcome.seed,
            "hiding": outcome.hiding,
            "fill_range": outcome.fill_range,
            "critical_pixels": int(critical.sum()),
            "pixels": int(critical.size),
            "expected_keep_rate": float(critical.mean() + (1 - critical.mean()) * (1 - outcome.drop)),
            "importance": "occlusion" if outcome.calibrated_on else "none (random masking only)",
            "calibration": outcome.calibrated_on,
            "files": {"critical": "mac_prune/critical.npy", "importance": "mac_prune/importance.npy"},
        }

        # The user's --eval-data, else the card's image task, as every pass's quality report reads them.
        assert context.dense is not None
        with context.step("measuring quality with and without masking"):
            report["quality"] = quality_report(context.dense, source.model, source)
        if outcome.emit_c:
            with context.step("emitting the first layer's C kernel and checking it with gcc"):
                report["kernel"] = self._emit_kernel(context)
        return {self.key: report}

    def _emit_kernel(self, context: CompileContext) -> dict:
        """Write c/ (the C kernel and its quantised layer) and check the C, built with the host's gcc,
        against the integer reference on the verification samples with the masks the verified run drew."""
        outcome, source, stage = self.outcome, context.source, context.stage
        assert stage is not None
        keep = context.verified_outputs[-1]
        images = (outcome.calibration or source.inputs)[outcome.protected_input]
        layer = kernel.first_conv_after_mask(
            source.model, outcome.critical, outcome.drop, images, outcome.hiding
        )
        folder = stage / "c"
        paths = kernel.emit_c(layer, folder)
        layer.save(folder / "layer.npz")
        report = {
            "files": [str(path.relative_to(stage)) for path in [*paths, folder / "layer.npz"]],
            "weights": list(layer.weights.shape),
            "input_scale": layer.input_scale,
            "variant": layer.hiding,
        }
        if shutil.which("gcc") is None:
            return report | {"checked": False, "why": "no gcc on this machine"}
        quantized = layer.quantize_input(source.inputs[outcome.protected_input])
        # Under hiding the kernel is given the fill values the verified run drew, quantised as its input.
        fill = None
        if layer.hiding != "none":
            fill = layer.quantize_input(context.verified_outputs[-2])
        got = kernel.run_c_kernel(folder, layer, quantized, keep[:, 0], fill)
        want = kernel.accumulate(layer, quantized, keep[:, 0], fill)
        if not np.array_equal(got, want):
            raise RuntimeError(
                f"the emitted C kernel differs from the integer reference by {np.abs(got - want).max()}"
            )
        return report | {"checked": True, "samples": len(quantized), "integer_exact": True}

    @staticmethod
    def render(section: dict, manifest: Mapping[str, Any]) -> list[str]:

        seed = str(section["seed"]) if section["seed"] >= 0 else "none (fresh draws every run)"
        hiding = section.get("hiding", "none")
        dropped = "dropped" if hiding == "none" else "replaced by random values"
        lines = [
            f"  protect  mac-prune on '{section['input']}': {section['critical_pixels']} of "
            f"{section['pixels']} pixels always kept ({section['importance']}), the others {dropped} with "
            f"p={section['drop']} per inference; expected keep rate {section['expected_keep_rate']:.2f}; "
            f"hiding {hiding}; seed {seed}"
        ]
        lines.append(quality_line(section["quality"]))
        if kernel := section.get("kernel"):
            checked = (
                f"built with gcc and integer-exact on {kernel['samples']} "
                + ("sample" if kernel["samples"] == 1 else "samples")
                if kernel["checked"]
                else f"not checked: {kernel['why']}"
            )
            lines.append(
                f"  kernel   {', '.join(kernel['files'])}: int8 weights {kernel['weights']}, {checked}"
            )
        return lines


@dataclasses.dataclass
class PixelsMasked(PassOutcome):
    """The always-kept pixels [height, width], the occlusion importance they were chosen by, and the
    pass's settings, for the protection report."""

    critical: np.ndarray
    importance: np.ndarray
    protected_input: str
    drop: float
    keep_top: float
    seed: int
    hiding: str
    fill_range: list[float] | None
    emit_c: bool
    calibration: dict | None
    calibrated_on: str | None

    section = ProtectionSection


class _PixelMasked(ReferenceChange):
    """Each run is checked against the original fed that run's masked input (its pixel_keep output, and
    under hiding its pixel_fill output)."""

    describes = ", fed each run's masked input (the run's pixel_keep and pixel_fill outputs)"
    per_run_outputs = True

    def __init__(self, input_name: str, filled: bool) -> None:
        self.input_name, self.filled = input_name, filled

    def on_module(self, module: nn.Module, architecture: dict, stack: contextlib.ExitStack) -> nn.Module:
        return module

    def per_run(self, feeds: dict, run_outputs: list[np.ndarray]) -> tuple[dict, list[np.ndarray]]:
        keep, image = run_outputs[-1], feeds[self.input_name]
        masked = dict(feeds)
        if not self.filled:
            masked[self.input_name] = (image * keep).astype(image.dtype)
            return masked, [keep]
        fill = run_outputs[-2]
        masked[self.input_name] = np.where(keep.astype(bool), image, fill).astype(image.dtype)
        return masked, [fill, keep]


@dataclasses.dataclass
class MacPrunePass(RecipePass):
    name = "mac-prune"
    summary = "randomly deactivate non-critical input pixels on every inference (MACPruning)"
    flags = (
        Flag(
            "--mac-prune",
            "MACPruning: drop each non-critical input pixel with probability P on every inference.",
            "drop",
            float,
            metavar="P",
        ),
        Flag(
            "--mac-keep-top",
            "MACPruning: always keep this fraction of pixels, the most important by occlusion [0.4].",
            "keep_top",
            float,
            metavar="F",
            enables=False,
            alone=_ALONE,
        ),
        Flag(
            "--mac-seed",
            "MACPruning: fix the draw sequence (tests, reproducible runs).",
            "seed",
            int,
            enables=False,
            alone=_ALONE,
        ),
        Flag(
            "--mac-hiding",
            "MACPruning: 'shuffle' adds hiding: dropped pixels take random values (a constant-time "
            "kernel) and the kernel's MACs run in a fresh order [none].",
            "hiding",
            metavar="MODE",
            enables=False,
            alone=_ALONE,
        ),
        Flag(
            "--emit-c",
            "MACPruning: also write the protected first layer as C (bundle's c/).",
            "emit_c",
            bool,
            enables=False,
            alone=("--emit-c writes the kernel of a mac-prune-protected layer", "add --mac-prune P"),
        ),
    )
    compares_with_dense = True

    drop: float = parameter(0.5, "probability of deactivating each non-critical pixel per inference")
    keep_top: float = parameter(0.4, "fraction of pixels always kept, the most important by occlusion")
    seed: int = parameter(-1, "fixes the draw sequence of a session (>= 0); -1: fresh draws", minimum=-1)
    input: str = parameter("", "the image input to protect (default: the first float image input)")
    hiding: str = parameter(
        "none", "'shuffle': random values for dropped pixels and a fresh MAC order on the device; 'none'"
    )
    emit_c: bool = parameter(False, "also write the protected first layer as a C kernel (c/)")
    # Gathered by prepare: real images for the pixel map and the fill range.
    calibration: dict[str, np.ndarray] | None = gathered()
    calibrated_on: str | None = gathered()

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop < 1.0:
            raise UserError(f"mac-prune: drop {self.drop} is not in [0, 1)", "e.g. --mac-prune 0.5")
        if not 0.0 <= self.keep_top <= 1.0:
            raise UserError(
                f"mac-prune: keep_top {self.keep_top} is not in [0, 1]", "e.g. --mac-keep-top 0.4"
            )
        if self.hiding not in HIDING:
            raise UserError(f"mac-prune: unknown hiding '{self.hiding}'", "choose none or shuffle")

    def gate(self) -> str | None:
        return "mac-prune"

    def refuses(self, backend: Backend, target: Target) -> str:
        from redux_edge.backends import backends_with

        if backend.runs_random_ops:
            return ""
        able = " or ".join(other.name for other in backends_with("runs_random_ops"))
        return (
            f"mac-prune bundles use the {able} backend, not {backend.name} (the masks are drawn by ONNX "
            "RandomUniformLike; for microcontrollers use --emit-c)"
        )

    def check(self, context: CompileContext) -> None:
        others = [p.name for p in context.passes if p is not self and not p.exact]
        if others:
            raise UserError(
                f"mac-prune runs in a compile of its own, not with {', '.join(others)}",
                "compile the compressed model first, then protect its model.onnx in a second compile",
            )

    def prepare(self, context: CompileContext) -> dict[str, Any]:
        """Real images for the pixel map: --calibration-data, else the card's task data (calibration split),
        else the verification inputs."""
        if self.keep_top == 0 and self.hiding == "none":
            return {}
        calibration = context.source.calibration(_PIXEL_CALIBRATION)
        if calibration.synthetic:
            raise UserError(
                "mac-prune --mac-keep-top and --mac-hiding need real images (the pixels always kept, "
                "the range of the random values)",
                "give --calibration-data with real images, or --mac-keep-top 0 for random masking only",
            )
        return {"calibration": calibration.feeds, "calibrated_on": calibration.described}

    def call(self, model: ir.Model) -> PixelsMasked:
        graph = model.graph
        image = self._image_input(graph)
        assert image.shape is not None and image.name is not None
        # _image_input keeps only images whose channels and size are numbers.
        height, width = (cast(int, d) for d in image.shape[2:])
        if any(output.name == KEEP_OUTPUT for output in graph.outputs):
            raise UserError(
                "mac-prune: the model is already protected (it has a pixel_keep output)",
                "apply mac-prune once",
            )
        importance = np.zeros((height, width))
        if self.keep_top > 0:
            if self.calibration is None or image.name not in self.calibration:
                raise UserError(
                    "mac-prune --mac-keep-top needs calibration images for the pixel map",
                    "compile a zoo image model, or give --calibration-data with real images",
                )

            importance = occlusion_importance(model, self.calibration, image.name)
        kept = round(self.keep_top * height * width)
        critical = np.zeros(height * width, dtype=bool)
        critical[np.argsort(-importance.reshape(-1), kind="stable")[:kept]] = True
        fill_range = None
        if self.hiding != "none":
            if self.calibration is None or image.name not in self.calibration:
                raise UserError(
                    "mac-prune --mac-hiding needs calibration images for the range of the random values",
                    "compile a zoo image model, or give --calibration-data with real images",
                )
            images = self.calibration[image.name]
            fill_range = [float(images.min()), float(images.max())]
        self._insert_mask(graph, image, critical.reshape(height, width), fill_range)
        return PixelsMasked(
            model,
            True,
            critical.reshape(height, width),
            importance,
            image.name,
            self.drop,
            self.keep_top,
            self.seed,
            self.hiding,
            fill_range,
            self.emit_c,
            self.calibration,
            self.calibrated_on,
        )

    def _image_input(self, graph: ir.Graph) -> ir.Value:
        images = [
            value
            for value in graph.inputs
            if value.dtype == ir.DataType.FLOAT
            and value.shape is not None
            and len(value.shape) == 4
            and all(isinstance(d, int) for d in value.shape[1:])
        ]
        if self.input:
            images = [value for value in images if value.name == self.input]
        if not images:
            wanted = f"'{self.input}'" if self.input else "input"
            raise UserError(
                f"mac-prune needs a float image {wanted} [batch, channels, height, width] with fixed "
                f"channels and size; the model's inputs are {[v.name for v in graph.inputs]}",
                "mac-prune protects the first layers of image models",
            )
        return images[0]

    def _insert_mask(
        self, graph: ir.Graph, image: ir.Value, critical: np.ndarray, fill_range: list[float] | None
    ) -> None:
        uses = list(image.uses())
        always = new_initializer(graph, critical[None, None], "mac_prune.critical")
        drop = new_initializer(graph, np.array(self.drop, dtype=np.float32), "mac_prune.drop")
        # One draw per pixel, shared by its channels: the shape of the image's first channel.
        bounds = [
            new_initializer(graph, np.array([v], np.int64), f"mac_prune.{k}") for k, v in _FIRST_CHANNEL
        ]
        pixels = ir.node("Slice", [image, *bounds], name="mac_prune_pixels")
        attributes = {"dtype": ir.DataType.FLOAT} | ({"seed": float(self.seed)} if self.seed >= 0 else {})
        uniform = ir.node("RandomUniformLike", [pixels.outputs[0]], attributes, name="mac_prune_draw")
        lucky = ir.node("GreaterOrEqual", [uniform.outputs[0], drop], name="mac_prune_lucky")
        keep = ir.node("Or", [lucky.outputs[0], always], name="mac_prune_keep")
        flag = ir.node("Cast", [keep.outputs[0]], {"to": ir.DataType.UINT8}, name="mac_prune_flag")
        scale = ir.node("Cast", [keep.outputs[0]], {"to": ir.DataType.FLOAT}, name="mac_prune_scale")
        nodes = [pixels, uniform, lucky, keep, flag, scale]
        if fill_range is None:
            masked = ir.node("Mul", [image, scale.outputs[0]], name="mac_prune_apply")
        else:
            # A fresh value per pixel and channel, uniform over the calibration images' range.
            low, high = fill_range
            values = {"dtype": ir.DataType.FLOAT, "low": low, "high": high}
            if self.seed >= 0:
                values["seed"] = float(self.seed) + 1.0
            fill = ir.node("RandomUniformLike", [image], values, name="mac_prune_fill")
            masked = ir.node("Where", [keep.outputs[0], image, fill.outputs[0]], name="mac_prune_apply")
            fill.outputs[0].name = FILL_OUTPUT
            fill.outputs[0].dtype = ir.DataType.FLOAT
            fill.outputs[0].shape = image.shape
            nodes.append(fill)
        nodes.append(masked)
        flag.outputs[0].name = KEEP_OUTPUT
        flag.outputs[0].dtype = ir.DataType.UINT8
        assert image.shape is not None
        flag.outputs[0].shape = ir.Shape([image.shape[0], 1, *image.shape[2:]])
        graph.insert_before(graph.node(0), nodes)
        for use in uses:
            use.node.replace_input_with(use.idx, masked.outputs[0])
        if fill_range is not None:
            graph.outputs.append(nodes[-2].outputs[0])
        graph.outputs.append(flag.outputs[0])
