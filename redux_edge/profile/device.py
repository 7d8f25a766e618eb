"""Profile a flashed bundle on its device: the release's own runner measures there (warm-up, N runs or a
duration, statistics, peak RSS, per-layer times from the backend's profiler, tegrastats on Jetson), so
the numbers are the device's, not this machine's; the record goes into the local profile store."""

from __future__ import annotations

import asyncio
from pathlib import Path

from redux_edge.bundle import load_bundle
from redux_edge.deploy.devices import Device
from redux_edge.deploy.flash import DeviceAgent, release_id, with_device
from redux_edge.errors import UserError

__all__ = ["profile_on_device"]


def profile_on_device(
    bundle_path: Path,
    device: Device,
    warmup: int = 10,
    iterations: int = 100,
    duration: float | None = None,
    layer_runs: int = 10,
    threads: int | None = None,
) -> dict:
    """A profile record (not yet stored) of ``bundle_path``'s release on ``device``."""
    if iterations < 1 or warmup < 0 or (duration is not None and duration <= 0):
        raise UserError("iterations must be >= 1, warm-up >= 0, duration > 0", "fix the numbers")
    bundle = load_bundle(bundle_path)
    release = release_id(bundle)
    arguments = ["--bench", "--json", "--latencies", "--warmup", str(warmup), "--iterations", str(iterations)]
    arguments += ["--layers", str(layer_runs)] if layer_runs else []
    arguments += ["--duration", str(duration)] if duration else []
    arguments += ["--threads", str(threads)] if threads is not None else []
    # Generous: the runner's own startup, the warm-up, the layer profile; a duration bounds the rest.
    timeout = 600.0 + (duration or 0.0)

    async def work(agent: DeviceAgent) -> tuple[dict | None, str]:
        state = await agent.call("state")
        if release not in state["releases"]:
            raise UserError(
                f"bundle {bundle_path} (release {release}) is not on device {device.name}",
                f"flash it first: redux-edge flash {bundle_path} --device {device.name}",
            )
        return await agent.runner(release, arguments, timeout)

    report, failure = asyncio.run(with_device(device, work))
    if report is None:
        raise UserError(f"the runner failed on device {device.name}: {failure}", "see --debug")
    started, finished = report.pop("started"), report.pop("finished")
    return {
        "device": device.name,
        "target": bundle.manifest["target"]["name"],
        "bundle": release,
        "bundle_path": str(bundle_path),
        "model": bundle.manifest["model"]["name"],
        "backend": bundle.manifest["backend"]["name"],
        "started": started,
        "finished": finished,
        "latencies_ms": report.pop("latencies_ms"),
        "layers": report.pop("layers", None),
        "tegrastats": report.pop("tegrastats"),
        "emulated": report.pop("emulated", None),
        "stats": report,
    }
