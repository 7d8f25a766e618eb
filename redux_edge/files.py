"""Files: writing one so that readers see the old content or the new, never half of the new; digests.

``write_atomically`` is the one writer every output of redux-edge that is a single file goes through
(mask plans, adapter packs, leakage reports, profiles, training artifacts, the device registry): the
content goes to a uniquely named hidden sibling, which is renamed over the target only once complete.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from redux_edge.errors import UserError

__all__ = ["file_digest", "human_bytes", "save_arrays", "write_atomically"]


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write(temporary)`` beside ``path``, then rename over it (atomic within one file system). A
    failure to write (full disk, no permission) is the user's to fix and leaves no temporary file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        os.close(handle)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}", "choose another path") from exc
    partial = Path(name)
    try:
        write(partial)
        partial.replace(path)
    except OSError as exc:
        raise UserError(
            f"cannot write {path}: {exc.strerror or exc}", "free disk space or choose another path"
        ) from exc
    finally:
        partial.unlink(missing_ok=True)


def file_digest(path: Path) -> str:
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError("unreachable")


def save_arrays(target: Path | IO[bytes], arrays: Mapping[str, np.ndarray], compressed: bool = False) -> None:
    """Named arrays as an .npz (never pickled); a path is written as given, without numpy's .npz suffix."""
    save: Any = np.savez_compressed if compressed else np.savez
    if isinstance(target, Path):
        with target.open("wb") as handle:
            save(handle, **arrays)
    else:
        save(target, **arrays)
