"""Deployment targets, one TOML file each in ``targets/``: what a compiled bundle must run on.

A target names the hardware facts a backend needs (architecture, LLVM triple and CPU, CPU features,
CUDA compute capability, DLA cores, sparse tensor cores, JetPack/L4T and runtime versions) and the
backends that can serve it, in order of preference. ``host`` is special: its architecture and CPU
features are read from the running machine when it is resolved.

A family target (``jetson``, ``arm64``, ``x86-64``) lists its ``members``: its facts are what every member
has (the oldest TensorRT, the baseline instruction set, no DLA, no sparse tensor cores), so that one
bundle runs on all of them; what only some members have is resolved on each device (``member_options``).
"""

from __future__ import annotations

import platform
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from redux_edge.errors import UserError

__all__ = ["TARGETS_DIR", "Target", "available_targets", "load_target"]

TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"

_REQUIRED = {
    "name",
    "description",
    "arch",
    "triple",
    "cpu",
    "cpu_features",
    "backends",
    "sparse_tensor_cores",
}
_OPTIONAL = {"gpu_compute_capability", "dla_cores", "runtime", "members"}


# LLVM feature names and the names Linux's /proc/cpuinfo gives the same feature on aarch64.
_ALIASES = {"dotprod": ("asimddp",), "fullfp16": ("asimdhp", "fphp")}


def _spelling(feature: str) -> str:
    return feature.lower().replace("_", "").replace("-", "")


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    arch: str
    triple: str
    cpu: str
    cpu_features: tuple[str, ...]
    backends: tuple[str, ...]
    sparse_tensor_cores: bool
    gpu_compute_capability: str | None = None
    dla_cores: int = 0
    runtime: dict[str, str] = field(default_factory=dict)
    members: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, recorded: dict) -> Target:
        """The target as a manifest recorded it (``host`` resolved on the machine that compiled)."""
        fields = {
            **recorded,
            "cpu_features": tuple(recorded["cpu_features"]),
            "backends": tuple(recorded["backends"]),
            "members": tuple(recorded.get("members", ())),
        }
        return cls(
            description=recorded.get("description", ""),
            **{k: v for k, v in fields.items() if k != "description"},
        )

    def has(self, feature: str) -> bool:
        """Whether the CPU has ``feature``, by any of its spellings: target files use LLVM's names
        (``avx512vnni``, ``dotprod``), ``/proc/cpuinfo`` the kernel's (``avx512_vnni``, ``asimddp``)."""
        wanted = {_spelling(feature), *(_spelling(a) for a in _ALIASES.get(_spelling(feature), ()))}
        return any(_spelling(have) in wanted for have in self.cpu_features)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "arch": self.arch,
            "triple": self.triple,
            "cpu": self.cpu,
            "cpu_features": list(self.cpu_features),
            "backends": list(self.backends),
            "sparse_tensor_cores": self.sparse_tensor_cores,
            "gpu_compute_capability": self.gpu_compute_capability,
            "dla_cores": self.dla_cores,
            "runtime": dict(self.runtime),
            "members": list(self.members),
        }

    def admits(self, device_target: str) -> bool:
        """Whether a bundle for this target runs on a device registered as ``device_target``."""
        return device_target == self.name or device_target in self.members


def available_targets() -> list[str]:
    return sorted(path.stem for path in TARGETS_DIR.glob("*.toml"))


def load_target(name: str) -> Target:
    path = TARGETS_DIR / f"{name}.toml"
    if "/" in name or not path.is_file():
        raise UserError(f"unknown target '{name}'", f"choose one of: {', '.join(available_targets())}")
    with path.open("rb") as handle:
        spec = tomllib.load(handle)
    keys = set(spec)
    if missing := _REQUIRED - keys:
        raise UserError(f"target file {path} lacks {', '.join(sorted(missing))}", "see docs/ARCHITECTURE.md")
    if unknown := keys - _REQUIRED - _OPTIONAL:
        raise UserError(f"target file {path} has unknown keys {', '.join(sorted(unknown))}", "remove them")
    spec["cpu_features"] = tuple(spec["cpu_features"])
    spec["backends"] = tuple(spec["backends"])
    spec["members"] = tuple(spec.get("members", ()))
    if spec["arch"] == "native":
        spec.update(_native_cpu())
    target = Target(**spec)
    for member in map(load_target, target.members):
        if member.members or member.arch != target.arch:
            raise UserError(
                f"target file {path}: member {member.name} is a family or not {target.arch}", "fix members"
            )
    return target


def _native_cpu() -> dict:
    machine = platform.machine()
    flags: tuple[str, ...] = ()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            # x86 calls the list "flags", aarch64 calls it "Features"
            if line.split(":")[0].strip() in ("flags", "Features"):
                flags = tuple(line.split(":", 1)[1].split())
                break
    return {"arch": machine, "triple": f"{machine}-linux-gnu", "cpu": "native", "cpu_features": flags}
