"""Build the emulated aarch64 board (see redux_edge/deploy/emulated.py); run by ``make test``.

1. Debian's arm64 packages of Python 3.11 and the libraries it links, downloaded with ``apt-get download``
   (after ``dpkg --add-architecture arm64``) and extracted with ``dpkg-deb -x`` into ``root/``: nothing
   is installed on this machine.
2. PyPI's aarch64 wheels, same versions as this environment (onnxruntime excepted, see ORT_UNDER_QEMU),
   no dependencies, into ``site/``.
3. binfmt_misc runs aarch64 programs through ``qemu-aarch64-static``, so that a process on the board can
   start another (the device agent starts the bundle's runner); registered when it is not, as Debian's
   binfmt-support does on a machine with systemd.
4. ``bin/python3-<cpu>`` for each CPU of the arm64 targets (``bin/python3``: the oldest), and a smoke
   test: numpy, onnxruntime and tvm import on the board.

Needs root for steps 1 and 3; without it, it says so and the emulated tests skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from redux_edge.backends.board import BOARD_CPUS, BOARD_DIR, ORT_UNDER_QEMU

DEBIAN_PACKAGES = [
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "zlib1g", "libexpat1",
    "libffi8", "libssl3", "libbz2-1.0", "liblzma5", "libstdc++6", "libgcc-s1", "libgomp1", "libsqlite3-0",
    "libuuid1", "libncursesw6", "libtinfo6", "libreadline8", "libcrypt1",
]  # fmt: skip
WHEELS = {
    "numpy": metadata.version("numpy"),
    "onnxruntime": ORT_UNDER_QEMU,
    "apache-tvm": metadata.version("apache-tvm"),
    "apache-tvm-ffi": metadata.version("apache-tvm-ffi"),
    "ml_dtypes": metadata.version("ml_dtypes"),
    "typing_extensions": metadata.version("typing_extensions"),
    # TVM's RPC server, through which MetaSchedule measures candidates on the board (tuning).
    "cloudpickle": metadata.version("cloudpickle"),
    "psutil": metadata.version("psutil"),
}
QEMU = "/usr/bin/qemu-aarch64-static"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
# Debian's qemu-user-static entry (/usr/share/binfmts/qemu-aarch64): the ELF header of an aarch64
# executable; F opens qemu when registering, so that it works inside any mount namespace.
AARCH64_ELF = (
    r":qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
    r":\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
    f":{QEMU}:F"
)
LAUNCHER = """#!/bin/sh
# The emulated aarch64 board's Python (redux_edge/deploy/emulated.py): Debian arm64 under qemu-aarch64.
export QEMU_LD_PREFIX="{root}" PYTHONPATH="{site}" PYTHONNOUSERSITE=1
export QEMU_CPU={cpu}
export REDUX_EDGE_EMULATED="aarch64 under {version}, cpu {cpu}"
exec {qemu} "{root}/usr/bin/python3.11" "$@"
"""


def _note(message: str) -> int:
    print(f"note: no emulated aarch64 board ({message}); the tests that use it skip")
    return 0


def _debian_root(root: Path) -> None:
    architectures = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True)
    if "arm64" not in architectures.stdout.split():
        subprocess.run(["dpkg", "--add-architecture", "arm64"], check=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
    root.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as download:
        os.chmod(download, 0o755)  # apt's sandbox user writes the files
        subprocess.run(
            ["apt-get", "download", "-qq", *(f"{package}:arm64" for package in DEBIAN_PACKAGES)],
            cwd=download,
            check=True,
        )
        for package in sorted(Path(download).glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(package), str(root)], check=True)


def _wheels(site: Path) -> None:
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--target", str(site), "--no-deps",
            "--only-binary=:all:", "--implementation", "cp", "--python-version", "3.11",
            "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux_2_17_aarch64",
            "--platform", "manylinux2014_aarch64", "--platform", "any",
            *(f"{name}=={version}" for name, version in WHEELS.items()),
        ],
        check=True,
    )  # fmt: skip


def _binfmt() -> None:
    if (BINFMT / "qemu-aarch64").is_file():
        return
    if not (BINFMT / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=True)
    if not (BINFMT / "qemu-aarch64").is_file():
        (BINFMT / "register").write_text(AARCH64_ELF)


def _stamp() -> str:
    return " ".join(f"{name}=={version}" for name, version in WHEELS.items()) + "\n"


def main() -> int:
    ready = BOARD_DIR / ".ready"
    if ready.is_file() and ready.read_text() == _stamp() and (BINFMT / "qemu-aarch64").is_file():
        return 0
    if not Path(QEMU).is_file():
        return _note("qemu-user-static is not installed")
    if os.geteuid() != 0:
        return _note("building it needs root, for apt-get download and binfmt_misc")
    staging = BOARD_DIR.with_name(f".{BOARD_DIR.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _debian_root(staging / "root")
        _wheels(staging / "site")
        _binfmt()
    except (subprocess.CalledProcessError, OSError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        return _note(str(exc))
    final = BOARD_DIR
    version = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    (staging / "bin").mkdir()
    for name, cpu in {f"python3-{cpu}": cpu for cpu in BOARD_CPUS}.items() | {("python3", BOARD_CPUS[0])}:
        launcher = staging / "bin" / name
        paths = {"root": final / "root", "site": final / "site"}
        launcher.write_text(LAUNCHER.format(**paths, qemu=QEMU, version=version, cpu=cpu))
        launcher.chmod(0o755)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    probe = "import numpy, onnxruntime, tvm, platform; print(platform.machine())"
    smoke = subprocess.run(
        [str(final / "bin" / "python3"), "-c", probe],
        capture_output=True,
        text=True,
    )
    if smoke.returncode != 0 or smoke.stdout.strip() != "aarch64":
        return _note(f"its Python does not start: {(smoke.stderr.strip().splitlines() or ['?'])[-1]}")
    (final / ".ready").write_text(_stamp())
    print(f"emulated aarch64 board in {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
