"""Flash a bundle to devices: upload what is missing, verify on the device, swap, health-check, roll back.

The sequence per device follows the release layout of Capistrano-style deploys (``releases/<id>``, an
atomic ``current`` symlink, keep the last K) with the checks a model needs:

1. the bundle's own files are checked against its manifest here (a tampered bundle is never sent); the
   device gets what its runner reads (``bundle.device_files``: no portable IR unless asked, packed N:M
   weights instead of their dense copy);
2. ``prepare``: the device keeps files it already has (an interrupted upload's, or other releases' with
   the same sha256, hard-linked), refuses a release that would not fit before writing anything, and
   lists the rest, which go over SFTP, each under a temporary name then renamed;
3. ``verify``: the device hashes every file; files that differ are sent once more, then it is a failure;
4. TensorRT bundles build their engine on the device (cached by engine name, TensorRT version and GPU);
5. ``activate``: ``releases/<id>.partial`` is renamed, ``current`` swapped by rename(2);
6. the health check runs the release's runner on the sample recorded at compile time; when it fails,
   ``current`` goes back to the previous release and the flash fails with the runner's reason.

Devices of a group are flashed concurrently, one connection each; one device's failure is its row.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TypeVar

from redux_edge.backends import BACKENDS
from redux_edge.bundle import MANIFEST, Bundle, device_files, file_digest, load_bundle
from redux_edge.deploy.devices import Device
from redux_edge.deploy.transport import Transport, connect
from redux_edge.errors import UserError
from redux_edge.targets import Target

__all__ = ["DeviceAgent", "FlashResult", "flash", "release_id", "rollback", "with_device"]

HEALTH_TIMEOUT_S = 600.0
ENGINE_TIMEOUT_S = 3600.0

Progress = Callable[[str, str], None]


@dataclass
class FlashResult:
    device: str
    release: str | None = None
    previous: str | None = None
    uploaded: list[str] = field(default_factory=list)
    uploaded_bytes: int = 0
    reused: list[str] = field(default_factory=list)
    release_bytes: int = 0
    free_bytes: int | None = None
    resumed: dict[str, int] = field(default_factory=dict)
    repaired: list[str] = field(default_factory=list)
    health: dict | None = None
    engine: dict | None = None
    removed: list[str] = field(default_factory=list)
    started: float = 0.0
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def release_id(bundle: Bundle) -> str:
    """A release is named by the digest of its manifest, which lists every other file's sha256."""
    return hashlib.sha256((bundle.path / MANIFEST).read_bytes()).hexdigest()[:16]


class DeviceAgent:
    """Calls into ``agent.py`` on the device: the script goes on stdin, one JSON object comes back."""

    _source = resources.files("redux_edge.deploy").joinpath("agent.py").read_text()

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.device = transport.device

    async def call(self, verb: str, *args: str, timeout: float | None = 120.0) -> dict:
        argv = [self.device.python, "-", verb, self.device.root, *args]
        try:
            done = await self.transport.run(argv, stdin=self._source, timeout=timeout)
        except TimeoutError as exc:
            raise UserError(
                f"device {self.device.name}: '{verb}' did not finish within {timeout:.0f} s",
                "check the device's load and storage, then try again",
            ) from exc
        try:
            reply = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else None
        except json.JSONDecodeError:
            reply = None
        if not isinstance(reply, dict):
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(
                f"device {self.device.name}: '{self.device.python}' could not run the agent ({last})",
                "set python in devices.toml to a Python 3.8+ interpreter on the device",
            )
        if "error" in reply:
            raise UserError(
                f"device {self.device.name}: {reply['error']}",
                reply.get("hint", "see redux-edge devices check"),
            )
        return reply

    async def runner(self, release: str, arguments: list[str], timeout: float) -> tuple[dict | None, str]:
        """The JSON report the release's runner printed last, or None and the runner's last error line."""
        done = await self.call("runner", release, json.dumps(arguments), str(timeout), timeout=timeout + 30)
        try:
            return json.loads(done["stdout"].strip().splitlines()[-1]), ""
        except (json.JSONDecodeError, IndexError):
            return None, (done["stderr"].strip().splitlines() or [f"exit code {done['code']}"])[-1]


