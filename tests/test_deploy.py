"""Flashing and profiling over SSH, against a real OpenSSH server started on 127.0.0.1 with throwaway keys.

The device is this machine: each test gives it fresh device roots (directories) behind the one sshd, and
its Python is this interpreter (numpy and ONNX Runtime installed). Bundles are real (the MNIST CNN from
ccexam and all-MiniLM-L6-v2, compiled for the host target).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_clean_user_error

from redux_edge.bundle import device_files, load_bundle, write_manifest
from redux_edge.deploy.devices import Device, load_registry
from redux_edge.deploy.flash import release_id

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
pytestmark = pytest.mark.skipif(
    not Path(SSHD).is_file(), reason="OpenSSH's sshd is missing (make test installs openssh-server)"
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


@dataclass
class SshServer:
    port: int
    user: str
    client_key: Path
    known_hosts: Path
    folder: Path

    def device(self, name: str, root: Path, **changes: str) -> Device:
        fields = {
            "target": "host",
            "address": f"ssh://{self.user}@127.0.0.1:{self.port}",
            "root": str(root),
            "key": str(self.client_key),
            "known_hosts": str(self.known_hosts),
            "python": sys.executable,
        }
        return Device(name, **(fields | changes))


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """OpenSSH's sshd on a free loopback port: key authentication only, host key in a known_hosts file."""
    folder = tmp_path_factory.mktemp("sshd")
    host_key = _keygen(folder / "host_key")
    client_key = _keygen(folder / "client_key")
    shutil.copy(folder / "client_key.pub", folder / "authorized_keys")
    port = _free_port()
    config = folder / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key}",
                f"AuthorizedKeysFile {folder / 'authorized_keys'}",
                f"PidFile {folder / 'sshd.pid'}",
                "UsePAM no",
                "StrictModes no",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "Subsystem sftp internal-sftp",
                "MaxStartups 30",
                "LogLevel ERROR",
                "",
            ]
        )
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    server = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start: {server.stderr.read().decode()}") from None
            time.sleep(0.05)
    public = (folder / "host_key.pub").read_text().split()[:2]
    known_hosts = folder / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {' '.join(public)}\n")
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    yield SshServer(port, user, client_key, known_hosts, folder)
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture
def registry(tmp_path, sshd, monkeypatch):
    """A devices.toml with one SSH device, ``edge-1``, and a profile store, both under tmp_path."""
    path = tmp_path / "devices.toml"
    monkeypatch.setenv("REDUX_EDGE_DEVICES", str(path))
    monkeypatch.setenv("REDUX_EDGE_PROFILES", str(tmp_path / "profiles"))
    devices = load_registry(path)
    devices.add(sshd.device("edge-1", tmp_path / "device-1"), [], replace=False)
    devices.save()
    return devices


def _rebundle(source: Path, out: Path, change) -> Path:
    """A copy of a bundle with ``change(folder, manifest)`` applied and its manifest rewritten."""
    shutil.copytree(source, out)
    manifest = json.loads((out / "manifest.json").read_text())
    change(out, manifest)
    write_manifest(out, {k: v for k, v in manifest.items() if k not in ("files", "format_version")})
    return out


def _unhealthy(folder: Path, manifest: dict) -> None:
    """Recorded sample outputs that the model does not produce: the health check must fail."""
    path = folder / "sample" / "outputs.npz"
    with np.load(path) as outputs:
        wrong = {name: outputs[name] + 1.0 for name in outputs.files}
    np.savez(path, **wrong)


def _current(root: Path) -> str:
    return Path(os.readlink(root / "current")).name


