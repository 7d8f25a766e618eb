"""arm64 bundles on the emulated aarch64 board (redux_edge/deploy/emulated.py: Debian arm64's Python with
PyPI's aarch64 wheels under qemu-aarch64): the bundle's own runner for ONNX Runtime and TVM, and flash +
health check + profile to a local device whose Python is the board's. Every figure here is emulated."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from redux_edge import api
from redux_edge.backends.board import board_python
from redux_edge.deploy.emulated import board_rpc_tracker
from redux_edge.recipe import load_recipe

BOARD = board_python()
pytestmark = pytest.mark.skipif(
    BOARD is None, reason="no emulated aarch64 board (make test builds it as root: tools/emulated_aarch64.py)"
)


@pytest.fixture(scope="module")
def arm_bundles(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("arm64")
    return {
        backend: api.compile_model(
            "mnist-cnn", "arm64-cortex-a72", load_recipe(None), folder / backend, backend_name=backend
        ).path
        for backend in ("onnxruntime", "tvm")
    }


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_an_arm64_bundles_runner_checks_itself_on_the_emulated_board(arm_bundles, backend):
    machine = subprocess.run(
        [str(BOARD), "-c", "import platform; print(platform.machine())"], capture_output=True
    )
    assert machine.stdout.decode().strip() == "aarch64"
    bundle = arm_bundles[backend]
    # The compile ran the artifact as aarch64 code: ONNX Runtime's through the runner on the board.
    ran = json.loads((bundle / "manifest.json").read_text())["verify"]["artifact_run"]
    expected = "ran on the emulated aarch64 board (qemu cortex-a72" if backend == "onnxruntime" else "qemu"
    assert expected in ran, ran
    checked = subprocess.run(
        [str(BOARD), str(bundle / "runner" / "run.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout.strip().splitlines()[-1])["healthy"] is True
    benched = subprocess.run(
        [str(BOARD), str(bundle / "runner" / "run.py"), "--bench", "--iterations", "3", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(benched.stdout.strip().splitlines()[-1])
    assert report["emulated"].startswith("aarch64 under qemu-aarch64") and report["p50_ms"] > 0


@pytest.mark.slow
def test_an_arm64_bundle_flashes_to_the_emulated_board_and_is_profiled(
    cli, tmp_path, monkeypatch, arm_bundles
):
    monkeypatch.setenv("REDUX_EDGE_DEVICES", str(tmp_path / "devices.toml"))
    monkeypatch.setenv("REDUX_EDGE_PROFILES", str(tmp_path / "profiles"))
    added = cli(
        "devices", "add", "pi", "--target", "arm64-cortex-a72", "--address", "local",
        "--root", tmp_path / "pi", "--python", BOARD,
    )  # fmt: skip
    assert added.exit_code == 0, added.stderr
    check = json.loads(cli("devices", "check", "pi", "--json").stdout)
    assert check["device"]["machine"] == "aarch64" and check["warnings"] == []
    assert check["device"]["emulated"] and "onnxruntime" in check["device"]["runtimes"]

    (row,) = json.loads(cli("flash", arm_bundles["onnxruntime"], "--device", "pi", "--json").stdout)
    assert row["ok"] and row["health"]["healthy"], row["error"]
    record = json.loads(
        cli("profile", arm_bundles["onnxruntime"], "--device", "pi", "--iterations", "5", "--json").stdout
    )
    assert record["emulated"].startswith("aarch64 under qemu-aarch64") and record["stats"]["iterations"] == 5


@pytest.mark.slow
def test_tvm_tunes_an_arm64_bundle_by_measuring_candidates_on_the_emulated_board(cli, tmp_path):
    database = tmp_path / "tuning"
    with board_rpc_tracker("cortex-a72", "emulated-a72") as tracker:
        compiled = cli(
            "compile", "--model", "mnist-cnn", "--target", "arm64-cortex-a72", "--backend", "tvm",
            "--tune", "4", "--tuning-db", database, "--rpc-tracker", tracker, "--rpc-key", "emulated-a72",
            "-o", tmp_path / "tuned",
        )  # fmt: skip
    assert compiled.exit_code == 0, compiled.stderr
    tuning = json.loads((tmp_path / "tuned" / "manifest.json").read_text())["backend"]["tuning"]
    assert tuning["trials"] == 4 and tuning["records_after"] >= 4
    # Each record holds the candidate's run times on the board; a failed measurement would hold none.
    records = [
        json.loads(line) for line in (database / "database_tuning_record.json").read_text().splitlines()
    ]
    assert all(0 < seconds < 1 for record in records for seconds in record[1][1])
    checked = subprocess.run(
        [str(BOARD), str(tmp_path / "tuned" / "runner" / "run.py"), "--check"],
        capture_output=True,
        timeout=300,
    )
    assert checked.returncode == 0, checked.stderr
