"""How the host reaches a device: run an argv there, and put a file there. Two transports, one contract.

``SSHTransport`` speaks SSH through ``asyncssh`` (RFC 4253/4254 sessions, SFTP for files): host keys are
checked against the device's known_hosts file, the key file or the user's agent authenticates, and every
command is an argv joined with ``shlex.join``, so no word reaches the remote shell unquoted.
``LocalTransport`` treats a directory on this machine as a device (users without hardware, CI), running
the same agent and runner as subprocesses. Files land under a temporary name and are renamed into place,
so a cut connection never leaves a half-written file under its real name.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redux_edge.deploy.devices import Device
from redux_edge.errors import UserError

__all__ = ["Completed", "ConnectionLost", "LocalTransport", "SSHTransport", "Transport", "connect"]

CONNECT_TIMEOUT_S = 10.0
_CHUNK = 1 << 20


@dataclass
class Completed:
    code: int
    stdout: str
    stderr: str


class ConnectionLost(UserError):
    """The device went away in the middle of an operation."""


class Transport:
    device: Device

    async def run(self, argv: list[str], stdin: str | None = None, timeout: float | None = None) -> Completed:
        raise NotImplementedError

    async def put(self, local: Path, remote: str, offset: int = 0) -> None:
        """Copy ``local`` to ``remote`` through ``remote.upload``; with ``offset``, the upload file
        already holds that many bytes of ``local`` and only the rest is sent."""
        raise NotImplementedError

    async def close(self) -> None:
        """Nothing to release by default."""


class LocalTransport(Transport):
    def __init__(self, device: Device) -> None:
        self.device = device

    async def run(self, argv: list[str], stdin: str | None = None, timeout: float | None = None) -> Completed:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(
                process.communicate(stdin.encode() if stdin is not None else None), timeout
            )
        except TimeoutError:
            process.kill()
            raise
        return Completed(process.returncode or 0, out.decode(), err.decode())

    async def put(self, local: Path, remote: str, offset: int = 0) -> None:
        def copy() -> None:
            scratch = f"{remote}.upload"
            with local.open("rb") as source, open(scratch, "ab" if offset else "wb") as target:
                source.seek(offset)
                shutil.copyfileobj(source, target, _CHUNK)
            os.replace(scratch, remote)

        await asyncio.to_thread(copy)


class SSHTransport(Transport):
    def __init__(self, device: Device, connection) -> None:
        self.device = device
        self._connection = connection
        self._sftp: Any = None

    async def run(self, argv: list[str], stdin: str | None = None, timeout: float | None = None) -> Completed:
        import asyncssh

        try:
            result = await self._connection.run(shlex.join(argv), input=stdin, check=False, timeout=timeout)
        except TimeoutError:
            raise  # asyncssh's is also an OSError; the caller knows what timed out
        except (asyncssh.Error, OSError) as exc:
            raise self._lost(exc) from exc
        # exit_status is None when the remote side died of a signal.
        code = result.exit_status if result.exit_status is not None else 128
        return Completed(code, result.stdout or "", result.stderr or "")

    async def put(self, local: Path, remote: str, offset: int = 0) -> None:
        import asyncssh

        try:
            if self._sftp is None:
                self._sftp = await self._connection.start_sftp_client()
            scratch = f"{remote}.upload"
            if offset:
                async with self._sftp.open(scratch, "ab") as target:
                    with local.open("rb") as source:
                        source.seek(offset)
                        while block := source.read(_CHUNK):
                            await target.write(block)
            else:
                await self._sftp.put(str(local), scratch)
            await self._sftp.posix_rename(scratch, remote)
        except asyncssh.SFTPError as exc:
            raise UserError(
                f"device {self.device.name} cannot store {remote}: {exc.reason}",
                "free space on the device or fix the permissions of its root",
            ) from exc
        except (asyncssh.Error, OSError) as exc:
            raise self._lost(exc) from exc

    def _lost(self, exc: Exception) -> ConnectionLost:
        return ConnectionLost(
            f"lost the connection to device {self.device.name}: {exc}",
            "flash again: files already uploaded are kept and not sent twice",
        )

    async def close(self) -> None:
        if self._sftp is not None:
            self._sftp.exit()
        self._connection.close()
        await self._connection.wait_closed()


async def connect(device: Device) -> Transport:
    """A transport to ``device``; user errors for a host that cannot be reached or will not let us in."""
    if device.is_local:
        return LocalTransport(device)
    import asyncssh

    options: dict[str, object] = {"known_hosts": str(device.known_hosts_path)}
    if device.key is not None:
        key = Path(device.key).expanduser()
        if not key.is_file():
            raise UserError(
                f"key file {key} of device {device.name} does not exist", "fix key in devices.toml"
            )
        # A named key is the only one offered: an agent's keys would hide a wrong key file.
        options |= {"client_keys": [str(key)], "agent_path": None}
    if not device.known_hosts_path.is_file():
        raise UserError(
            f"known_hosts file {device.known_hosts_path} does not exist",
            f"check the device's key, then: {_keyscan(device)}",
        )
    where = f"{device.host}:{device.port}"
    try:
        connection = await asyncio.wait_for(
            asyncssh.connect(device.host, device.port, username=device.user, **options), CONNECT_TIMEOUT_S
        )
    except asyncssh.HostKeyNotVerifiable as exc:
        raise await _untrusted_host_key(device, where) from exc
    except asyncssh.PermissionDenied as exc:
        offered = device.key or "your agent's keys"
        raise UserError(
            f"device {device.name} ({device.user}@{where}) refused {offered}",
            f"authorise the key: ssh-copy-id -i {device.key or '~/.ssh/id_ed25519'}.pub -p {device.port} "
            f"{device.user}@{device.host}",
        ) from exc
    except asyncssh.KeyImportError as exc:
        raise UserError(f"cannot read key file {device.key}: {exc}", "give an OpenSSH private key") from exc
    except (TimeoutError, OSError, asyncssh.Error) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else getattr(exc, "strerror", None) or exc
        raise UserError(
            f"cannot reach device {device.name} at {where}: {reason}",
            "check the address in devices.toml and that sshd runs on the device",
        ) from exc
    return SSHTransport(device, connection)


async def _untrusted_host_key(device: Device, where: str) -> UserError:
    """Why a host key was not trusted: no entry for the device (a first connection), or entries for it that
    hold another key, which is what an interception looks like, and is never to be appended over."""
    import asyncssh

    try:
        known = asyncssh.read_known_hosts(str(device.known_hosts_path))
        stored = [key.get_fingerprint() for key in known.match(device.host, "", device.port)[0]]
    except (OSError, ValueError, asyncssh.Error):
        stored = []
    if not stored:
        return UserError(
            f"host key of device {device.name} ({where}) is not in {device.known_hosts_path}",
            f"if the device is yours: {_keyscan(device)}",
        )
    try:
        offered_key = await asyncio.wait_for(
            asyncssh.get_server_host_key(device.host, device.port), CONNECT_TIMEOUT_S
        )
        offered = offered_key.get_fingerprint() if offered_key else "no key"
    except (TimeoutError, OSError, asyncssh.Error):
        offered = "a key it would not show again"
    return UserError(
        f"host key of device {device.name} ({where}) has CHANGED: it offers {offered}, "
        f"{device.known_hosts_path} holds {', '.join(stored)}",
        "someone may be intercepting the connection, or the device was reinstalled: confirm the new key "
        "with the device itself before replacing the old entry",
    )


def _keyscan(device: Device) -> str:
    return f"ssh-keyscan -p {device.port} {device.host} >> {device.known_hosts_path}"