Result = TypeVar("Result")


async def with_device(device: Device, work: Callable[[DeviceAgent], Awaitable[Result]]) -> Result:
    """Connect, run ``work(agent)``, always close."""
    transport = await connect(device)
    try:
        return await work(DeviceAgent(transport))
    finally:
        await transport.close()


def flash(
    bundle_path: Path,
    devices: list[Device],
    keep: int = 3,
    any_target: bool = False,
    progress: Progress | None = None,
    with_ir: bool = False,
) -> list[FlashResult]:
    """Flash one bundle to every device concurrently; a failed device is a result with ``error`` set.
    ``with_ir`` also sends the portable ``model.onnx``, which no runner reads."""
    bundle = load_bundle(bundle_path)
    if problems := bundle.verify_files():
        raise UserError(
            f"bundle {bundle_path} does not match its manifest: {problems[0]}"
            + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""),
            "recompile it; nothing was sent to any device",
        )
    if keep < 1:
        raise UserError(f"--keep {keep} would delete the running release", "keep at least 1")
    target = Target.from_json(bundle.manifest["target"])
    for device in devices:
        if not target.admits(device.target) and not any_target:
            family = f" (its boards: {', '.join(target.members)})" if target.members else ""
            raise UserError(
                f"bundle {bundle_path} is for target {target.name}{family}, device {device.name} is "
                f"{device.target}",
                f"compile for {device.target}, or pass --any-target; nothing was sent",
            )
    report = progress or (lambda device, message: None)

    async def one(device: Device) -> FlashResult:
        result = FlashResult(device.name, started=time.time())
        started = time.perf_counter()
        try:
            await with_device(
                device, lambda agent: _flash_device(agent, bundle, keep, with_ir, result, report)
            )
        except UserError as exc:
            result.error = str(exc)
        except OSError as exc:
            # A file this machine cannot read or send (a file-size limit, a vanished file): this device's row.
            result.error = f"device {device.name}: {exc.strerror or exc}" + (
                f" ({exc.filename})" if exc.filename else ""
            )
        result.seconds = time.perf_counter() - started
        return result

    async def every() -> list[FlashResult]:
        return list(await asyncio.gather(*(one(device) for device in devices)))

    return asyncio.run(every())


async def _flash_device(
    agent: DeviceAgent, bundle: Bundle, keep: int, with_ir: bool, result: FlashResult, report: Progress
) -> None:
    name = agent.device.name
    release = result.release = release_id(bundle)
    wanted: dict[str, dict] = {
        relative: {"sha256": entry["sha256"], "bytes": entry["bytes"]}
        for relative, entry in device_files(bundle.manifest, with_ir).items()
    }
    manifest = bundle.path / MANIFEST
    wanted[MANIFEST] = {"sha256": file_digest(manifest), "bytes": manifest.stat().st_size}
    result.release_bytes = sum(entry["bytes"] for entry in wanted.values())
    limit = json.dumps(agent.device.storage_limit_bytes)
    prepared = await agent.call("prepare", release, json.dumps(wanted), limit)
    result.reused = prepared["linked"] + prepared["copied"] + prepared["present"]
    result.free_bytes = prepared["free"]
    for relative in prepared["missing"]:
        report(name, f"uploading {relative}")
        local = bundle.file(relative)
        offset = _resumable(local, prepared["started"].get(relative))
        await agent.transport.put(local, f"{prepared['path']}/{relative}", offset)
        result.uploaded.append(relative)
        result.uploaded_bytes += local.stat().st_size - offset
        if offset:
            result.resumed[relative] = offset
    report(name, "verifying sha256 on the device")
    bad = (await agent.call("verify", release, json.dumps(wanted)))["bad"]
    if bad:
        # Once more from the bundle: a file may have been damaged on the device before or after upload.
        for relative in bad:
            await agent.transport.put(bundle.file(relative), f"{prepared['path']}/{relative}")
            result.uploaded_bytes += bundle.file(relative).stat().st_size
        result.repaired = sorted(bad)
        still = (await agent.call("verify", release, json.dumps(wanted)))["bad"]
        if still:
            raise UserError(
                f"device {name}: {len(still)} file(s) differ from the bundle after upload, e.g. "
                f"{next(iter(still))}",
                "check the device's storage; the running release was not changed",
            )
    backend = BACKENDS.get(bundle.manifest["backend"]["name"])
    if backend is not None and backend.builds_on_device:
        report(name, "building the TensorRT engine on the device")
        # A family bundle's engine options are resolved for the board the device is registered as.
        result.engine = await agent.call(
            "engine", release, str(ENGINE_TIMEOUT_S), agent.device.target, timeout=ENGINE_TIMEOUT_S + 30
        )
    state = await agent.call(
        "activate",
        release,
        json.dumps({"model": bundle.manifest["model"]["name"], "target": bundle.manifest["target"]["name"]}),
    )
    result.previous = state["previous"] if state["previous"] != release else None
    report(name, "health check")
    result.health = await _health_check(agent, release)
    if not result.health["healthy"]:
        if result.previous is not None:
            await agent.call("switch", result.previous, f"health check of {release} failed")
        # A release that was on the device before this flash (re-flashed, or an older one flashed again)
        # is not this flash's to delete: the device keeps what it had.
        if not prepared["complete"]:
            await agent.call("discard", release)
        if result.previous is not None:
            back = f"rolled back to {result.previous}"
        elif state["previous"] == release:
            back = f"{release} stays active, as it was before this flash"
        else:
            back = "nothing is active"
        raise UserError(f"device {name}: health check failed ({result.health['why']}); {back}", _HINT)
    pruned = await agent.call("prune", str(keep))
    result.removed, result.free_bytes = pruned["removed"], pruned["free"]


