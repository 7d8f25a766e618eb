"""Files from users are untrusted: the one rule per format, applied where such a file comes in.

- A path that a file names (a weight index, ``modules.json``, a manifest, external data, an HDF5 link, a
  ChipWhisperer config) is resolved, links followed, and must stay inside the folder it belongs to.
- Sizes, offsets and counts in headers (safetensors, ``.npy`` and ``.npz`` members) are checked against the
  file and against the memory budget before anything is allocated.
- Structured text (JSON, TOML) is UTF-8, nested at most ``MAX_DEPTH`` deep (Python's parsers recurse, and a
  document 100,000 levels deep exhausts the interpreter's stack), and whoever reads a value checks its type.

Every refusal is a ``UserError``: one line naming the file and what is wrong with it.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from redux_edge.errors import UserError

__all__ = [
    "MAX_DEPTH",
    "check_depth",
    "check_memory",
    "inside",
    "memory_budget",
    "npy_members",
    "read_json",
    "read_toml",
    "safetensors_tensors",
]

MAX_DEPTH = 64


def inside(folder: Path, name: str, what: str) -> Path:
    """``folder / name`` resolved (links followed); refused when it is absolute, holds a NUL byte or leads
    outside ``folder``. ``what`` names the file that gave ``name``, for the message."""
    root = Path(folder).resolve()
    if not isinstance(name, str) or "\x00" in name or Path(name).is_absolute():
        raise UserError(
            f"{what} names the path {name!r}, which is not relative to its folder",
            "paths inside a model or bundle must be relative and stay in its folder",
        )
    target = (root / name).resolve()
    if not target.is_relative_to(root):
        raise UserError(
            f"{what} names {name}, which leads outside its folder {folder}",
            "paths inside a model or bundle must stay in its folder; a file there may not link outside",
        )
    return target


def check_depth(value: object, what: str, limit: int = MAX_DEPTH) -> None:
    """Refuse containers nested deeper than ``limit`` (iteratively: the check itself must not recurse)."""
    pending: list[tuple[object, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if depth > limit:
            raise UserError(
                f"{what} is nested more than {limit} levels deep", "no real file is; fix the file"
            )
        if isinstance(item, dict):
            pending.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            pending.extend((child, depth + 1) for child in item)


def _decoded(path: Path, hint: str) -> str:
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})", hint
        ) from exc
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}", hint) from exc


def read_json(path: Path, hint: str) -> Any:
    """A JSON document from ``path``, UTF-8 and at most ``MAX_DEPTH`` deep."""
    return _parsed(path, hint, json.loads, json.JSONDecodeError, "JSON")


def read_toml(path: Path, hint: str) -> dict[str, Any]:
    """A TOML document from ``path``, UTF-8 and at most ``MAX_DEPTH`` deep."""
    return _parsed(path, hint, tomllib.loads, tomllib.TOMLDecodeError, "TOML")


def _parsed(path: Path, hint: str, parse: Callable[[str], Any], invalid: type[Exception], kind: str) -> Any:
    try:
        value = parse(_decoded(path, hint))
    except invalid as exc:
        raise UserError(f"{path} is not valid {kind}: {exc}", hint) from exc
    except RecursionError as exc:
        raise UserError(f"{path} is nested too deeply to read", hint) from exc
    check_depth(value, str(path))
    return value


def memory_budget() -> int:
    """The bytes one file's contents may take in memory: half of this machine's physical memory."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError):
        return 8 << 30


def check_memory(nbytes: float, what: str, hint: str) -> None:
    budget = memory_budget()
    if nbytes > budget:
        raise UserError(
            f"{what} would take {nbytes / 2**30:,.1f} GiB in memory, more than the "
            f"{budget / 2**30:.1f} GiB (half of this machine's memory) one file may take",
            hint,
        )


# safetensors' element types and their sizes in bits (sub-byte types are packed).
_SAFETENSORS_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FN": 8, "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
# The library refuses headers above 100 MB; a real one is a few hundred KiB.
_SAFETENSORS_HEADER_LIMIT = 100_000_000


