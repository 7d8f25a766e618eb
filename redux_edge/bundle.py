"""The bundle: a directory that holds everything a device needs, described by ``manifest.json``.

Layout: ``manifest.json``, ``model.onnx`` (the transformed IR, the portable fallback), ``artifact/``
(the backend's output), ``runner/run.pyz`` (the runner package as a zipapp) and ``runner/run.py`` (what
starts it), ``sample/{inputs,outputs}.npz`` (the health check) and optionally ``preprocess/``. The manifest
lists every other file with its sha256 and size. Every ``.onnx`` file is a standard one (weights inline
or in standard external data), so stock tools open it; a device receives only ``device_files``.

A bundle is built in a hidden sibling directory and renamed into place, so a failed compile leaves
nothing behind and readers never see half a bundle; an existing bundle is replaced only with
``force``. A bundle is untrusted when read: every path it names must stay inside its directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import posixpath
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from redux_edge import runtime
from redux_edge.errors import UserError
from redux_edge.files import file_digest
from redux_edge.manifest import FORMAT_VERSION, FileEntry, Manifest, validate
from redux_edge.packing import PORTABLE_IR
from redux_edge.runtime.session import paths_outside, unlisted_files
from redux_edge.untrusted import read_json

__all__ = [
    "FORMAT_VERSION",
    "Bundle",
    "check_destination",
    "device_files",
    "file_digest",
    "load_bundle",
    "staging",
    "toolchain",
    "write_manifest",
    "write_runner",
]

MANIFEST = "manifest.json"
IR = PORTABLE_IR
_TOOLCHAIN = ("torch", "onnx", "onnx-ir", "onnxscript", "onnxruntime")


@dataclass
class Bundle:
    path: Path
    manifest: Manifest

    def file(self, relative: str) -> Path:
        return _inside(self.path, relative)

    def verify_files(self) -> list[str]:
        """Problems with the files (listed ones missing, of the wrong size or sha256; files the manifest
        does not list); empty when all match."""
        problems = [
            f"{relative}: not listed in the manifest" for relative in unlisted_files(self.path, self.manifest)
        ]
        for relative, entry in self.manifest["files"].items():
            path = self.file(relative)
            if not path.is_file():
                problems.append(f"{relative}: missing")
            elif path.stat().st_size != entry["bytes"]:
                problems.append(f"{relative}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
            elif file_digest(path) != entry["sha256"]:
                problems.append(f"{relative}: sha256 differs from the manifest")
        return problems


def device_files(manifest: Manifest, with_ir: bool = False) -> dict[str, FileEntry]:
    """The listed files a device stores: what its runner reads. Not the portable IR (``model.onnx`` and its
    weights) unless ``with_ir``, and N:M weights as their packed file, not its dense external-data twin."""
    packed = manifest.get("storage", {}).get("packed_files", {})
    dense_twins = {
        posixpath.join(posixpath.dirname(relative), index["dense"]) for relative, index in packed.items()
    }
    return {
        relative: entry
        for relative, entry in manifest["files"].items()
        if relative not in dense_twins and (with_ir or not (relative == IR or relative.startswith(IR + ".")))
    }


def check_destination(out: Path, force: bool) -> None:
    """Fail before any work is done when ``out`` cannot become a bundle. ``force`` replaces a bundle, and
    nothing else: a directory without a manifest, or with files the manifest does not list, is the
    user's, and stays."""
    if out.name in ("", ".", "..") or out.resolve() in (Path.cwd(), *Path.cwd().parents):
        raise UserError(
            f"-o {out} is the current directory or one above it",
            "give a bundle directory, e.g. -o build/model",
        )
    if out.exists() and not force:
        raise UserError(f"output directory {out} already exists", "pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file, not a directory", "choose another -o")
    if out.is_dir() and (foreign := _not_bundle_files(out)):
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(
            f"--force replaces only a redux-edge bundle, and {out} holds files that are not one's: {shown}",
            "choose another -o, or move those files away first",
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _sweep_stale_staging(out.parent)
        probe = tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=out.parent)
        Path(probe).rmdir()
    except OSError as exc:
        raise UserError(
            f"cannot write to {out.parent}: {exc.strerror or exc}", "choose a writable -o"
        ) from exc


