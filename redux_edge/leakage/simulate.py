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

A layer with hiding (``hiding="shuffle"``, the kernel in ``c_source``) has no branch: every MAC of the
window runs, a dropped pixel's on a random fill value; the window is then all the MACs of the output
position (every output channel), which the kernel runs in a fresh random order of two levels: each
trace takes the channels in a uniform permutation and each channel's MACs in one of their own, so every
MAC can be at any MAC slot of the window (``shuffle_span`` < all: one permutation within each span of that
many consecutive MACs, a weaker shuffle to test attacks with). The branchless select of each window
pixel's operand leaks the pixel's keep bit with amplitude ``control_flow``, one sample per pixel before
the MACs. ``masking=False`` simulates the shuffle alone (every pixel kept).
"""

from __future__ import annotations

import dataclasses
import math

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
        numbers = (self.noise, self.jitter, self.control_flow)
        if not all(math.isfinite(number) and number >= 0 for number in numbers):
            raise UserError(
                "noise, jitter and control-flow amplitude must be finite numbers >= 0", "e.g. --noise 1"
            )


@dataclasses.dataclass
class Simulated:
    samples: np.ndarray  # float32 [n, length]
    operands: np.ndarray  # int8 [n, weights]: the input each attacked weight is multiplied with
    keep: np.ndarray  # bool [n, weights]: whether that MAC ran (ground truth, not known to an attacker)


def hamming_weight(values: np.ndarray) -> np.ndarray:
    """Hamming weight of int32 two's-complement values."""
    return np.bitwise_count(values.astype(np.int32).view(np.uint32)).astype(np.int32)


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
    shuffle_span: int | None = None,
    masking: bool = True,
) -> Simulated:
    """``count`` traces of the window at ``position`` (default: the centre) on random int8 inputs, or on
    ``fixed_input`` [channels, h, w] every time (the fixed set of a TVLA). ``channels`` attacks the first
    output channels only: without hiding the loop runs channel by channel, so their samples are exactly
    those of the whole window's start; with hiding the other channels' MACs stay in the trace."""
    rng = np.random.default_rng(seed)
    out_c = min(len(layer.weights), channels or len(layer.weights))
    if protected and layer.hiding == "shuffle":
        return _shuffled(layer, count, leakage, position, rng, fixed_input, out_c, shuffle_span, masking)
    layer = dataclasses.replace(layer, weights=layer.weights[:out_c], bias=layer.bias[:out_c])
    rows, columns, operands = _window(layer, count, rng, fixed_input, position)
    if protected:
        keep = _pixel_keep(layer, count, rng)[:, rows, columns]
    else:
        keep = np.ones(operands.shape, dtype=bool)
    products = operands.astype(np.int32) * layer.weights.reshape(-1).astype(np.int32)[None]
    if leakage.intermediate == "product":
        values = hamming_weight(products)
    else:
        per_channel = (products * keep).reshape(count, out_c, -1)
        values = hamming_weight(np.cumsum(per_channel, axis=2).reshape(count, -1))
    return Simulated(_timeline(values, keep, protected, leakage, rng), operands, keep)


def _window(
    layer: QuantizedLayer,
    count: int,
    rng: np.random.Generator,
    fixed_input: np.ndarray | None,
    position: tuple[int, int] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, columns) of the pixel each weight of the window reads, in loop order, and the int8 inputs
    [n, weights] it multiplies: random images, or ``fixed_input`` every time."""
    out_c, in_c, k_h, k_w = layer.weights.shape
    rows, columns = window_pixels(layer, position or (layer.height // 2, layer.width // 2))
    channel_of = np.tile(np.repeat(np.arange(in_c), k_h * k_w), out_c)
    if fixed_input is not None:
        images = np.broadcast_to(fixed_input, (count, *fixed_input.shape))
    else:
        images = rng.integers(-128, 128, size=(count, in_c, layer.height, layer.width), dtype=np.int8)
    return rows, columns, images[:, channel_of, rows, columns].astype(np.int8)


def _pixel_keep(layer: QuantizedLayer, count: int, rng: np.random.Generator) -> np.ndarray:
    """Each trace's pixel mask [n, h, w], as the kernel draws it: critical pixels always kept."""
    return layer.critical[None] | (rng.random((count, layer.height, layer.width)) >= layer.drop)


def shuffle_prefix(layer: QuantizedLayer) -> int:
    """Samples before the MACs in a trace of the kernel with hiding: one select per window pixel."""
    return int(np.prod(layer.weights.shape[1:]))


def _shuffled(
    layer: QuantizedLayer,
    count: int,
    leakage: LeakageModel,
    position: tuple[int, int] | None,
    rng: np.random.Generator,
    fixed_input: np.ndarray | None,
    attacked: int,
    shuffle_span: int | None,
    masking: bool,
) -> Simulated:
    out_c, in_c, k_h, k_w = layer.weights.shape
    slots = out_c * in_c * k_h * k_w
    span = min(shuffle_span or slots, slots)
    rows, columns, operands = _window(layer, count, rng, fixed_input, position)
    if masking:
        keep = _pixel_keep(layer, count, rng)[:, rows, columns]
    else:
        keep = np.ones(operands.shape, dtype=bool)
    fill = rng.integers(layer.fill_low, layer.fill_high + 1, size=operands.shape)
    executed = np.where(keep, operands.astype(np.int32), fill.astype(np.int32))
    products = executed * layer.weights.reshape(-1).astype(np.int32)[None]
    per_channel = in_c * k_h * k_w
    # order[n, t]: the slot run at time t.
    if span == slots:  # the kernel's: channels in a random order, each channel's MACs in one of their own
        channels = np.argsort(rng.random((count, out_c)), axis=1)
        taps = np.argsort(rng.random((count, out_c, per_channel)), axis=2)
        order = (channels[:, :, None] * per_channel + taps).reshape(count, slots)
    else:  # a permutation within each span of consecutive slots
        order = np.argsort(np.arange(slots)[None] // span + rng.random((count, slots)), axis=1)
    in_time = np.take_along_axis(products, order, axis=1)
    if leakage.intermediate == "product":
        values = hamming_weight(in_time)
    else:
        channel_in_time = order // per_channel
        running = np.zeros_like(in_time)
        for channel in range(out_c):
            mine = channel_in_time == channel
            # The kernel's accumulator starts at the channel's bias.
            partial = layer.bias[channel] + np.cumsum(np.where(mine, in_time, 0), axis=1)
            running = np.where(mine, partial, running)
        values = hamming_weight(running)
    macs = _timeline(values, np.ones_like(values, dtype=bool), False, leakage, rng)
    # The first output channel's slots read each window pixel once: their keep bits are the pixels'.
    window_keep = keep[:, : in_c * k_h * k_w]
    selects = rng.normal(0.0, leakage.noise, size=window_keep.shape).astype(np.float32)
    selects += leakage.control_flow * window_keep
    weights = attacked * in_c * k_h * k_w
    return Simulated(np.concatenate([selects, macs], axis=1), operands[:, :weights], keep[:, :weights])


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
