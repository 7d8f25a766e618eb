"""Simulated EM traces of the first layer's MAC loop, as the emitted C kernel (``kernel``) runs it.

A Hamming-weight leakage model, the standard one for software on microcontrollers (Mangard, Oswald and
Popp, "Power Analysis Attacks", 2007): each executed MAC emits one sample, the Hamming weight of the int32
product or of the accumulator after it, plus Gaussian noise of deviation ``noise``; idle samples are noise
only. The window is one output position of every output channel: the kernel's loop order (output
channel, input channel, kernel row, kernel column), one MAC per weight. With MACPruning, the keep/skip
branch takes one sample per MAC slot and a skipped MAC emits nothing, so every later MAC moves earlier in
the trace by a per-trace random amount; the branch itself leaks with amplitude ``control_flow`` (the
Double Strike attack's leak; 0 = a balanced branch). ``jitter`` adds up to that many idle samples before
every slot (clock jitter, interrupts). The inputs are random int8 images the attacker chose and knows.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from redux_edge.errors import UserError
from redux_edge.leakage.kernel import QuantizedLayer

__all__ = ["LeakageModel", "Simulated", "hamming_weight", "simulate"]


@dataclasses.dataclass
class LeakageModel:
    intermediate: str = "product"  # "product" or "accumulator"
    noise: float = 1.0
    jitter: int = 0
    control_flow: float = 0.0

    def __post_init__(self) -> None:
        if self.intermediate not in ("product", "accumulator"):
            raise UserError(f"unknown leakage '{self.intermediate}'", "choose product or accumulator")
        if self.noise < 0 or self.jitter < 0 or self.control_flow < 0:
            raise UserError("noise, jitter and control-flow amplitude must be >= 0", "e.g. --noise 1")


@dataclasses.dataclass
class Simulated:
    samples: np.ndarray  # float32 [n, length]
    operands: np.ndarray  # int8 [n, weights]: the input each attacked weight is multiplied with
    keep: np.ndarray  # bool [n, weights]: whether that MAC ran (ground truth, not known to an attacker)


def hamming_weight(values: np.ndarray) -> np.ndarray:
    """Hamming weight of int32 two's-complement values."""
    as_bytes = np.ascontiguousarray(values.astype(np.int32)).view(np.uint8).reshape(*values.shape, 4)
    return np.unpackbits(as_bytes, axis=-1).sum(axis=-1, dtype=np.int32)


def window_pixels(layer: QuantizedLayer, position: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the input pixel each weight of ``position``'s window reads, in loop order."""
    out_c, in_c, k_h, k_w = layer.weights.shape
    rows = position[0] + np.arange(k_h) - layer.padding
    columns = position[1] + np.arange(k_w) - layer.padding
    if rows.min() < 0 or columns.min() < 0 or rows.max() >= layer.height or columns.max() >= layer.width:
        raise UserError(f"output position {position} reads padding", "choose an interior position")
    grid_rows, grid_columns = np.meshgrid(rows, columns, indexing="ij")
    shape = (out_c, in_c, k_h, k_w)
    return np.broadcast_to(grid_rows, shape).reshape(-1), np.broadcast_to(grid_columns, shape).reshape(-1)


def simulate(
    layer: QuantizedLayer,
    count: int,
    leakage: LeakageModel,
    protected: bool,
    position: tuple[int, int] | None = None,
    seed: int = 0,
    fixed_input: np.ndarray | None = None,
    channels: int | None = None,
) -> Simulated:
    """``count`` traces of the window at ``position`` (default: the centre) on random int8 inputs, or on
    ``fixed_input`` [channels, h, w] every time (the fixed set of a TVLA). ``channels`` keeps the first
    output channels only: the loop runs channel by channel, so their samples are exactly those of the
    whole window's start."""
    rng = np.random.default_rng(seed)
    out_c, in_c, k_h, k_w = layer.weights.shape
    out_c = min(out_c, channels or out_c)
    layer = dataclasses.replace(layer, weights=layer.weights[:out_c], bias=layer.bias[:out_c])
    position = position or (layer.height // 2, layer.width // 2)
    rows, columns = window_pixels(layer, position)
    channel_of = np.tile(np.repeat(np.arange(in_c), k_h * k_w), out_c)
    if fixed_input is not None:
        images = np.broadcast_to(fixed_input, (count, *fixed_input.shape))
    else:
        images = rng.integers(-128, 128, size=(count, in_c, layer.height, layer.width), dtype=np.int8)
    operands = images[:, channel_of, rows, columns].astype(np.int8)
    if protected:
        pixel_keep = layer.critical[None] | (rng.random((count, layer.height, layer.width)) >= layer.drop)
        keep = pixel_keep[:, rows, columns]
    else:
        keep = np.ones(operands.shape, dtype=bool)
    products = operands.astype(np.int32) * layer.weights.reshape(-1).astype(np.int32)[None]
    if leakage.intermediate == "product":
        values = hamming_weight(products)
    else:
        per_channel = (products * keep).reshape(count, out_c, -1)
        values = hamming_weight(np.cumsum(per_channel, axis=2).reshape(count, -1))
    return Simulated(_timeline(values, keep, protected, leakage, rng), operands, keep)


def _timeline(
    values: np.ndarray, keep: np.ndarray, protected: bool, leakage: LeakageModel, rng: np.random.Generator
) -> np.ndarray:
    """Place each slot's samples one after the other: idle jitter, the branch (protected kernels), the MAC
    if it ran. Traces are as long as the longest possible run; the tail is idle."""
    count, slots = values.shape
    idle = (
        rng.integers(0, leakage.jitter + 1, size=(count, slots))
        if leakage.jitter
        else np.zeros_like(keep, int)
    )
    branch = int(protected)
    width = idle + branch + keep
    ends = np.cumsum(width, axis=1)
    length = slots * (leakage.jitter + branch + 1)
    samples = (
        rng.normal(0.0, leakage.noise, size=(count, length)).astype(np.float32)
        if leakage.noise
        else np.zeros((count, length), np.float32)
    )
    trace_index = np.broadcast_to(np.arange(count)[:, None], (count, slots))
    mac_at = ends - 1
    samples[trace_index[keep], mac_at[keep]] += values[keep]
    if protected and leakage.control_flow:
        branch_at = ends - keep - 1
        samples[trace_index, branch_at] += leakage.control_flow * keep
    return samples