# 1. Flash a host bundle, health check passes, `current` points at it; profile goes into the store.
@pytest.mark.slow
def test_flash_then_profile_over_ssh(cli, registry, mnist_bundle, tmp_path):
    result = cli("flash", mnist_bundle, "--device", "edge-1", "--json")
    assert result.exit_code == 0, result.stderr
    (row,) = json.loads(result.stdout)
    release = release_id(load_bundle(mnist_bundle))
    root = tmp_path / "device-1"
    assert row["ok"] and row["release"] == release and row["health"]["healthy"]
    assert row["health"]["max_abs"] == 0.0
    assert _current(root) == release
    sent = [*device_files(load_bundle(mnist_bundle).manifest), "manifest.json"]
    assert sorted(row["uploaded"]) == sorted(sent) and "model.onnx" not in sent

    again = json.loads(cli("flash", mnist_bundle, "--device", "edge-1", "--json").stdout)[0]
    assert again["ok"] and again["uploaded"] == [] and again["uploaded_bytes"] == 0

    profiled = cli("profile", mnist_bundle, "--device", "edge-1", "--iterations", "30", "--json")
    assert profiled.exit_code == 0, profiled.stderr
    record = json.loads(profiled.stdout)
    stats = record["stats"]
    assert stats["iterations"] == 30 and len(record["latencies_ms"]) == 30
    assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
    assert stats["throughput_per_s"] > 0 and stats["peak_rss_mb"] > 10
    assert record["layers"]["layers"][0]["op"]  # ONNX Runtime's profiler named the slowest node
    assert record["device"] == "edge-1" and record["bundle"] == release and record["target"] == "host"
    stored = list((tmp_path / "profiles").glob("*.json"))
    assert [path.stem for path in stored] == [record["run"]]

    second = json.loads(
        cli("profile", mnist_bundle, "--device", "edge-1", "--iterations", "10", "--json").stdout
    )
    compared = cli("profile", "compare", record["run"], second["run"], "--json")
    ratios = {row["metric"]: row["ratio"] for row in json.loads(compared.stdout)["metrics"]}
    assert ratios["p50_ms"] == pytest.approx(second["stats"]["p50_ms"] / stats["p50_ms"])
    plotted = cli("profile", "plot", record["run"], second["run"], "-o", tmp_path / "latency.png")
    assert plotted.exit_code == 0 and (tmp_path / "latency.png").read_bytes().startswith(b"\x89PNG")


# 2. A release whose health check fails: the device ends on the first release; one line says why.
def test_failed_health_check_rolls_back(cli, registry, mnist_bundle, tmp_path):
    broken = _rebundle(mnist_bundle, tmp_path / "broken", _unhealthy)
    assert cli("flash", mnist_bundle, "--device", "edge-1").exit_code == 0
    first = release_id(load_bundle(mnist_bundle))

    result = cli("flash", broken, "--device", "edge-1")
    assert_clean_user_error(result, tmp_path, message="health check failed")
    assert f"rolled back to {first}" in result.stderr
    root = tmp_path / "device-1"
    assert _current(root) == first
    assert not (root / "releases" / release_id(load_bundle(broken))).exists()
    history = json.loads((root / "history.json").read_text())
    assert history[-1]["release"] == first and "health check" in history[-1]["reason"]


