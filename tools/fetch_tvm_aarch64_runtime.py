"""Put the aarch64 TVM runtime libraries beside the virtual environment, for emulated checks.

redux-edge checks an aarch64 TVM artifact on an x86-64 machine by running it under qemu-aarch64 with the
aarch64 build of the very runtime a board would use. That runtime ships in the aarch64 wheels of
``apache-tvm`` and ``apache-tvm-ffi`` on PyPI; this script downloads those two wheels (same versions as
installed here, no dependencies) and extracts ``libtvm_runtime.so`` and ``libtvm_ffi.so`` into
``<venv>/share/redux-edge/tvm-aarch64/``. Run by ``make`` while it sets up the environment.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from redux_edge.backends.tvm import AARCH64_RUNTIME_DIR

LIBRARIES = {"apache-tvm": "tvm/lib/libtvm_runtime.so", "apache-tvm-ffi": "tvm_ffi/lib/libtvm_ffi.so"}


def main() -> int:
    if all((AARCH64_RUNTIME_DIR / Path(member).name).is_file() for member in LIBRARIES.values()):
        return 0
    AARCH64_RUNTIME_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        requirements = [f"{name}=={metadata.version(name)}" for name in LIBRARIES]
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                "--platform",
                "manylinux_2_28_aarch64",
                "--python-version",
                "3.11",
                "-d",
                download,
                *requirements,
            ],
            check=True,
        )
        for wheel in Path(download).glob("*.whl"):
            with zipfile.ZipFile(wheel) as archive:
                for member in LIBRARIES.values():
                    if member in archive.namelist():
                        (AARCH64_RUNTIME_DIR / Path(member).name).write_bytes(archive.read(member))
    print(f"aarch64 TVM runtime in {AARCH64_RUNTIME_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
