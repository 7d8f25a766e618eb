"""``devices check``: what a device is (from the agent's ``info``), and where it does not suit its target
or a bundle: another CPU architecture, no runtime for the target's backends, no JetPack or trtexec on a
Jetson target, a bundle compiled for another target or for a runtime the device lacks."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from redux_edge.backends import BACKENDS
from redux_edge.bundle import load_bundle
from redux_edge.deploy.devices import Device
from redux_edge.deploy.flash import DeviceAgent, with_device
from redux_edge.manifest import Manifest
from redux_edge.targets import Target, load_target

__all__ = ["check", "suitability"]

_ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64"}
# The Python modules a device is asked for (import name -> distribution): numpy and every backend's.
_MODULES = {"numpy": "numpy"} | {
    module: distribution
    for backend in BACKENDS.values()
    for module, distribution in backend.device_modules.items()
}


def check(device: Device, bundle_path: Path | None = None) -> dict:
    async def work(agent: DeviceAgent) -> dict:
        return await agent.call("info", json.dumps(_MODULES), json.dumps(device.storage_limit_bytes))

    manifest = load_bundle(bundle_path).manifest if bundle_path is not None else None
    facts = asyncio.run(with_device(device, work))
    return {"device": facts, "warnings": suitability(device, facts, manifest)}


def suitability(device: Device, facts: dict, manifest: Manifest | None) -> list[str]:
    """Warnings, each one line, for a device described by ``facts``."""
    target = load_target(device.target)
    machine = _ARCH_ALIASES.get(facts["machine"], facts["machine"])
    warnings = []
    if _ARCH_ALIASES.get(target.arch, target.arch) != machine:
        warnings.append(f"device is {machine}, its target {target.name} is {target.arch}")
    have = set(facts["runtimes"]) | ({"trtexec"} if facts.get("trtexec") else set())
    if "numpy" not in have:
        warnings.append("numpy is missing on the device: no bundle runner can start")
    if not {BACKENDS[name].device_runtime for name in target.backends if name in BACKENDS} & have:
        warnings.append(
            f"none of the runtimes of {target.name} ({', '.join(target.backends)}) is on the device"
        )
    if target.name.startswith("jetson") and not facts.get("jetpack"):
        warnings.append(f"target {target.name} is a Jetson, but the device has no /etc/nv_tegra_release")
    if manifest is not None:
        bundle_target = Target.from_json(manifest["target"])
        if not bundle_target.admits(device.target):
            boards = f" (boards {', '.join(bundle_target.members)})" if bundle_target.members else ""
            warnings.append(
                f"the device ({device.target}) is outside the bundle's target {bundle_target.name}{boards}"
            )
        backend = manifest["backend"]["name"]
        if backend not in BACKENDS or BACKENDS[backend].device_runtime not in have:
            warnings.append(f"the bundle runs on {backend}, which the device lacks")
        arch = _ARCH_ALIASES.get(manifest["target"]["arch"], manifest["target"]["arch"])
        if arch != machine:
            warnings.append(f"the bundle was compiled for {arch}, the device is {machine}")
    return warnings
