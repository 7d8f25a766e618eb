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

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

from redux_edge.backends.board import board_python

__all__ = ["board_rpc_tracker"]

# The board's TVM imports in about 10 s under qemu; its RPC server registers with the tracker after that.
_RPC_START_TIMEOUT_S = 180


@contextlib.contextmanager
def board_rpc_tracker(cpu: str, key: str) -> Iterator[str]:
    """A TVM RPC tracker on this machine with the emulated board's RPC server registered under ``key``,
    for ``compile --backend tvm --tune N --rpc-tracker ADDRESS --rpc-key KEY``; yields ADDRESS. Both
    processes stop on exit. Tuning measures every candidate on the emulated core, so the schedules it
    picks are those that are fast under qemu, a stand-in for measuring on a board."""
    python = board_python(cpu)
    if python is None:
        raise RuntimeError("no emulated aarch64 board: run make aarch64-board (as root)")
    tracker_port, server_port = _free_port(), _free_port()
    tracker = [sys.executable, "-m", "tvm.exec.rpc_tracker", *_listen_on(tracker_port)]
    server = [str(python), "-m", "tvm.exec.rpc_server", *_listen_on(server_port)]
    server += ["--tracker", f"127.0.0.1:{tracker_port}", "--key", key]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_process(tracker))
        _wait_listening(tracker_port)
        stack.enter_context(_process(server))
        _wait_registered(tracker_port, key)
        yield f"127.0.0.1:{tracker_port}"


@contextlib.contextmanager
def _process(argv: list[str]) -> Iterator[None]:
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        # TVM's server runs its sessions in worker processes that start sessions of their own, out of
        # reach of a process-group signal: stop the whole tree.
        import psutil

        with contextlib.suppress(psutil.NoSuchProcess):
            tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
            for member in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.terminate()
            _, alive = psutil.wait_procs(tree, timeout=10)
            for member in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.kill()
        process.wait()


def _listen_on(port: int) -> list[str]:
    # TVM's scripts bind the first free port of [--port, --port-end), 9190-9199 unless told otherwise.
    return ["--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + _RPC_START_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.5)
    raise RuntimeError(f"TVM's RPC tracker did not listen within {_RPC_START_TIMEOUT_S} s")


def _wait_registered(port: int, key: str) -> None:
    from tvm import rpc

    deadline = time.monotonic() + _RPC_START_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, RuntimeError):
            if key in rpc.connect_tracker("127.0.0.1", port).summary().get("queue_info", {}):
                return
        time.sleep(2)
    raise RuntimeError(
        f"the emulated board's TVM RPC server did not register within {_RPC_START_TIMEOUT_S} s"
    )
