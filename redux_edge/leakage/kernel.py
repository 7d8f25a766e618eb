"""The protected first layer as a microcontroller runs it: int8 weights, int32 accumulators, and the MAC
loop of MACPruning (HOST 2025; docs/PAPERS.md), with or without hiding.

``QuantizedLayer`` takes the first convolution after a ``mac-prune`` mask out of the graph and quantises it
symmetrically, as CMSIS-NN and TFLite Micro do: per-output-channel weight scales, one input scale, int32
biases in the accumulator's scale. ``c_source.emit_c`` writes it as C (the variants are described there);
``accumulate`` is the same integer computation in numpy, and ``Xorshift32`` / ``draw_reference`` draw the
masks and fill values the C generator draws for a seed: the references the C code and the simulated traces
are checked against.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from redux_edge.errors import UserError
from redux_edge.files import save_arrays
from redux_edge.leakage.c_source import emit_c

__all__ = [
    "KEEP_OUTPUT",
    "QuantizedLayer",
    "Xorshift32",
    "accumulate",
    "draw_reference",
    "emit_c",
    "first_conv_after_mask",
    "run_c_kernel",
]

# The extra output of a mac-prune graph: each pixel's keep bit of the run (the pass writes it).
KEEP_OUTPUT = "pixel_keep"


@dataclasses.dataclass
class QuantizedLayer:
    weights: np.ndarray  # int8 [out_channels, in_channels, kernel_h, kernel_w]
    bias: np.ndarray  # int32 [out_channels], in the accumulator's scale
    weight_scales: np.ndarray  # float32 [out_channels]
    input_scale: float
    padding: int
    critical: np.ndarray  # bool [height, width]: pixels never dropped
    drop: float
    hiding: str = "none"  # "none": skipped MACs (a branch); "shuffle": constant time, fresh MAC order
    fill_low: int = 0  # a dropped pixel's operand under hiding: uniform int8 in [fill_low, fill_high]
    fill_high: int = 0

    @property
    def height(self) -> int:
        return self.critical.shape[0]

    @property
    def width(self) -> int:
        return self.critical.shape[1]

    def quantize_input(self, images: np.ndarray) -> np.ndarray:
        """int8 [n, in_channels, h, w] of normalised float images."""
        return np.clip(np.round(images / self.input_scale), -128, 127).astype(np.int8)

    def save(self, path: Path) -> None:
        save_arrays(path, {f.name: np.asarray(getattr(self, f.name)) for f in dataclasses.fields(self)})

    @classmethod
    def load(cls, path: Path) -> QuantizedLayer:
        with np.load(path, allow_pickle=False) as saved:
            # Layers written before hiding existed lack its fields and take their defaults.
            values = {f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved.files}
        scalars = {
            "input_scale": float,
            "padding": int,
            "drop": float,
            "hiding": str,
            "fill_low": int,
            "fill_high": int,
        }
        return cls(**values | {key: kind(values[key]) for key, kind in scalars.items() if key in values})


def first_conv_after_mask(
    model: ir.Model, critical: np.ndarray, drop: float, images: np.ndarray, hiding: str = "none"
) -> QuantizedLayer:
    """Quantise the convolution that consumes the mac-prune-masked input; ``images`` (normalised, real)
    set the input scale and the range of the fill values."""
    masked = next((node for node in model.graph if node.name == "mac_prune_apply"), None)
    if masked is None or not any(output.name == KEEP_OUTPUT for output in model.graph.outputs):
        raise UserError("--emit-c needs a model protected by mac-prune", "add --mac-prune P")
    consumers = [use.node for use in masked.outputs[0].uses()]
    conv = next((node for node in consumers if node.op_type == "Conv"), None)
    if conv is None or len(consumers) != 1:
        found = ", ".join(node.op_type for node in consumers)
        raise UserError(
            f"--emit-c: the masked input feeds {found}, not one Conv", "the kernel is a Conv layer"
        )
    weight_input = conv.inputs[1]
    weight = weight_input.const_value if weight_input is not None else None
    bias = conv.inputs[2].const_value if len(conv.inputs) > 2 and conv.inputs[2] is not None else None
    attributes = {name: attr.value for name, attr in conv.attributes.items()}
    pads = list(attributes.get("pads", [0, 0, 0, 0]))
    if (
        weight is None
        or attributes.get("group", 1) != 1
        or list(attributes.get("strides", [1, 1])) != [1, 1]
        or list(attributes.get("dilations", [1, 1])) != [1, 1]
        or len(set(pads)) != 1
        or attributes.get("auto_pad", "NOTSET") != "NOTSET"
    ):
        raise UserError(
            f"--emit-c supports a plain Conv (constant weights, stride 1, no groups or dilation, equal "
            f"pads); {conv.name} is {attributes}",
            "protect a model whose first layer is such a Conv",
        )
    float_weight = weight.numpy().astype(np.float64)
    weight_scales = np.abs(float_weight).reshape(len(float_weight), -1).max(axis=1) / 127.0
    weight_scales = np.where(weight_scales > 0, weight_scales, 1.0)
    input_scale = float(np.abs(images).max() / 127.0) or 1.0
    float_bias = np.zeros(len(float_weight)) if bias is None else bias.numpy().astype(np.float64)
    quantized = np.clip(np.round(images / input_scale), -128, 127)
    return QuantizedLayer(
        weights=np.round(float_weight / weight_scales[:, None, None, None]).astype(np.int8),
        bias=np.round(float_bias / (weight_scales * input_scale)).astype(np.int32),
        weight_scales=weight_scales.astype(np.float32),
        input_scale=input_scale,
        padding=int(pads[0]),
        critical=critical.astype(bool),
        drop=drop,
        hiding=hiding,
        fill_low=int(quantized.min()),
        fill_high=int(quantized.max()),
    )


def accumulate(
    layer: QuantizedLayer, inputs: np.ndarray, keep: np.ndarray, fill: np.ndarray | None = None
) -> np.ndarray:
    """The kernel's int32 outputs [n, out_channels, h, w] for int8 ``inputs`` and per-image ``keep``
    masks [n, h, w]: every MAC on a kept pixel, on ``fill`` [n, channels, h, w] for a dropped one under
    hiding (nothing without), then the bias."""
    pad = layer.padding
    kept = keep[:, None].astype(bool)
    dropped = 0 if fill is None else np.where(kept, 0, fill.astype(np.int64))
    masked = np.where(kept, inputs.astype(np.int64), dropped)
    padded = np.pad(masked, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out_h = padded.shape[2] - layer.weights.shape[2] + 1
    out_w = padded.shape[3] - layer.weights.shape[3] + 1
    out = np.zeros((len(inputs), len(layer.weights), out_h, out_w), np.int64)
    for ky in range(layer.weights.shape[2]):
        for kx in range(layer.weights.shape[3]):
            window = padded[:, :, ky : ky + out_h, kx : kx + out_w]
            out += np.einsum("nihw,oi->nohw", window, layer.weights[:, :, ky, kx].astype(np.int64))
    return (out + layer.bias[None, :, None, None]).astype(np.int32)


class Xorshift32:
    """The emitted kernel's generator, draw for draw."""

    def __init__(self, seed: int) -> None:
        self.state = seed or 2463534242

    def next(self) -> int:
        x = self.state
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        self.state = x
        return x

    def below(self, bound: int) -> int:
        return (self.next() * bound) >> 32


