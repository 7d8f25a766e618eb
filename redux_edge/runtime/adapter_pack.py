"""The adapter-pack format, read on the device and written by training: one task's low-bit LoRA factors
and head in a few KB.

``RXADPT1\n``, a little-endian uint32 length, a zlib-compressed JSON header (task, labels, bits, rank,
metrics, factor shapes per weight, head shape), then per weight the bit-packed codes and float16 scales of
``down`` and ``up``, then the float16 head and bias. Codes are unsigned ``bits``-bit integers, most
significant bit first (1 bit: the sign; more: offset by 2^(bits-1)); 32 bits stores float32 factors.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = [
    "MAGIC",
    "adapter_initializers",
    "encode_adapter_pack",
    "parse_adapter_pack",
    "read_adapter_pack",
    "with_metrics",
]

MAGIC = b"RXADPT1\n"


def encode_adapter_pack(
    header: dict,
    factors: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
    head: np.ndarray,
    bias: np.ndarray,
) -> bytes:
    """The bytes of a pack: ``factors`` maps weight -> {"down"|"up": (integer codes, scales)}."""
    blobs = []
    for parts in factors.values():
        for codes, scales in (parts["down"], parts["up"]):
            blobs += [_pack_codes(codes, header["bits"]), scales.astype(np.float16).tobytes()]
    blobs += [head.astype(np.float16).tobytes(), bias.astype(np.float16).tobytes()]
    compressed = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    return MAGIC + struct.pack("<I", len(compressed)) + compressed + b"".join(blobs)


def with_metrics(blob: bytes, metrics: dict) -> bytes:
    """The same pack with ``metrics`` (e.g. measured accuracy) in its header."""
    length = int.from_bytes(blob[8:12], "little")
    header = json.loads(zlib.decompress(blob[12 : 12 + length])) | {"metrics": metrics}
    compressed = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    return MAGIC + struct.pack("<I", len(compressed)) + compressed + blob[12 + length :]


def _pack_codes(codes: np.ndarray, bits: int) -> bytes:
    if bits == 32:
        return codes.astype(np.float32).tobytes()
    unsigned = (codes > 0).astype(np.uint8) if bits == 1 else (codes + 2 ** (bits - 1)).astype(np.uint8)
    planes = np.unpackbits(unsigned.reshape(-1, 1), axis=1)[:, 8 - bits :]
    return np.packbits(planes.reshape(-1)).tobytes()


def read_adapter_pack(path: Path) -> dict:
    return parse_adapter_pack(Path(path).read_bytes(), str(path))


def parse_adapter_pack(blob: bytes, origin: str = "the pack") -> dict:
    """An adapter pack (written by redux_edge/train/adapters.py): its header, and per target weight the
    dequantized LoRA factors ``down`` [rank, in] and ``up`` [out, rank] (scaling included), and the head."""
    if not blob.startswith(MAGIC):
        raise ValueError(f"{origin} is not a redux-edge adapter pack")
    length = int.from_bytes(blob[8:12], "little")
    header = json.loads(zlib.decompress(blob[12 : 12 + length]))
    offset, bits = 12 + length, header["bits"]

    def take(count: int, dtype: type) -> np.ndarray:
        nonlocal offset
        size = count * np.dtype(dtype).itemsize
        array: np.ndarray = np.frombuffer(blob, dtype, count, offset)
        offset += size
        return array

    def factor(shape: list[int]) -> np.ndarray:
        nonlocal offset
        count = shape[0] * shape[1]
        if bits == 32:
            codes = take(count, np.float32)
        else:
            raw = np.frombuffer(blob, np.uint8, (count * bits + 7) // 8, offset)
            offset += raw.size
            planes = np.unpackbits(raw)[: count * bits].reshape(count, bits).astype(np.int64)
            unsigned = planes @ (1 << np.arange(bits - 1, -1, -1))
            codes = unsigned * 2 - 1 if bits == 1 else unsigned - 2 ** (bits - 1)
        scales = take(shape[0], np.float16).astype(np.float32)
        return (codes.reshape(shape) * scales[:, None]).astype(np.float32)

    factors = {
        name: {part: factor(shapes[part]) for part in ("down", "up")}
        for name, shapes in header["factors"].items()
    }
    classes, hidden = header["head"]
    head = take(classes * hidden, np.float16).reshape(classes, hidden).astype(np.float32)
    bias = take(classes, np.float16).astype(np.float32)
    if offset != len(blob):
        raise ValueError(f"{origin} is {len(blob)} bytes, its header describes {offset}")
    return {"header": header, "factors": factors, "head_weight": head, "head_bias": bias}


def adapter_initializers(pack: dict, names: dict) -> dict[str, np.ndarray]:
    """The graph initializers (``names`` from the manifest's adapters entry) holding ``pack``: factors
    transposed to the graph's [in, rank] and [rank, out], the head as [hidden, classes]."""
    values = {}
    for weight, parts in names["factors"].items():
        values[parts["down"]] = np.ascontiguousarray(pack["factors"][weight]["down"].T)
        values[parts["up"]] = np.ascontiguousarray(pack["factors"][weight]["up"].T)
    values[names["head_weight"]] = np.ascontiguousarray(pack["head_weight"].T)
    values[names["head_bias"]] = pack["head_bias"]
    return values