def _resumable(local: Path, started: dict | None) -> int:
    """Bytes of ``local`` that an interrupted upload already holds: its length, when its content is
    ``local``'s prefix of that length, else 0 (start over)."""
    if not started or started["bytes"] >= local.stat().st_size:
        return 0
    digest = hashlib.sha256()
    with local.open("rb") as handle:
        remaining = started["bytes"]
        while remaining:
            block = handle.read(min(remaining, 1 << 20))
            digest.update(block)
            remaining -= len(block)
    return started["bytes"] if digest.hexdigest() == started["sha256"] else 0


_HINT = "run the bundle here with redux-edge run --check, or rebuild it"


async def _health_check(agent: DeviceAgent, release: str) -> dict:
    """The release's runner on its recorded sample: outputs must match the recorded outputs."""
    verdict, failure = await agent.runner(release, ["--check"], HEALTH_TIMEOUT_S)
    if verdict is None:
        return {"healthy": False, "why": f"the runner failed: {failure}"}
    if not verdict.get("healthy"):
        verdict["why"] = f"outputs differ from the recorded sample by up to {verdict.get('max_abs')}"
    return verdict


def rollback(device: Device, to: str | None = None) -> dict:
    """Point ``current`` at ``to``, or at the release active before the current one; health-check it."""

    async def work(agent: DeviceAgent) -> dict:
        state = await agent.call("state")
        current = state["current"]
        target = to or _previous_release(state)
        if target is None:
            raise UserError(f"device {device.name} has no earlier release", "flash a bundle first")
        if target not in state["releases"]:
            raise UserError(
                f"release {target} is not on device {device.name}",
                f"releases there: {', '.join(state['releases']) or 'none'}",
            )
        await agent.call("switch", target, "rollback")
        health = await _health_check(agent, target)
        if not health["healthy"] and current is not None:
            await agent.call("switch", current, f"rollback to {target} failed its health check")
            raise UserError(
                f"device {device.name}: release {target} failed its health check ({health['why']}); "
                f"stayed on {current}",
                "flash a new bundle",
            )
        return {"device": device.name, "from": current, "to": target, "health": health}

    return asyncio.run(with_device(device, work))


def _previous_release(state: dict) -> str | None:
    """The latest release in the history, other than the current one, that is still on the device."""
    for entry in reversed(state["history"]):
        if entry["release"] != state["current"] and entry["release"] in state["releases"]:
            return entry["release"]
    return None