def draw_reference(layer: QuantizedLayer, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The keep mask [h, w] (and, under hiding, the fill [channels, h, w]) that the emitted kernel's
    first ``draw_mask`` after ``seed(seed)`` gives."""
    generator = Xorshift32(seed)
    threshold = min(round(layer.drop * 2**32), 2**32 - 1)
    draws = np.array([generator.next() for _ in range(layer.critical.size)], dtype=np.uint64)
    keep = (layer.critical.reshape(-1) | (draws >= threshold)).reshape(layer.critical.shape).astype(np.uint8)
    if layer.hiding != "shuffle":
        return keep, None
    span = layer.fill_high - layer.fill_low + 1
    shape = (layer.weights.shape[1], layer.height, layer.width)
    fill = [layer.fill_low + generator.below(span) for _ in range(int(np.prod(shape)))]
    return keep, np.array(fill, dtype=np.int8).reshape(shape)


class BuiltKernel:
    """The emitted C built with the host's gcc as a shared library (a context manager): ``draw`` and
    ``run`` call the C functions of the layer's variant."""

    def __init__(self, folder: Path, layer: QuantizedLayer, name: str = "macprune_layer") -> None:
        self.folder, self.layer, self.name = folder, layer, name

    def __enter__(self) -> BuiltKernel:
        import ctypes
        import shutil
        import subprocess
        import tempfile

        compiler = shutil.which("gcc")
        if compiler is None:
            raise UserError("checking the emitted C kernel needs gcc", "apt-get install gcc (make test does)")
        self._scratch = tempfile.TemporaryDirectory()
        library = Path(self._scratch.name) / f"lib{self.name}.so"
        flags = ["-std=c99", "-O2", "-Wall", "-Werror", "-shared", "-fPIC"]
        source = str(self.folder / f"{self.name}.c")
        subprocess.run([compiler, *flags, source, "-o", str(library)], check=True, capture_output=True)
        self._library = ctypes.CDLL(str(library))
        return self

    def __exit__(self, *_: object) -> None:
        self._scratch.cleanup()

    def _function(self, suffix: str) -> Any:
        return getattr(self._library, f"{self.name}_{suffix}")

    def draw(self, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The C generator's first mask (and fill) after seeding, as ``draw_reference`` gives them."""
        import ctypes

        layer = self.layer
        keep = np.zeros(layer.critical.shape, np.uint8)
        fill = np.zeros((layer.weights.shape[1], layer.height, layer.width), np.int8)
        self._function("seed")(ctypes.c_uint32(seed))
        pointers = [keep.ctypes.data_as(ctypes.c_void_p)]
        if layer.hiding == "shuffle":
            pointers.append(fill.ctypes.data_as(ctypes.c_void_p))
        self._function("draw_mask")(*pointers)
        return keep, fill if layer.hiding == "shuffle" else None

    def run(self, inputs: np.ndarray, keep: np.ndarray, fill: np.ndarray | None = None) -> np.ndarray:
        """int32 outputs for int8 ``inputs`` [n, channels, h, w], ``keep`` masks [n, h, w] and, under
        hiding, ``fill`` [n, channels, h, w], as ``accumulate`` gives them."""
        import ctypes

        layer = self.layer
        out_c, _, k_h, k_w = layer.weights.shape
        out_h, out_w = layer.height + 2 * layer.padding - k_h + 1, layer.width + 2 * layer.padding - k_w + 1
        outputs = np.zeros((len(inputs), out_c, out_h, out_w), np.int32)
        if layer.hiding == "shuffle" and fill is None:
            raise ValueError("a kernel with hiding runs with fill values")
        for index in range(len(inputs)):
            arrays = [np.ascontiguousarray(inputs[index], dtype=np.int8)]
            arrays.append(np.ascontiguousarray(keep[index], dtype=np.uint8))
            if layer.hiding == "shuffle":
                assert fill is not None
                arrays.append(np.ascontiguousarray(fill[index], dtype=np.int8))
            pointers = [array.ctypes.data_as(ctypes.c_void_p) for array in arrays]
            self._function("run")(*pointers, outputs[index].ctypes.data_as(ctypes.c_void_p))
        return outputs


def run_c_kernel(
    folder: Path,
    layer: QuantizedLayer,
    inputs: np.ndarray,
    keep: np.ndarray,
    fill: np.ndarray | None = None,
    name: str = "macprune_layer",
) -> np.ndarray:
    """Build the emitted C and run it (``BuiltKernel.run``)."""
    with BuiltKernel(folder, layer, name) as built:
        return built.run(inputs, keep, fill)
