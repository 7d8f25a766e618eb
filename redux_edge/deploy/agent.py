"""The device side of flashing: a stdlib-only script that the host pipes to ``python3 -`` on the device.

Nothing is installed on a device for flashing: every call sends this file on stdin with one verb and its
arguments as separate, quoted argv words, and reads one JSON object back from stdout. A device root
holds::

    releases/<id>/           a verified bundle (immutable once renamed from <id>.partial); files that
                             another release holds with the same sha256 are hard links to it
    releases/<id>.partial/   an upload in progress (kept across interrupted uploads, resumed by sha256)
    current -> releases/<id> the live release: a relative symlink, swapped by rename(2), so atomic
    history.json             releases in order of activation (rollback walks it back)
    engines/<key>/           TensorRT engines built here, keyed by engine name, TensorRT version and GPU
    .lock                    flock-ed by every call, so that two hosts flashing one device take turns

Every path a caller names is checked to stay inside the root; the release ids are hex digests.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

_RELEASE = re.compile(r"^[0-9a-f]{8,64}$")


# Room a flash leaves free on the device's file system, for the device's own logs and the runner's
# temporary files: a release that fits only by filling the disk would break the device.
RESERVE_BYTES = 16 << 20


class AgentError(Exception):
    """Something the host should report as this device's failure, in one line, and how to fix it."""

    def __init__(self, message: str, hint: str = "see redux-edge devices check") -> None:
        super().__init__(message)
        self.hint = hint


def _digest(path: Path) -> str:
    # Not hashlib.file_digest: devices run older Pythons (JetPack 5 ships 3.8).
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _inside(root: Path, relative: str) -> Path:
    target = (root / relative).resolve()
    base = str(root.resolve())
    if os.path.isabs(relative) or os.path.commonpath([base, str(target)]) != base:
        raise AgentError(f"path leaves the device root: {relative}")
    return target


def _release_dir(root: Path, release: str, partial: bool = False) -> Path:
    if not _RELEASE.match(release):
        raise AgentError(f"not a release id: {release}")
    return root / "releases" / (release + ".partial" if partial else release)


def _current(root: Path) -> str | None:
    link = root / "current"
    return Path(os.readlink(link)).name if link.is_symlink() else None


def _history(root: Path) -> list[dict]:
    """The activations in order; a damaged file (cut short, edited) is an error before anything moves."""
    path = root / "history.json"
    if not path.is_file():
        return []
    try:
        history = json.loads(path.read_text())
        readable = isinstance(history, list) and all(
            isinstance(entry, dict) and isinstance(entry.get("release"), str) for entry in history
        )
    except (ValueError, RecursionError):
        readable = False
    if not readable:
        raise AgentError(
            f"{path} is damaged; nothing was changed on the device",
            "redux-edge rollback rebuilds it from the releases on the device (it keeps the damaged copy)",
        )
    return history


def _rebuilt_history(root: Path) -> list[dict]:
    """A history from the releases on the device, in the order they were made (their folders' times),
    ending with the current one: what ``rollback`` walks when ``history.json`` is damaged."""
    current = _current(root)
    made = sorted(
        _releases(root),
        key=lambda release: (release == current, (root / "releases" / release).stat().st_mtime),
    )
    return [
        {"release": release, "activated": (root / "releases" / release).stat().st_mtime, "rebuilt": True}
        for release in made
    ]


def _repaired_history(root: Path) -> list[dict]:
    """The history, or, when it is damaged, the rebuilt one, with the damaged file kept beside it."""
    try:
        return _history(root)
    except AgentError:
        path = root / "history.json"
        os.replace(path, path.with_name(f"history.damaged-{int(time.time())}.json"))
        history = _rebuilt_history(root)
        _write_json(path, history)
        return history


def _write_json(path: Path, payload: object) -> None:
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(json.dumps(payload, indent=1))
    os.replace(scratch, path)


def _releases(root: Path) -> list[str]:
    folder = root / "releases"
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and _RELEASE.match(p.name))


def _manifest_files(release_dir: Path) -> dict:
    try:
        return json.loads((release_dir / "manifest.json").read_text())["files"]
    except (OSError, ValueError, KeyError):
        return {}


def _mib(size: int) -> str:
    # Not redux_edge.files.human_bytes: this script runs alone on the device, with the standard library.
    return f"{size / (1 << 20):.1f} MiB"