# 3. Cut the connection mid-upload: the device still serves the previous release; a retry sends the rest.
@pytest.mark.slow
def test_interrupted_upload_keeps_previous_release_and_resumes(
    cli, registry, mnist_bundle, minilm_bundle, tmp_path
):
    assert cli("flash", mnist_bundle, "--device", "edge-1").exit_code == 0
    first = release_id(load_bundle(mnist_bundle))
    root = tmp_path / "device-1"
    partial = root / "releases" / f"{release_id(load_bundle(minilm_bundle))}.partial"
    flashing_process = subprocess.Popen(
        [sys.executable, "-m", "redux_edge.cli", "flash", str(minilm_bundle), "--device", "edge-1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Uploads go in sorted order: the graph, then its weights (artifact/weights.bin, 86 MiB). Kill the client
    # part way through those.
    cut = partial / "artifact" / "weights.bin.upload"
    deadline = time.monotonic() + 120
    while not (cut.is_file() and cut.stat().st_size > 4 << 20):
        assert flashing_process.poll() is None, "the flash ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    flashing_process.send_signal(signal.SIGKILL)
    flashing_process.wait()
    assert not (partial / "artifact" / "weights.bin").exists()
    assert _current(root) == first
    check = subprocess.run(
        [sys.executable, str(root / "current" / "runner" / "run.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0 and json.loads(check.stdout)["healthy"]

    result = cli("flash", minilm_bundle, "--device", "edge-1", "--json")
    assert result.exit_code == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert row["resumed"]["artifact/weights.bin"] > 4 << 20  # only the rest of the cut file was sent
    assert row["uploaded_bytes"] < row["release_bytes"] - (4 << 20)
    # The same file as in the first release: hard-linked on the device, not sent.
    assert "runner/run.py" in row["reused"]
    assert (root / "releases" / first / "runner" / "run.py").stat().st_ino == (
        root / "releases" / row["release"] / "runner" / "run.py"
    ).stat().st_ino
    assert _current(root) == row["release"] and row["health"]["healthy"]
    assert not partial.exists()


# 4a. A bundle with a tampered file is refused before anything is sent.
def test_tampered_bundle_is_refused_before_upload(cli, registry, mnist_bundle, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(mnist_bundle, tampered)
    with (tampered / "model.onnx").open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01")
    result = cli("flash", tampered, "--device", "edge-1")
    assert_clean_user_error(result, tmp_path, message="does not match its manifest")
    assert "model.onnx" in result.stderr
    assert not (tmp_path / "device-1").exists()


# 4b. A file corrupted on the device is caught by the device's own sha256 check, and sent again.
def test_file_corrupted_on_the_device_is_caught(cli, registry, mnist_bundle, tmp_path):
    assert cli("flash", mnist_bundle, "--device", "edge-1").exit_code == 0
    root = tmp_path / "device-1"
    damaged = root / "current" / "artifact" / "model.onnx"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    # Same files, another release: the device reuses what it holds, the damaged file included.
    renamed = _rebundle(mnist_bundle, tmp_path / "renamed", lambda folder, m: m.update(note="second release"))

    (row,) = json.loads(cli("flash", renamed, "--device", "edge-1", "--json").stdout)
    assert row["ok"], row["error"]
    assert row["repaired"] == ["artifact/model.onnx"]
    assert row["uploaded"] == ["manifest.json"] and "artifact/model.onnx" in row["reused"]
    assert row["health"]["healthy"] and row["health"]["max_abs"] == 0.0


# 5. Unknown device, unreachable host, wrong key, unknown or changed host key: one line, exit code 2.
def test_connection_user_errors(cli, registry, sshd, mnist_bundle, tmp_path):
    assert_clean_user_error(
        cli("flash", mnist_bundle, "--device", "nope"), tmp_path, message="unknown device 'nope'"
    )

    wrong_key = _keygen(tmp_path / "wrong_key")
    stranger = tmp_path / "stranger_known_hosts"
    other_host_key = _keygen(tmp_path / "other_host_key")
    other_key = " ".join(Path(f"{other_host_key}.pub").read_text().split()[:2])
    stranger.write_text(f"[127.0.0.1]:{sshd.port} {other_key}\n")
    elsewhere = tmp_path / "elsewhere_known_hosts"
    elsewhere.write_text(f"[10.9.9.9]:22 {other_key}\n")
    cases = {
        "unreachable": ({"address": f"ssh://{sshd.user}@127.0.0.1:{_free_port()}"}, "cannot reach device"),
        "wrong-key": ({"key": str(wrong_key)}, "refused"),
        "unknown-host-key": ({"known_hosts": str(elsewhere)}, f"is not in {elsewhere}"),
        "changed-host-key": ({"known_hosts": str(stranger)}, "has CHANGED: it offers SHA256:"),
        "no-known-hosts": ({"known_hosts": str(tmp_path / "missing")}, "known_hosts file"),
    }
    for name, (changes, _) in cases.items():
        registry.add(sshd.device(name, tmp_path / name, **changes), [], replace=False)
    registry.save()
    for name, (_, message) in cases.items():
        for command in (("flash", mnist_bundle), ("devices", "check"), ("profile", mnist_bundle)):
            argv = [*command, "--device", name] if command[0] != "devices" else [*command, name]
            result = cli(*argv)
            assert_clean_user_error(result, tmp_path, message=message)
            # A changed key is never to be appended over: no ssh-keyscan advice.
            assert name != "changed-host-key" or ">>" not in result.stderr
        assert not (tmp_path / name).exists()


# 6. Three devices of a group, flashed concurrently; one result row per device.
@pytest.mark.slow
def test_group_is_flashed_concurrently(cli, registry, sshd, mnist_bundle, tmp_path):
    for name in ("fleet-a", "fleet-b", "fleet-c"):
        registry.add(sshd.device(name, tmp_path / name), ["fleet"], replace=False)
    registry.save()
    result = cli("flash", mnist_bundle, "--group", "fleet", "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["device"] for row in rows] == ["fleet-a", "fleet-b", "fleet-c"]
    assert all(row["ok"] and row["health"]["healthy"] for row in rows)
    release = release_id(load_bundle(mnist_bundle))
    assert all(_current(tmp_path / row["device"]) == release for row in rows)
    # Concurrent: every device started before any finished.
    assert max(row["started"] for row in rows) < min(row["started"] + row["seconds"] for row in rows)

    table = cli("flash", mnist_bundle, "--group", "fleet")
    assert table.exit_code == 0 and all(name in table.stdout for name in ("fleet-a", "fleet-b", "fleet-c"))


def test_one_failed_device_in_a_group_is_its_row(cli, registry, sshd, mnist_bundle, tmp_path):
    registry.add(sshd.device("good", tmp_path / "good"), ["mixed"], replace=False)
    registry.add(
        sshd.device("gone", tmp_path / "gone", address="ssh://root@127.0.0.1:1"), ["mixed"], replace=False
    )
    registry.save()
    result = cli("flash", mnist_bundle, "--group", "mixed", "--json")
    assert_clean_user_error(result, tmp_path, message="1 of 2 devices failed")
    rows = {row["device"]: row for row in json.loads(result.stdout)}
    assert rows["good"]["ok"] and not rows["gone"]["ok"] and "cannot reach" in rows["gone"]["error"]


@pytest.mark.slow
def test_rollback_and_keep(cli, registry, mnist_bundle, tmp_path):
    releases = [mnist_bundle] + [
        _rebundle(mnist_bundle, tmp_path / f"r{i}", lambda folder, m, i=i: m.update(note=f"release {i}"))
        for i in range(3)
    ]
    ids = [release_id(load_bundle(path)) for path in releases]
    for path in releases:
        assert cli("flash", path, "--device", "edge-1", "--keep", "2").exit_code == 0
    root = tmp_path / "device-1"
    assert sorted(p.name for p in (root / "releases").iterdir()) == sorted(ids[-2:])

    result = cli("rollback", "--device", "edge-1", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["to"] == ids[-2] and _current(root) == ids[-2]
    assert_clean_user_error(
        cli("rollback", "--device", "edge-1", "--to", ids[0]), tmp_path, message="not on device"
    )


def test_target_mismatch_is_refused_and_checked(cli, registry, sshd, mnist_bundle, tmp_path):
    registry.add(sshd.device("pi", tmp_path / "pi", target="arm64-cortex-a72"), [], replace=False)
    registry.save()
    assert_clean_user_error(
        cli("flash", mnist_bundle, "--device", "pi"), tmp_path, message="is for target host"
    )
    report = cli("devices", "check", "pi", "--bundle", mnist_bundle, "--json")
    assert report.exit_code == 0, report.stderr
    facts = json.loads(report.stdout)
    assert facts["device"]["machine"] == os.uname().machine
    assert "onnxruntime" in facts["device"]["runtimes"]
    warnings = " | ".join(facts["warnings"])
    assert "the device (arm64-cortex-a72) is outside the bundle's target host" in warnings
    if os.uname().machine != "aarch64":
        assert "its target arm64-cortex-a72 is aarch64" in warnings
