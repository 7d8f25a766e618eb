"""Which input pixels matter: the importance map that MACPruning always keeps.

Occlusion (Zeiler and Fergus, 2014) with the deactivation MACPruning applies: a pixel's importance is the
mean absolute change of the model's outputs when that pixel (all its channels) is zeroed in the
normalised input, over real calibration images. Zeroing is exactly what skipping the pixel's
multiply-accumulates does, so the map measures the cost of the defence pixel by pixel; it needs only
ONNX Runtime, so ONNX files get the same map as zoo models.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from redux_edge.analysis import in_memory_runner

__all__ = ["occlusion_importance"]


def occlusion_importance(model: ir.Model, feeds: dict[str, np.ndarray], input_name: str) -> np.ndarray:
    """Importance [height, width] of each pixel of ``input_name`` (a [batch, channels, h, w] input)."""
    run = in_memory_runner(model)
    images = feeds[input_name]
    others = {name: value for name, value in feeds.items() if name != input_name}
    batch, _, height, width = images.shape
    baseline = run(feeds)[0]
    scores = np.zeros((height, width))
    for row in range(height):
        # One run per image row: every image with each pixel of the row zeroed in turn.
        occluded = np.repeat(images[None], width, axis=0)
        occluded[np.arange(width), :, :, row, np.arange(width)] = 0.0
        tiled = {name: np.concatenate([value] * width) for name, value in others.items()}
        outputs = run({input_name: occluded.reshape(-1, *images.shape[1:]), **tiled})[0]
        change = np.abs(outputs.reshape(width, batch, -1) - baseline.reshape(1, batch, -1))
        scores[row] = change.mean(axis=(1, 2))
    return scores