def storage(root: Path, limit: int | None = None) -> dict:
    """Bytes the device root uses (a hard-linked file once), per release, and what a release may add."""
    seen: set[tuple[int, int]] = set()
    used = 0
    per_release: dict[str, int] = {}
    for path in root.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        status = path.stat()
        if (status.st_dev, status.st_ino) not in seen:
            seen.add((status.st_dev, status.st_ino))
            used += status.st_size
        parts = path.relative_to(root).parts
        if len(parts) > 2 and parts[0] == "releases":
            per_release[parts[1]] = per_release.get(parts[1], 0) + status.st_size
    free = shutil.disk_usage(root).free
    available = free - RESERVE_BYTES if limit is None else min(free - RESERVE_BYTES, limit - used)
    return {
        "free": free,
        "used": used,
        "limit": limit,
        "available": max(available, 0),
        "releases": per_release,
    }


def state(root: Path) -> dict:
    try:
        history, damaged = _history(root), None
    except AgentError as exc:
        history, damaged = _rebuilt_history(root), str(exc)
    return {
        "root": str(root),
        "current": _current(root),
        "releases": _releases(root),
        "history": history,
        "history_damaged": damaged,
    }


def info(root: Path, modules: dict, limit: int | None) -> dict:
    """What the device is; ``modules`` maps the Python modules to look for to their distributions,
    ``limit`` is the room the device's registry entry gives redux-edge (None: the file system's)."""
    import importlib.metadata
    import importlib.util

    runtimes = {}
    for name, distribution in modules.items():
        if importlib.util.find_spec(name) is None:
            continue
        try:
            runtimes[name] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            runtimes[name] = "installed"
    os_release = Path("/etc/os-release")
    pretty = (
        dict(line.split("=", 1) for line in os_release.read_text().splitlines() if "=" in line)
        .get("PRETTY_NAME", "")
        .strip('"')
        if os_release.is_file()
        else platform.system()
    )
    tegra = Path("/etc/nv_tegra_release")
    return {
        "machine": platform.machine(),
        "os": pretty,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "runtimes": runtimes,
        "trtexec": shutil.which("trtexec") or _jetson_trtexec(),
        "tegrastats": shutil.which("tegrastats"),
        "jetpack": tegra.read_text().splitlines()[0] if tegra.is_file() else None,
        "storage": storage(root, limit),
        "emulated": os.environ.get("REDUX_EDGE_EMULATED"),
        **state(root),
    }


def _jetson_trtexec() -> str | None:
    # JetPack puts trtexec under /usr/src/tensorrt/bin, outside PATH.
    path = Path("/usr/src/tensorrt/bin/trtexec")
    return str(path) if path.is_file() else None


def _link_or_copy(source: Path, target: Path) -> bool:
    """Hard-link ``source`` as ``target`` (True), or copy it where the file system has no hard links."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
        return True
    except OSError:
        shutil.copyfile(source, target)
        return False


def prepare(root: Path, release: str, wanted: dict[str, dict], limit: int | None) -> dict:
    """Make ``<release>.partial`` hold every wanted file it can without an upload: files already there
    with the right sha256 stay, files another release holds are hard-linked; the rest are listed as
    missing. A release whose missing files would not fit, or a damaged history, is refused before anything
    is written."""
    _history(root)
    final = _release_dir(root, release)
    if final.is_dir():
        return {
            "complete": True,
            "path": str(final),
            "missing": [],
            "linked": [],
            "copied": [],
            "present": sorted(wanted),
            "started": {},
            "free": shutil.disk_usage(root).free,
        }
    partial = _release_dir(root, release, partial=True)
    elsewhere: dict[str, Path] = {}
    for other in _releases(root):
        for relative, entry in _manifest_files(root / "releases" / other).items():
            elsewhere.setdefault(entry["sha256"], root / "releases" / other / relative)
    present, shared, missing = [], {}, []
    for relative, entry in sorted(wanted.items()):
        path = _inside(partial, relative)
        if path.is_file() and _digest(path) == entry["sha256"]:
            present.append(relative)
        elif entry["sha256"] in elsewhere and elsewhere[entry["sha256"]].is_file():
            shared[relative] = elsewhere[entry["sha256"]]
        else:
            missing.append(relative)
    # An upload cut short leaves <file>.upload: its length and digest let the host send only the rest.
    started = {}
    for relative in missing:
        upload = Path(f"{_inside(partial, relative)}.upload")
        if upload.is_file():
            started[relative] = {"bytes": upload.stat().st_size, "sha256": _digest(upload)}
    needed = sum(wanted[r]["bytes"] - started.get(r, {"bytes": 0})["bytes"] for r in missing)
    room = storage(root, limit)
    if needed > room["available"]:
        limited = f", {_mib(room['used'])} used of its limit {_mib(limit)}" if limit is not None else ""
        raise AgentError(
            f"the release needs {_mib(needed)} more, the device has {_mib(room['free'])} free{limited} "
            f"(and keeps {_mib(RESERVE_BYTES)} spare); nothing was changed on the device",
            "free space on the device, flash with a lower --keep to hold fewer releases, "
            "or raise storage_limit in devices.toml",
        )
    linked: list[str] = []
    copied: list[str] = []
    for relative, source in shared.items():
        path = _inside(partial, relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        (linked if _link_or_copy(source, path) else copied).append(relative)
    for relative in missing:
        _inside(partial, relative).parent.mkdir(parents=True, exist_ok=True)
    return {
        "complete": False,
        "path": str(partial),
        "missing": missing,
        "linked": linked,
        "copied": copied,
        "present": present,
        "started": started,
        "free": room["free"],
    }


def verify(root: Path, release: str, wanted: dict[str, dict]) -> dict:
    """sha256 of every wanted file in the release (or its partial upload); the files that differ."""
    folder = _staged(root, release)
    bad = {}
    for relative, entry in sorted(wanted.items()):
        path = _inside(folder, relative)
        got = _digest(path) if path.is_file() else "missing"
        if got != entry["sha256"]:
            bad[relative] = got
    return {"path": str(folder), "bad": bad}


def _staged(root: Path, release: str) -> Path:
    """The release's folder: in place, or still being uploaded (``.partial``)."""
    folder = _release_dir(root, release)
    return folder if folder.is_dir() else _release_dir(root, release, partial=True)


