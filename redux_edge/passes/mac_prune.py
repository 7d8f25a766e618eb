"""mac-prune: randomised input-pixel masking against EM side-channel weight extraction.

Follows MACPruning (HOST 2025; ../shared/PAPERS.md): on every inference, each input pixel outside an
importance-aware map is deactivated with probability ``drop`` and the first layer's multiply-accumulates on
it are skipped, so the weight-dependent EM leakage of those MACs moves in time or disappears; the pixels
whose occlusion importance (``redux_edge.analysis.pixels``) is in the top ``keep_top`` fraction are always
kept, which is what keeps the accuracy. In the graph a deactivated pixel is zeroed in the normalised
input, which is the same as skipping its MACs. The draw is an ONNX ``RandomUniformLike``, anew on every
run; ``seed`` (>= 0) fixes the sequence of a session for tests. The mask each run used is the extra output
``pixel_keep``, so the run can be checked exactly against the model fed the masked input.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from redux_edge.errors import UserError
from redux_edge.ir.surgery import new_initializer
from redux_edge.passes import RecipePass

__all__ = ["KEEP_OUTPUT", "MacPrunePass"]

KEEP_OUTPUT = "pixel_keep"
_FIRST_CHANNEL = (("starts", 0), ("ends", 1), ("axes", 1))


@dataclasses.dataclass
class MacPrunePass(RecipePass):
    name = "mac-prune"
    summary = "randomly deactivate non-critical input pixels on every inference (MACPruning)"

    drop: float = 0.5
    keep_top: float = 0.4
    seed: int = -1
    input: str = ""
    # Set by the pipeline: real images for the pixel map. After a run: the always-kept pixels
    # [height, width] and the occlusion importance they were chosen by.
    calibration: ClassVar[dict | None] = None
    protected_input: ClassVar[str] = ""
    critical: ClassVar[np.ndarray | None] = None
    importance: ClassVar[np.ndarray | None] = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop < 1.0:
            raise UserError(f"mac-prune: drop {self.drop} is not in [0, 1)", "e.g. --mac-prune 0.5")
        if not 0.0 <= self.keep_top <= 1.0:
            raise UserError(
                f"mac-prune: keep_top {self.keep_top} is not in [0, 1]", "e.g. --mac-keep-top 0.4"
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        image = self._image_input(graph)
        height, width = (int(d) for d in image.shape[2:])
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
                    "compile a zoo image model, or give --inputs with real images",
                )
            from redux_edge.analysis.pixels import occlusion_importance

            importance = occlusion_importance(model, self.calibration, image.name)
        kept = round(self.keep_top * height * width)
        critical = np.zeros(height * width, dtype=bool)
        critical[np.argsort(-importance.reshape(-1), kind="stable")[:kept]] = True
        self.critical, self.importance = critical.reshape(height, width), importance
        self.protected_input = image.name
        self._insert_mask(graph, image, self.critical)
        return ir.passes.PassResult(model, modified=True)

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

    def _insert_mask(self, graph: ir.Graph, image: ir.Value, critical: np.ndarray) -> None:
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
        masked = ir.node("Mul", [image, scale.outputs[0]], name="mac_prune_apply")
        flag.outputs[0].name = KEEP_OUTPUT
        flag.outputs[0].dtype = ir.DataType.UINT8
        flag.outputs[0].shape = ir.Shape([image.shape[0], 1, *image.shape[2:]])
        graph.insert_before(graph.node(0), [pixels, uniform, lucky, keep, flag, scale, masked])
        for use in uses:
            use.node.replace_input_with(use.idx, masked.outputs[0])
        graph.outputs.append(flag.outputs[0])
