"""The emulated aarch64 board, seen from a compile: where it lives and how an arm64 artifact runs on it.

``tools/emulated_aarch64.py`` (run by ``make test``, or ``make aarch64-board``) builds it in ``BOARD_DIR``:
Debian arm64's Python 3.11 and PyPI's aarch64 wheels of numpy, onnxruntime and apache-tvm, under
``qemu-aarch64-static`` (``redux_edge/deploy/emulated.py`` says more). When it is there, a compile for an
arm64 target runs the bundle's own runner on it, on the emulated core of the target, so an arm64 artifact
is verified as aarch64 code, not only cross-compiled.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from redux_edge.files import save_arrays
from redux_edge.targets import Target

__all__ = [
    "BOARD_CPUS",
    "BOARD_DIR",
    "ORT_UNDER_QEMU",
    "BoardRun",
    "BoardUnavailable",
    "board_python",
    "board_runner",
]

BoardRun = Callable[[dict[str, np.ndarray]], list[np.ndarray]]

BOARD_DIR = Path(sys.prefix) / "share" / "redux-edge" / "aarch64-board"
# onnxruntime's aarch64 wheels from 1.28 on crash on import under Debian bookworm's qemu 7.2 (a SIGSEGV
# loading the extension, measured for 1.28.0, 1.30.0 and 1.31.1); 1.27.0 is the newest that runs there.
ORT_UNDER_QEMU = "1.27.0"
# The CPUs of the arm64 targets, oldest first, each emulated by its qemu model (``bin/python3-<cpu>``).
BOARD_CPUS = ("cortex-a72", "cortex-a76")
# qemu translates every instruction: MiniLM's batch of 8 took 61 s as a cortex-a72.
_BOARD_TIMEOUT_S = 900


def board_python(cpu: str | None = None) -> Path | None:
    """The emulated board's Python for ``cpu`` (default: the oldest), None when it is not set up here."""
    launcher = BOARD_DIR / "bin" / (f"python3-{cpu}" if cpu else "python3")
    return launcher if (BOARD_DIR / ".ready").is_file() and launcher.is_file() else None


class BoardUnavailable(Exception):
    """The emulated board could not run an artifact for a reason of its own (not the model's)."""


def board_runner(stage: Path, target: Target) -> tuple[BoardRun | None, str]:
    """``run(feeds) -> outputs`` of the bundle being built in ``stage`` through its own runner on the
    emulated board, as the target's core (a family: its oldest), and how it runs; (None, why not) where
    there is no board. ``run`` raises ``BoardUnavailable`` where the board fails of itself."""
    cpu = target.cpu if target.cpu in BOARD_CPUS else BOARD_CPUS[0]
    python = board_python(cpu)
    if python is None:
        return None, "no emulated aarch64 board here (make aarch64-board builds it)"
    how = f"ran on the emulated aarch64 board (qemu {cpu}, onnxruntime {ORT_UNDER_QEMU})"
    names = [output["name"] for output in json.loads((stage / "manifest.json").read_text())["outputs"]]
    return (lambda feeds: _run_on_board(python, stage, feeds, names)), how


def _run_on_board(
    python: Path, stage: Path, feeds: dict[str, np.ndarray], names: list[str]
) -> list[np.ndarray]:
    with tempfile.TemporaryDirectory(prefix="redux-edge-board-") as scratch:
        inputs, outputs = Path(scratch) / "inputs.npz", Path(scratch) / "outputs.npz"
        save_arrays(inputs, feeds)
        command = [
            str(python),
            str(stage / "runner" / "run.py"),
            "--inputs",
            str(inputs),
            "--outputs",
            str(outputs),
        ]
        try:
            ran = subprocess.run(command, capture_output=True, text=True, timeout=_BOARD_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise BoardUnavailable(f"the emulated board did not finish within {_BOARD_TIMEOUT_S} s") from exc
        if ran.returncode != 0:
            # The board's runtimes are older than a device's may be (ORT_UNDER_QEMU): not the model's fault.
            last = (ran.stderr.strip().splitlines() or ["no message"])[-1]
            raise BoardUnavailable(f"the emulated board could not run it: {last}")
        with np.load(outputs, allow_pickle=False) as archive:
            return [archive[name] for name in names]