def _switch(root: Path, release: str) -> None:
    target = _release_dir(root, release)
    if not target.is_dir():
        raise AgentError(f"release {release} is not on the device")
    scratch = root / f".current.{os.getpid()}"
    scratch.unlink(missing_ok=True)
    scratch.symlink_to(Path("releases") / release)
    os.replace(scratch, root / "current")


def activate(root: Path, release: str, bundle: dict) -> dict:
    """Rename the verified upload into place and point ``current`` at it; returns the release it replaced."""
    partial, final = _release_dir(root, release, partial=True), _release_dir(root, release)
    history = _history(root)  # read before anything moves: a damaged file stops the flash here
    if partial.is_dir() and not final.is_dir():
        os.rename(partial, final)
    previous = _current(root)
    _switch(root, release)
    history.append({"release": release, "activated": time.time(), "previous": previous, **bundle})
    _write_json(root / "history.json", history)
    return {"previous": previous, "current": release}


def switch(root: Path, release: str, reason: str) -> dict:
    """Point ``current`` at an existing release (rollback), recording why; a damaged history is rebuilt."""
    history = _repaired_history(root)
    previous = _current(root)
    _switch(root, release)
    history.append({"release": release, "activated": time.time(), "previous": previous, "reason": reason})
    _write_json(root / "history.json", history)
    return {"previous": previous, "current": release}


def discard(root: Path, release: str) -> dict:
    """Remove a release that failed its health check; when it is current (the device had nothing before
    it), ``current`` goes too, so that nothing serves a broken release."""
    if _current(root) == release:
        (root / "current").unlink()
    shutil.rmtree(_release_dir(root, release), ignore_errors=True)
    return {"discarded": release}


def prune(root: Path, keep: int) -> dict:
    """Keep the ``keep`` most recently activated releases (and the current one); delete the rest."""
    recent: list[str] = []
    for entry in reversed(_history(root)):
        if entry["release"] not in recent:
            recent.append(entry["release"])
    kept = set(recent[:keep]) | {_current(root)}
    removed = [release for release in _releases(root) if release not in kept]
    for release in removed:
        shutil.rmtree(_release_dir(root, release))
    return {"removed": removed, "free": shutil.disk_usage(root).free}