def _not_bundle_files(folder: Path) -> list[str]:
    """The files in ``folder`` that are not a bundle's: all of them when its manifest is missing or
    unreadable, else those the manifest does not list (an empty folder has none)."""
    try:
        return unlisted_files(folder, json.loads((folder / MANIFEST).read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


# Staging and set-aside directories are named for the process that made them, so that a later compile
# into the same folder can tell a killed compile's leftovers (its pid gone) from a running one's.
_HOST = platform.node() or "host"


def _owned_name(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}-{_HOST}-{os.getpid()}-"


def _sweep_stale_staging(parent: Path) -> None:
    """Remove what killed compiles on this host left in ``parent``: staging directories, and set-aside
    bundles, which go back in place when their bundle is missing (killed mid-replacement)."""
    for leftover in parent.glob(f".*.*-{_HOST}-*-*"):
        name, kind, pid = _staging_owner(leftover.name)
        if kind is None or _alive(pid) or not leftover.is_dir():
            continue
        bundle = parent / name
        if kind == "previous" and not bundle.exists():
            leftover.rename(bundle)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _staging_owner(name: str) -> tuple[str, str | None, int]:
    """(bundle name, "partial" or "previous", pid) of a directory ``_owned_name`` made; kind None if not."""
    for kind in ("partial", "previous"):
        head, separator, tail = name[1:].rpartition(f".{kind}-{_HOST}-")
        pid, _, _ = tail.partition("-")
        if separator and pid.isdigit():
            return head, kind, int(pid)
    return name, None, 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def staging(out: Path, force: bool) -> Iterator[Path]:
    """A temporary sibling of ``out`` to build into; renamed to ``out`` when the block succeeds."""
    check_destination(out, force)
    stage = Path(tempfile.mkdtemp(prefix=_owned_name(out, "partial"), dir=out.parent))
    try:
        yield stage
        _publish(stage, out, force)
    except OSError as exc:
        raise UserError(
            f"cannot write bundle {out}: {exc.strerror or exc}", "free disk space or choose another -o"
        ) from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _publish(stage: Path, out: Path, force: bool) -> None:
    if not out.exists():
        stage.rename(out)
        return
    if not force:
        raise UserError(f"output directory {out} appeared while compiling", "pass --force to replace it")
    previous = Path(tempfile.mkdtemp(prefix=_owned_name(out, "previous"), dir=out.parent))
    previous.rmdir()
    out.rename(previous)
    try:
        stage.rename(out)
    except OSError:
        previous.rename(out)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def write_manifest(stage: Path, manifest: dict) -> dict:
    files = {}
    for path in sorted(p for p in stage.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(stage).as_posix()] = {
            "sha256": file_digest(path),
            "bytes": path.stat().st_size,
        }
    manifest = {"format_version": FORMAT_VERSION, **manifest, "files": files}
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    return manifest


def load_bundle(path: Path) -> Bundle:
    if not (path / MANIFEST).is_file():
        raise UserError(
            f"{path} is not a bundle (no {MANIFEST})", "give a directory written by redux-edge compile"
        )
    manifest = read_json(path / MANIFEST, "recompile the bundle")
    bundle = Bundle(path, validate(manifest, path / MANIFEST))
    if outside := paths_outside(path, manifest):
        raise UserError(f"bundle {path} names a path outside itself: {outside[0]}", "do not use this bundle")
    return bundle


def _inside(root: Path, relative: str) -> Path:
    target = (root / relative).resolve()
    if Path(relative).is_absolute() or not target.is_relative_to(root.resolve()):
        raise UserError(f"bundle {root} names a path outside itself: {relative}", "do not use this bundle")
    return target


# The runner package inside run.pyz: a name of its own, so that it never resolves to (or needs) redux_edge.
_RUNNER_PACKAGE = "bundle_runner"
_ARCHIVE_MAIN = f"""import sys
from pathlib import Path

from {_RUNNER_PACKAGE}.main import main

# This archive is <bundle>/runner/run.pyz.
sys.exit(main(bundle=Path(__file__).resolve().parent.parent.parent))
"""
_LAUNCHER = """\"\"\"Starts this bundle's runner, run.pyz beside this file (python3 runner/run.pyz works
the same): numpy and the backend's runtime are all it needs. See --help.\"\"\"

import hashlib
import json
import runpy
import sys
from pathlib import Path


def refuse(problem: str) -> None:
    print(f"error: {problem}: copy the bundle again", file=sys.stderr)
    sys.exit(2)


archive = Path(__file__).resolve().with_name("run.pyz")
manifest = archive.parent.parent / "manifest.json"
try:
    expected = json.loads(manifest.read_text(encoding="utf-8"))["files"]["runner/run.pyz"]["sha256"]
except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
    refuse(f"{manifest} does not give run.pyz's checksum ({type(exc).__name__}: {exc})")
# The archive is checked against the manifest before anything is imported from it: a damaged byte
# anywhere (zipimport reads headers its own way) stops here, never as a zlib error or altered source.
if archive.is_symlink() or not archive.is_file():
    refuse(f"{archive} is a link or missing")
if hashlib.sha256(archive.read_bytes()).hexdigest() != expected:
    refuse(f"{archive} is damaged (its sha256 differs from the manifest's)")
# Nothing but the archive is imported from this folder: a file dropped beside the runner is never run.
sys.path[0] = str(archive)
runpy.run_path(str(archive), run_name="__main__")
"""


def write_runner(stage: Path) -> None:
    """``runner/run.pyz``, a zipapp of ``redux_edge.runtime`` (standard library, numpy and the backend's
    runtime only), and ``runner/run.py`` that starts it."""
    folder = stage / "runner"
    folder.mkdir()
    members = {f"{_RUNNER_PACKAGE}/{path.name}": path.read_bytes() for path in _runner_modules()}
    members["__main__.py"] = _ARCHIVE_MAIN.encode()
    # Fixed member dates: the same runner is the same file, which flash then never sends twice.
    with zipfile.ZipFile(folder / "run.pyz", "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in sorted(members.items()):
            archive.writestr(
                zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), content, zipfile.ZIP_DEFLATED
            )
    (folder / "run.py").write_text(_LAUNCHER)


def _runner_modules() -> list[Path]:
    return sorted(Path(runtime.__file__).parent.glob("*.py"))


def toolchain() -> dict:
    """The versions a bundle was compiled with."""
    return {"python": platform.python_version(), **{name: metadata.version(name) for name in _TOOLCHAIN}}
