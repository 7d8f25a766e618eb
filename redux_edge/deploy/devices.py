"""The device registry: ``devices.toml``, naming each device and the groups (fleets) they belong to.

One table per device under ``[devices.<name>]`` and one list per group under ``[groups]``::

    [devices.orin-1]
    target = "jetson-orin-nano"
    address = "ssh://ubuntu@10.0.0.21:22"   # or "local" for a directory on this machine
    root = "/opt/redux-edge"                 # releases/, current, history.json live here
    key = "~/.ssh/redux_ed25519"             # omitted: the ssh-agent's keys
    known_hosts = "~/.ssh/known_hosts"       # host keys are always checked
    python = "python3"                       # the interpreter that runs the agent and the runner
    storage_limit = "2 GiB"                  # optional: the most the root may hold (flash refuses more)

    [groups]
    lab = ["orin-1", "orin-2"]

The file lives at ``$REDUX_EDGE_DEVICES`` or ``~/.config/redux-edge/devices.toml`` (``--devices``
overrides both) and is rewritten atomically.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import tomli_w

from redux_edge.errors import UserError
from redux_edge.files import write_atomically
from redux_edge.targets import load_target
from redux_edge.untrusted import read_toml

__all__ = ["Device", "Registry", "default_registry_path", "load_registry"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_FIELDS = {"target", "address", "root", "key", "known_hosts", "python", "storage_limit"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class Device:
    name: str
    target: str
    address: str
    root: str
    key: str | None = None
    known_hosts: str | None = None
    python: str = "python3"
    storage_limit: str | None = None

    @property
    def storage_limit_bytes(self) -> int | None:
        """``storage_limit`` in bytes ("512 MiB", "2G", "1500000"), None when the file system is the limit."""
        if self.storage_limit is None:
            return None
        match = _SIZE.match(str(self.storage_limit))
        if match is None:
            raise UserError(
                f"device '{self.name}' has storage_limit '{self.storage_limit}'",
                "write a size such as 512MiB or 2GiB",
            )
        return int(float(match.group(1)) * _UNITS[match.group(2)[:1].upper()])

    @property
    def is_local(self) -> bool:
        return self.address == "local"

    @property
    def url(self):
        return urlsplit(self.address)

    @property
    def host(self) -> str:
        return self.url.hostname or ""

    @property
    def port(self) -> int:
        return self.url.port or 22

    @property
    def user(self) -> str:
        return self.url.username or os.environ.get("USER", "root")

    @property
    def known_hosts_path(self) -> Path:
        return Path(self.known_hosts or "~/.ssh/known_hosts").expanduser()

    def describe(self) -> str:
        return "local directory" if self.is_local else f"{self.user}@{self.host}:{self.port}"


@dataclass
class Registry:
    path: Path
    devices: dict[str, Device] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)

    def resolve(self, device: str | None, group: str | None) -> list[Device]:
        """The devices one ``--device`` or ``--group`` names."""
        if (device is None) == (group is None):
            raise UserError("name one device or one group", "pass --device NAME or --group NAME")
        if device is not None:
            if device not in self.devices:
                raise UserError(f"unknown device '{device}' in {self.path}", self._choices("devices add"))
            return [self.devices[device]]
        if group not in self.groups:
            known = ", ".join(sorted(self.groups)) or "none"
            raise UserError(
                f"unknown group '{group}' in {self.path} (groups: {known})", "devices add --group"
            )
        return [self.devices[name] for name in self.groups[group]]

    def _choices(self, verb: str) -> str:
        known = ", ".join(sorted(self.devices))
        return f"devices: {known}" if known else f"register one with redux-edge {verb}"

    def add(self, device: Device, groups: list[str], replace: bool) -> None:
        _check_device(device)
        if device.name in self.devices and not replace:
            raise UserError(f"device '{device.name}' is already registered", "pass --replace to change it")
        self.devices[device.name] = device
        for group in groups:
            if not _NAME.match(group):
                raise UserError(f"bad group name '{group}'", "use letters, digits, '-', '_' and '.'")
            members = self.groups.setdefault(group, [])
            if device.name not in members:
                members.append(device.name)

    def remove(self, name: str) -> None:
        if name not in self.devices:
            raise UserError(f"unknown device '{name}' in {self.path}", self._choices("devices add"))
        del self.devices[name]
        for members in self.groups.values():
            if name in members:
                members.remove(name)
        self.groups = {group: members for group, members in self.groups.items() if members}

    def save(self) -> None:
        document = {
            "devices": {
                name: {k: v for k, v in asdict(device).items() if k != "name" and v is not None}
                for name, device in sorted(self.devices.items())
            },
            "groups": self.groups,
        }

        def dump(path: Path) -> None:
            with path.open("wb") as stream:
                tomli_w.dump(document, stream)

        write_atomically(self.path, dump)


def default_registry_path() -> Path:
    return Path(os.environ.get("REDUX_EDGE_DEVICES", "~/.config/redux-edge/devices.toml")).expanduser()


def load_registry(path: Path | None = None) -> Registry:
    path = path or default_registry_path()
    if not path.is_file():
        return Registry(path)
    hint = "fix the file or remove it"
    document = read_toml(path, hint)
    devices, groups = document.get("devices", {}), document.get("groups", {})
    if not isinstance(devices, dict) or not isinstance(groups, dict):
        raise UserError(f"{path}: devices and groups must be tables", hint)
    registry = Registry(path)
    for name, entry in devices.items():
        if not isinstance(entry, dict) or set(entry) - _FIELDS:
            raise UserError(
                f"device '{name}' in {path} has unknown keys", f"allowed: {', '.join(sorted(_FIELDS))}"
            )
        try:
            device = Device(name=name, **entry)
        except TypeError as exc:
            raise UserError(
                f"device '{name}' in {path} is incomplete: {exc}", "give target, address, root"
            ) from exc
        _check_device(device)
        registry.devices[name] = device
    for group, members in groups.items():
        if not isinstance(members, list) or not all(isinstance(member, str) for member in members):
            raise UserError(f"group '{group}' in {path} is not a list of device names", hint)
        if missing := [member for member in members if member not in registry.devices]:
            raise UserError(f"group '{group}' in {path} names unknown devices {missing}", "fix the group")
        registry.groups[group] = list(members)
    return registry


# A device root is a folder of its own: flashing writes releases/, current, history.json and .lock into it
# and `devices check` walks it. Not a system tree, nor a shared folder itself.
_SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/run", "/sbin",
                 "/sys", "/usr")  # fmt: skip
_SHARED_FOLDERS = {"/", "/home", "/root", "/tmp", "/opt", "/mnt", "/media", "/srv", "/var", "~"}


def _check_root(device: Device) -> None:
    root = device.root
    hint = 'give a folder of its own, e.g. root = "/opt/redux-edge" or "~/redux-edge"'
    if not root.startswith(("/", "~/")) or ".." in PurePosixPath(root).parts:
        raise UserError(f"device '{device.name}' has root {root!r}, which is not an absolute path", hint)
    normal = posixpath.normpath(root)
    if normal in _SHARED_FOLDERS or any(normal == t or normal.startswith(t + "/") for t in _SYSTEM_TREES):
        raise UserError(f"device '{device.name}' has root {root!r}, a system or shared folder", hint)


def _check_device(device: Device) -> None:
    if not _NAME.match(device.name):
        raise UserError(f"bad device name '{device.name}'", "use letters, digits, '-', '_' and '.'")
    for key, value in asdict(device).items():
        if (
            not isinstance(value, str)
            and not (key == "storage_limit" and type(value) is int)
            and (value is not None or key in ("target", "address", "root", "python"))
        ):
            raise UserError(f"device '{device.name}': {key} is {value!r}, not text", "write it in quotes")
    _check_root(device)
    load_target(device.target)
    device.storage_limit_bytes  # noqa: B018  (parsing it is the check)
    if device.is_local:
        return
    try:
        url = device.url
    except ValueError as exc:  # urlsplit refuses an unclosed IPv6 bracket
        raise UserError(
            f"device '{device.name}' has address '{device.address}' ({exc})", "write ssh://user@[::1]:22"
        ) from exc
    if url.scheme != "ssh" or not url.hostname or url.path not in ("", "/"):
        raise UserError(
            f"device '{device.name}' has address '{device.address}'",
            "write ssh://user@host:port, or local for a directory on this machine",
        )
    try:
        url.port  # noqa: B018  (urlsplit checks the port when it is read)
    except ValueError as exc:
        raise UserError(f"device '{device.name}': {exc}", "write ssh://user@host:port") from exc