def run_runner(root: Path, release: str, arguments: list[str], timeout: float) -> dict:
    """Run the release's own runner with ``arguments``; its exit code, stdout and stderr."""
    folder = _release_dir(root, release)
    completed = subprocess.run(
        [sys.executable, str(folder / "runner" / "run.py"), "--bundle", str(folder), *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return {"code": completed.returncode, "stdout": completed.stdout, "stderr": completed.stderr[-4000:]}


def build_engine(root: Path, release: str, timeout: float, board: str) -> dict:
    """Build the release's TensorRT engine, or take it from the cache: an engine holds for one engine
    name (model digest, SM, precision, sparsity, DLA core), one TensorRT version and one GPU. The build
    log is kept beside the engine, in the release and in the cache. Runs before activation, so that a
    failed build leaves ``current`` alone."""
    folder = _staged(root, release)
    plan = json.loads((folder / "manifest.json").read_text())["backend"]["engine_build"]
    trtexec = shutil.which("trtexec") or _jetson_trtexec()
    if trtexec is None:
        raise AgentError("trtexec is not on this device (install TensorRT / JetPack)")
    version = re.search(r"TensorRT v(\d+)", _run_text([trtexec, "--help"]))
    key = f"{plan['engine_name']}-trt{version.group(1) if version else 'unknown'}-{_gpu_name()}-{board}"
    cache = root / "engines" / key
    engines = _inside(folder, plan["engine_dir"])
    if cache.is_dir():
        engines.mkdir(exist_ok=True)
        for built in cache.iterdir():
            _link_or_copy(built, engines / built.name)
        report = json.loads((cache / _BUILD_REPORT).read_text()) if (cache / _BUILD_REPORT).is_file() else {}
        return {**report, "key": key, "cached": True, "log": [str(p) for p in cache.glob("*.log")]}
    completed = subprocess.run(
        [
            sys.executable,
            str(folder / "runner" / "run.py"),
            "--bundle",
            str(folder),
            "--build-engine",
            "--board",
            board,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if completed.returncode != 0:
        # The failed release's folder goes when the host discards it; its log is kept with the failures.
        failures = root / "engines" / "failed"
        failures.mkdir(parents=True, exist_ok=True)
        logs = (
            [shutil.copy(log, failures / log.name) for log in engines.glob("*.log")]
            if engines.is_dir()
            else []
        )
        last = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        raise AgentError(f"engine build failed: {last} (log: {', '.join(map(str, logs)) or 'none'})")
    built = json.loads(completed.stdout.strip().splitlines()[-1])
    staging = cache.with_name(f".{key}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(engines, staging)
    # What the build resolved (a family bundle's options for this board) comes back with a cached engine.
    (staging / _BUILD_REPORT).write_text(json.dumps(built))
    os.replace(staging, cache)
    return {"key": key, "cached": False, "log": [str(p) for p in cache.glob("*.log")], **built}


_BUILD_REPORT = "build.json"


def _gpu_name() -> str:
    # Jetson boards name their GPU in the device tree; discrete GPUs through nvidia-smi.
    model = Path("/proc/device-tree/model")
    if model.is_file():
        return re.sub(r"[^A-Za-z0-9]+", "_", model.read_text().strip("\x00 \n"))
    smi = shutil.which("nvidia-smi")
    name = _run_text([smi, "--query-gpu=name", "--format=csv,noheader"]) if smi else ""
    return re.sub(r"[^A-Za-z0-9]+", "_", name.strip()) or "nogpu"


def _run_text(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout


_VERBS = {
    "state": lambda root, args: state(root),
    "info": lambda root, args: info(root, json.loads(args[0]), json.loads(args[1])),
    "prepare": lambda root, args: prepare(root, args[0], json.loads(args[1]), json.loads(args[2])),
    "verify": lambda root, args: verify(root, args[0], json.loads(args[1])),
    "activate": lambda root, args: activate(root, args[0], json.loads(args[1])),
    "switch": lambda root, args: switch(root, args[0], args[1]),
    "discard": lambda root, args: discard(root, args[0]),
    "prune": lambda root, args: prune(root, int(args[0])),
    "runner": lambda root, args: run_runner(root, args[0], json.loads(args[1]), float(args[2])),
    "engine": lambda root, args: build_engine(root, args[0], float(args[1]), args[2]),
}


def main(argv: list[str]) -> int:
    verb, root, args = argv[0], Path(os.path.expanduser(argv[1])), argv[2:]
    try:
        # The host checks roots fully (deploy/devices.py); this keeps a bad one from writing anywhere.
        if not root.is_absolute() or root.resolve() == Path("/"):
            raise AgentError(f"the device root {argv[1]!r} is not an absolute folder below /", "fix root")
        root.mkdir(parents=True, exist_ok=True)
        with (root / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            result = _VERBS[verb](root.resolve(), args)
    except AgentError as exc:
        print(json.dumps({"error": str(exc), "hint": exc.hint}))
        return 3
    except (OSError, subprocess.SubprocessError) as exc:
        print(json.dumps({"error": str(exc)}))
        return 3
    except Exception as exc:  # the host needs one JSON reply, whatever the device's state
        print(json.dumps({"error": f"the agent failed on {verb}: {type(exc).__name__}: {exc}"}))
        return 3
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