def safetensors_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} of a safetensors file whose header has been checked against the file: a
    length inside it, UTF-8 JSON, known element types, non-negative shapes whose bytes equal their data
    offsets, and the data laid end to end without gaps or overlaps, ending at the file's end."""
    hint = "the weights file is damaged or not safetensors; save it again with safetensors"
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise UserError(f"{path} is not a safetensors file ({size} bytes, no header)", hint)
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, _SAFETENSORS_HEADER_LIMIT):
            raise UserError(f"{path}: its header claims {length:,} bytes, and the file holds {size:,}", hint)
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"{path}: its header is not UTF-8 JSON ({exc})", hint) from exc
    if not isinstance(header, dict):
        raise UserError(f"{path}: its header is not a table of tensors", hint)
    header.pop("__metadata__", None)
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            valid = (
                dtype in _SAFETENSORS_BITS
                and all(type(n) is int and n >= 0 for n in [*shape, begin, end])
                and begin <= end
            )
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise UserError(f"{path}: tensor '{name}' has an unreadable dtype, shape or offsets", hint)
        if (end - begin) * 8 != math.prod(shape) * _SAFETENSORS_BITS[dtype]:
            raise UserError(
                f"{path}: tensor '{name}' is {dtype} {list(shape)} but its data is {end - begin:,} bytes",
                hint,
            )
        tensors[name] = (dtype, tuple(shape))
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            where = "overlaps the one before it" if begin < position else "leaves a gap before it"
            raise UserError(f"{path}: tensor '{name}' {where}", hint)
        position = end
    if 8 + length + position != size:
        raise UserError(
            f"{path}: its tensors end at byte {8 + length + position:,}, the file at {size:,}", hint
        )
    return tensors


_NPY_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _npy_header(handle: IO[bytes] | _Counted, what: str, room: int, hint: str) -> None:
    """Check one .npy header: a plain dtype, and data that fits ``room`` bytes and the memory budget."""
    try:
        version = np.lib.format.read_magic(handle)
        if version not in _NPY_READERS:
            raise ValueError(f".npy format version {version} (numpy.save writes 1.0 and 2.0)")
        shape, _, dtype = _NPY_READERS[version](handle)
    except Exception as exc:  # numpy parses the header as a Python literal: any error is the file's
        raise UserError(f"cannot read {what}: {type(exc).__name__}: {exc}", hint) from exc
    if dtype.hasobject:
        raise UserError(f"{what} holds Python objects, which are never unpickled", hint)
    if any(not isinstance(size, int) or size < 0 for size in shape):
        raise UserError(f"{what} declares the shape {list(shape)}, which no array has", hint)
    nbytes = math.prod(shape) * dtype.itemsize
    check_memory(nbytes, what, hint)
    if nbytes > room - handle.tell():
        raise UserError(
            f"{what} declares {list(shape)} {dtype} ({nbytes:,} bytes) and holds {room - handle.tell():,}",
            hint,
        )


def npy_members(path: Path, hint: str) -> None:
    """Check every array header of a ``.npy`` file or ``.npz`` archive before numpy allocates for it."""
    if path.is_file() and zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                members = archive.infolist()
                check_memory(sum(m.file_size for m in members), str(path), hint)
                for member in members:
                    with archive.open(member) as handle:
                        _npy_header(_Counted(handle), f"{path}:{member.filename}", member.file_size, hint)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError) as exc:
            raise UserError(f"cannot read {path}: {exc}", hint) from exc
        return
    try:
        with path.open("rb") as handle:
            _npy_header(handle, str(path), path.stat().st_size, hint)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}", hint) from exc


class _Counted:
    """A zip member stream that knows how far it has been read (``tell`` is not offered by every one)."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle, self._read = handle, 0

    def read(self, count: int = -1) -> bytes:
        data = self._handle.read(count)
        self._read += len(data)
        return data

    def tell(self) -> int:
        return self._read
