"""An emulated aarch64 board on an x86-64 machine: Debian arm64's Python 3.11 under ``qemu-aarch64-static``.

``tools/emulated_aarch64.py`` (run by ``make test``) builds it in ``BOARD_DIR``: ``root/`` (Debian
bookworm's arm64 packages of Python 3.11 and the C libraries it needs, extracted, not installed),
``site/`` (PyPI's aarch64 wheels of numpy, onnxruntime and apache-tvm: what a board's user would
``pip install``) and ``bin/python3``, the interpreter a ``local`` device names::

    redux-edge devices add pi-emulated --target arm64-cortex-a72 --address local --root /tmp/pi \
        --python .venv/share/redux-edge/aarch64-board/bin/python3

Then ``flash``, the health check and ``profile`` run an arm64 bundle's own runner on aarch64 code. Every
figure from it is emulated: qemu translates each instruction, so absolute times say nothing about a
board; ratios between backends on the same emulated CPU are what it is for. The board's Python sets
``REDUX_EDGE_EMULATED``, which ``devices check`` and every ``profile`` record carry. qemu emulates the
target's own core (``QEMU_CPU``): its ``max`` CPU adds SVE, which sent ONNX Runtime's kernels down paths
more than 2.5x slower under emulation (MiniLM, one batch of 8: over 150 s against 61 s as cortex-a72).
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["BOARD_CPUS", "BOARD_DIR", "ORT_UNDER_QEMU", "board_python"]

BOARD_DIR = Path(sys.prefix) / "share" / "redux-edge" / "aarch64-board"
# onnxruntime's aarch64 wheels from 1.28 on crash on import under Debian bookworm's qemu 7.2 (a SIGSEGV
# loading the extension, measured for 1.28.0, 1.30.0 and 1.31.1); 1.27.0 is the newest that runs there.
ORT_UNDER_QEMU = "1.27.0"
# The CPUs of the arm64 targets, oldest first, each emulated by its qemu model (``bin/python3-<cpu>``).
BOARD_CPUS = ("cortex-a72", "cortex-a76")


def board_python(cpu: str | None = None) -> Path | None:
    """The emulated board's Python for ``cpu`` (default: the oldest), None when it is not set up here."""
    launcher = BOARD_DIR / "bin" / (f"python3-{cpu}" if cpu else "python3")
    return launcher if (BOARD_DIR / ".ready").is_file() and launcher.is_file() else None
