"""The protected first layer as a microcontroller runs it: int8 weights, int32 accumulators, and a MAC
loop that skips deactivated pixels (MACPruning, HOST 2025; ../shared/PAPERS.md).

``QuantizedLayer`` takes the first convolution after a ``mac-prune`` mask out of the graph and quantises it
symmetrically, as CMSIS-NN and TFLite Micro do: per-output-channel weight scales, one input scale, int32
biases in the accumulator's scale. ``emit_c`` writes a portable C99 implementation of exactly that layer:
the same loop order that ``simulate`` models (output channel, output row, output column, input channel,
kernel row, kernel column), the keep/skip branch per MAC, and a xorshift32 generator that draws the pixel
mask on the device. ``accumulate`` is the same integer computation in numpy, the reference the C code and
the simulated traces are checked against.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx_ir as ir

from redux_edge.errors import UserError
from redux_edge.files import save_arrays
from redux_edge.passes.mac_prune import KEEP_OUTPUT

__all__ = ["QuantizedLayer", "accumulate", "emit_c", "first_conv_after_mask", "run_c_kernel"]


@dataclasses.dataclass
class QuantizedLayer:
    weights: np.ndarray  # int8 [out_channels, in_channels, kernel_h, kernel_w]
    bias: np.ndarray  # int32 [out_channels], in the accumulator's scale
    weight_scales: np.ndarray  # float32 [out_channels]
    input_scale: float
    padding: int
    critical: np.ndarray  # bool [height, width]: pixels never dropped
    drop: float

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
            values = {f.name: saved[f.name] for f in dataclasses.fields(cls)}
        return cls(
            **values
            | {
                "input_scale": float(values["input_scale"]),
                "padding": int(values["padding"]),
                "drop": float(values["drop"]),
            }
        )


def first_conv_after_mask(
    model: ir.Model, critical: np.ndarray, drop: float, images: np.ndarray
) -> QuantizedLayer:
    """Quantise the convolution that consumes the mac-prune-masked input; ``images`` (normalised, real)
    set the input scale."""
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
    return QuantizedLayer(
        weights=np.round(float_weight / weight_scales[:, None, None, None]).astype(np.int8),
        bias=np.round(float_bias / (weight_scales * input_scale)).astype(np.int32),
        weight_scales=weight_scales.astype(np.float32),
        input_scale=input_scale,
        padding=int(pads[0]),
        critical=critical.astype(bool),
        drop=drop,
    )


def accumulate(layer: QuantizedLayer, inputs: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The kernel's int32 outputs [n, out_channels, h, w] for int8 ``inputs`` and per-image ``keep``
    masks [n, h, w]: every MAC on a kept pixel, then the bias."""
    pad = layer.padding
    masked = inputs.astype(np.int64) * keep[:, None].astype(np.int64)
    padded = np.pad(masked, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out_h = padded.shape[2] - layer.weights.shape[2] + 1
    out_w = padded.shape[3] - layer.weights.shape[3] + 1
    out = np.zeros((len(inputs), len(layer.weights), out_h, out_w), np.int64)
    for ky in range(layer.weights.shape[2]):
        for kx in range(layer.weights.shape[3]):
            window = padded[:, :, ky : ky + out_h, kx : kx + out_w]
            out += np.einsum("nihw,oi->nohw", window, layer.weights[:, :, ky, kx].astype(np.int64))
    return (out + layer.bias[None, :, None, None]).astype(np.int32)


def emit_c(layer: QuantizedLayer, folder: Path, name: str = "macprune_layer") -> list[Path]:
    """Write ``<name>.h`` and ``<name>.c`` (C99, stdint only) into ``folder``; return their paths."""
    out_c, in_c, k_h, k_w = layer.weights.shape
    out_h = layer.height + 2 * layer.padding - k_h + 1
    out_w = layer.width + 2 * layer.padding - k_w + 1
    prefix = name.upper()
    threshold = min(round(layer.drop * 2**32), 2**32 - 1)
    critical = _c_array(layer.critical.astype(np.uint8))
    header = f"""/* {name}.h: MACPruning-protected first layer, generated by redux-edge. */
#ifndef {prefix}_H
#define {prefix}_H
#include <stdint.h>

#define {prefix}_IN_CHANNELS {in_c}
#define {prefix}_HEIGHT {layer.height}
#define {prefix}_WIDTH {layer.width}
#define {prefix}_OUT_CHANNELS {out_c}
#define {prefix}_OUT_HEIGHT {out_h}
#define {prefix}_OUT_WIDTH {out_w}

/* Seed the mask generator (xorshift32; any non-zero seed). */
void {name}_seed(uint32_t seed);
/* Draw this inference's pixel mask: critical pixels always 1, the others 1 with probability 1 - p. */
void {name}_draw_mask(uint8_t keep[{prefix}_HEIGHT][{prefix}_WIDTH]);
/* int32 accumulators of the layer on int8 input; MACs on pixels with keep == 0 are skipped. */
void {name}_run(const int8_t input[{prefix}_IN_CHANNELS][{prefix}_HEIGHT][{prefix}_WIDTH],
                const uint8_t keep[{prefix}_HEIGHT][{prefix}_WIDTH],
                int32_t output[{prefix}_OUT_CHANNELS][{prefix}_OUT_HEIGHT][{prefix}_OUT_WIDTH]);
#endif
"""
    source = f"""/* {name}.c: MACPruning-protected first layer, generated by redux-edge.
 * Input scale {layer.input_scale!r}; per-output-channel weight scales in {name}_weight_scales.
 * Dequantised output = accumulator * input_scale * weight_scale[channel]. */
#include "{name}.h"

static const int8_t {name}_weights[{out_c}][{in_c}][{k_h}][{k_w}] = {_c_array(layer.weights)};
static const int32_t {name}_bias[{out_c}] = {_c_array(layer.bias)};
const float {name}_weight_scales[{out_c}] = {_c_array(layer.weight_scales, float_format=True)};
static const uint8_t {name}_critical[{layer.height}][{layer.width}] = {critical};
/* A pixel outside the critical map is dropped when the generator's draw is below p * 2^32. */
static const uint32_t {name}_drop_below = {threshold}u;
static uint32_t {name}_state = 2463534242u;

void {name}_seed(uint32_t seed) {{ {name}_state = seed ? seed : 2463534242u; }}

static uint32_t {name}_next(void) {{
    uint32_t x = {name}_state;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return {name}_state = x;
}}

void {name}_draw_mask(uint8_t keep[{prefix}_HEIGHT][{prefix}_WIDTH]) {{
    for (int y = 0; y < {prefix}_HEIGHT; ++y)
        for (int x = 0; x < {prefix}_WIDTH; ++x)
            keep[y][x] = {name}_critical[y][x] || {name}_next() >= {name}_drop_below;
}}

void {name}_run(const int8_t input[{prefix}_IN_CHANNELS][{prefix}_HEIGHT][{prefix}_WIDTH],
                const uint8_t keep[{prefix}_HEIGHT][{prefix}_WIDTH],
                int32_t output[{prefix}_OUT_CHANNELS][{prefix}_OUT_HEIGHT][{prefix}_OUT_WIDTH]) {{
    for (int oc = 0; oc < {prefix}_OUT_CHANNELS; ++oc)
        for (int oy = 0; oy < {prefix}_OUT_HEIGHT; ++oy)
            for (int ox = 0; ox < {prefix}_OUT_WIDTH; ++ox) {{
                int32_t acc = 0;
                for (int ic = 0; ic < {prefix}_IN_CHANNELS; ++ic)
                    for (int ky = 0; ky < {k_h}; ++ky)
                        for (int kx = 0; kx < {k_w}; ++kx) {{
                            const int iy = oy + ky - {layer.padding}, ix = ox + kx - {layer.padding};
                            if (iy < 0 || iy >= {prefix}_HEIGHT || ix < 0 || ix >= {prefix}_WIDTH) continue;
                            if (!keep[iy][ix]) continue; /* MACPruning: the MAC is skipped */
                            acc += (int32_t){name}_weights[oc][ic][ky][kx] * (int32_t)input[ic][iy][ix];
                        }}
                output[oc][oy][ox] = acc + {name}_bias[oc];
            }}
}}
"""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.h", folder / f"{name}.c"]
    for path, text in zip(paths, (header, source), strict=True):
        path.write_text(text)
    return paths


def _c_array(array: np.ndarray, float_format: bool = False) -> str:
    if array.ndim == 0:
        return f"{float(array)!r}f" if float_format else str(int(array))
    if array.ndim == 1:
        items = (f"{float(v)!r}f" if float_format else str(int(v)) for v in array)
        return "{" + ", ".join(items) + "}"
    return "{" + ", ".join(_c_array(part, float_format) for part in array) + "}"


def run_c_kernel(
    folder: Path, layer: QuantizedLayer, inputs: np.ndarray, keep: np.ndarray, name: str = "macprune_layer"
) -> np.ndarray:
    """Build the emitted C with the host's gcc as a shared library and run it on int8 ``inputs``
    [n, channels, h, w] with ``keep`` masks [n, h, w]; the int32 outputs, as ``accumulate`` gives them."""
    import ctypes
    import shutil
    import subprocess
    import tempfile

    compiler = shutil.which("gcc")
    if compiler is None:
        raise UserError("checking the emitted C kernel needs gcc", "apt-get install gcc (make test does)")
    out_c, _, k_h, k_w = layer.weights.shape
    out_shape = (out_c, layer.height + 2 * layer.padding - k_h + 1, layer.width + 2 * layer.padding - k_w + 1)
    with tempfile.TemporaryDirectory() as scratch:
        library = Path(scratch) / f"lib{name}.so"
        subprocess.run(
            [
                compiler,
                "-std=c99",
                "-O2",
                "-Wall",
                "-Werror",
                "-shared",
                "-fPIC",
                str(folder / f"{name}.c"),
                "-o",
                str(library),
            ],
            check=True,
            capture_output=True,
        )
        kernel = ctypes.CDLL(str(library))
        outputs = np.zeros((len(inputs), *out_shape), np.int32)
        for index in range(len(inputs)):
            image = np.ascontiguousarray(inputs[index], dtype=np.int8)
            mask = np.ascontiguousarray(keep[index], dtype=np.uint8)
            getattr(kernel, f"{name}_run")(
                image.ctypes.data_as(ctypes.c_void_p),
                mask.ctypes.data_as(ctypes.c_void_p),
                outputs[index].ctypes.data_as(ctypes.c_void_p),
            )
    return outputs
