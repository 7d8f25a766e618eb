"""The simulator's noise level, measured on a capture: how far one Hamming-weight bit stands above the noise.

The simulator (``simulate``) emits HW(intermediate) + N(0, sigma^2) per MAC, so its ``noise`` is the
noise's deviation in units of one leaking bit. On a capture with known intermediate values (AES's
first-round S-box outputs under a known key, the usual calibration run on a microcontroller), each value's
leak is fitted at the sample where it correlates best: sample = offset + slope * HW(value) + residual, and
the noise is std(residual) / |slope|. The residual holds everything that is not this value's Hamming
weight (the scope's noise and the rest of the chip's switching), which is what blurs a single-sample CPA
on the device. Mangard's SNR (Var over classes of the class means / mean class variance, "Hardware
countermeasures against DPA", CT-RSA 2004) is reported beside it. Statistics are accumulated per HW class
chunk by chunk, so a capture larger than memory can be measured.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from redux_edge.datasets import captures
from redux_edge.errors import UserError
from redux_edge.leakage import traces
from redux_edge.untrusted import npy_members

__all__ = ["NoiseFit", "aes_sbox_outputs", "fit_noise", "measure", "summary"]

_CHUNK = 500


@dataclasses.dataclass(frozen=True)
class NoiseFit:
    value: int  # column of the known values
    sample: int  # where that value leaks most (largest |correlation|)
    correlation: float
    snr: float
    noise: float  # residual deviation in units of one Hamming-weight bit: the simulator's sigma


def _sbox() -> np.ndarray:
    def multiply(a: int, b: int) -> int:
        product = 0
        while b:
            if b & 1:
                product ^= a
            a = ((a << 1) ^ (0x1B if a & 0x80 else 0)) & 0xFF
            b >>= 1
        return product

    table = np.empty(256, dtype=np.uint8)
    for x in range(256):
        inverse = 1
        for _ in range(254):  # x^254 is x's inverse in GF(2^8), and 0 maps to 0
            inverse = multiply(inverse, x)
        rotated = [((inverse << n) | (inverse >> (8 - n))) & 0xFF for n in range(5)]
        table[x] = rotated[0] ^ rotated[1] ^ rotated[2] ^ rotated[3] ^ rotated[4] ^ 0x63
    return table


_SBOX = _sbox()


def aes_sbox_outputs(plaintext: np.ndarray, key: np.ndarray) -> np.ndarray:
    """First-round S-box outputs SubBytes(plaintext ^ key), uint8 [traces, 16]."""
    plaintext, key = np.asarray(plaintext), np.asarray(key)
    if plaintext.ndim != 2 or plaintext.shape[1] != 16 or key.shape != (16,):
        raise UserError(
            f"AES needs 16 plaintext bytes per trace and a 16-byte key, got {list(plaintext.shape)} and "
            f"{list(key.shape)}",
            "give the capture's textin and its key",
        )
    return _SBOX[plaintext.astype(np.uint8) ^ key.astype(np.uint8)]


def fit_noise(chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> list[NoiseFit]:
    """One fit per column of the known values; ``chunks`` yields (samples [m, length], values [m, k])."""
    totals: list[np.ndarray] = []  # per (value, HW class): count; per sample too: sum, sum of squares
    for samples, values in chunks:
        values = np.asarray(values)
        if not np.issubdtype(values.dtype, np.integer) or values.ndim != 2:
            raise UserError(f"known values must be integers [traces, k], got {values.dtype}", "store ints")
        classes = values.dtype.itemsize * 8 + 1
        if not totals:
            shape = (values.shape[1], classes, samples.shape[1])
            totals = [np.zeros(shape[:2]), np.zeros(shape), np.zeros(shape)]
        weights = np.bitwise_count(values.view(np.dtype(f"u{values.dtype.itemsize}")))
        member = (weights[:, :, None] == np.arange(classes)).astype(np.float64)  # [m, k, classes]
        samples = np.asarray(samples, dtype=np.float64)
        totals[0] += member.sum(0)
        totals[1] += np.einsum("mkc,ml->kcl", member, samples)
        totals[2] += np.einsum("mkc,ml->kcl", member, samples * samples)
    if not totals or totals[0].sum(1).min() < 3:
        raise UserError("too few traces to measure the noise", "give at least a few hundred traces")
    counts, sums, squares = totals
    return [_fit(column, counts[column], sums[column], squares[column]) for column in range(len(counts))]


def _fit(column: int, count: np.ndarray, total: np.ndarray, square: np.ndarray) -> NoiseFit:
    traces = count.sum()
    weight = np.arange(len(count), dtype=np.float64)
    mean_weight = (count * weight).sum() / traces
    weight_var = (count * (weight - mean_weight) ** 2).sum() / traces
    mean = total.sum(0) / traces
    sample_var = square.sum(0) / traces - mean**2
    covariance = (weight[:, None] * total).sum(0) / traces - mean_weight * mean
    correlation = covariance / np.sqrt(weight_var * np.maximum(sample_var, 1e-30))
    at = int(np.argmax(np.abs(correlation)))
    slope = covariance[at] / weight_var
    residual_var = max(sample_var[at] - slope**2 * weight_var, 0.0)
    seen = count > 1
    class_mean = total[seen, at] / count[seen]
    class_var = square[seen, at] / count[seen] - class_mean**2
    signal = np.average((class_mean - mean[at]) ** 2, weights=count[seen])
    return NoiseFit(
        value=column,
        sample=at,
        correlation=float(correlation[at]),
        snr=float(signal / max(np.average(class_var, weights=count[seen]), 1e-30)),
        noise=float(np.sqrt(residual_var) / max(abs(slope), 1e-30)),
    )


def summary(fits: list[NoiseFit], source: str, traces: int) -> dict:
    noise = np.array([fit.noise for fit in fits])
    return {
        "source": source,
        "traces": traces,
        "values": len(fits),
        "noise": round(float(np.median(noise)), 3),
        "noise_range": [round(float(noise.min()), 3), round(float(noise.max()), 3)],
        "snr_median": round(float(np.median([fit.snr for fit in fits])), 2),
        "correlation_median": round(float(np.median([abs(fit.correlation) for fit in fits])), 3),
        "fits": [dataclasses.asdict(fit) for fit in fits],
    }


def measure(
    path: Path | None = None,
    inputs: Path | None = None,
    aes_key: str | None = None,
    values: Path | None = None,
) -> dict:
    """The noise of a capture: the packaged ChipWhisperer STM32F303 one when ``path`` is None, else a trace
    file (any ``traces`` format) with its known values given as an AES key (the values are then the
    first-round S-box outputs of its inputs) or as a ``.npy`` of integers [traces, k]."""
    if path is None:
        capture = captures.chipwhisperer_stm32f3()
        known = aes_sbox_outputs(capture.plaintext, capture.key)
        rows = (capture.samples[start : start + _CHUNK] for start in range(0, len(known), _CHUNK))
        return summary(fit_noise(_paired(rows, known)), capture.source, len(known))

    if (aes_key is None) == (values is None):
        raise UserError("say what the capture computed", "give --aes-key HEX or --values values.npy")
    trace_set = traces.read_traces(path, inputs)
    if aes_key is not None:
        known = aes_sbox_outputs(trace_set.operands.view(np.uint8), _key(aes_key))
    else:
        assert values is not None
        known = _known_values(values, len(trace_set))
    rows = (chunk for chunk, _ in trace_set.chunks(_CHUNK))
    return summary(fit_noise(_paired(rows, known)), str(path), len(known))


def _paired(rows: Iterable[np.ndarray], known: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    start = 0
    for chunk in rows:
        yield chunk, known[start : start + len(chunk)]
        start += len(chunk)


def _key(text: str) -> np.ndarray:
    try:
        key = np.frombuffer(bytes.fromhex(text), dtype=np.uint8)
    except ValueError as exc:
        raise UserError(f"--aes-key {text!r} is not hex", "give 32 hex digits") from exc
    if key.shape != (16,):
        raise UserError(f"--aes-key has {len(key)} bytes, AES-128 has 16", "give 32 hex digits")
    return key


def _known_values(path: Path, traces: int) -> np.ndarray:
    npy_members(path, "store an integer .npy [traces, k]")
    try:
        known = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UserError(f"cannot read --values {path}: {exc}", "store an integer .npy [traces, k]") from exc
    if known.ndim == 1:
        known = known[:, None]
    if known.ndim != 2 or len(known) != traces or not np.issubdtype(known.dtype, np.integer):
        raise UserError(
            f"--values {path} is {known.dtype} {list(known.shape)}, the capture has {traces} traces",
            "give one row of integer values per trace",
        )
    return known
