"""Family targets (issue 21): one bundle for every board of a family. ``jetson`` is flashed to local devices
standing in for an Orin Nano, a Xavier NX and a Nano: each has the labelled trtexec stand-in
(tests/data/trtexec_standin.py) at its own TensorRT version and an nvidia-smi naming its own GPU, builds
its own engine with the options resolved for it, and passes its health check."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
from conftest import add_local_device, assert_clean_user_error

from redux_edge import api
from redux_edge.backends.board import board_python
from redux_edge.recipe import load_recipe, passes_from_flags
from redux_edge.targets import load_target

STANDIN = Path(__file__).parent / "data" / "trtexec_standin.py"
BOARDS = {  # device name: (its target, TensorRT version as trtexec prints it, GPU as nvidia-smi names it)
    "orin": ("jetson-orin-nano", "100300", "Orin (nvgpu)"),
    "xavier": ("jetson-xavier-nx", "8506", "Xavier (nvgpu)"),
    "nano": ("jetson-nano", "8201", "NVIDIA Tegra X1 (nvgpu)"),
}


def _board_python(folder: Path, tensorrt: str, gpu: str) -> Path:
    """A device's Python whose PATH has that board's trtexec and nvidia-smi."""
    tools = folder / "bin"
    tools.mkdir(parents=True)
    trtexec = f'#!/bin/sh\nTRTEXEC_STANDIN_VERSION={tensorrt} exec "{sys.executable}" "{STANDIN}" "$@"\n'
    (tools / "trtexec").write_text(trtexec)
    (tools / "nvidia-smi").write_text(f"#!/bin/sh\necho '{gpu}'\n")
    (tools / "python3").write_text(f'#!/bin/sh\nPATH="{tools}:$PATH" exec "{sys.executable}" "$@"\n')
    for tool in tools.iterdir():
        tool.chmod(0o755)
    return tools / "python3"


def test_families_are_what_every_member_has():
    jetson = load_target("jetson")
    boards = [load_target(name) for name in jetson.members]
    assert {"jetson-nano", "jetson-xavier-nx", "jetson-orin-nano"} <= set(jetson.members)
    versions = [tuple(int(part) for part in b.runtime["tensorrt"].split(".")) for b in boards]
    assert jetson.runtime["tensorrt"] == ".".join(map(str, min(versions)))
    assert float(jetson.gpu_compute_capability) == min(float(b.gpu_compute_capability) for b in boards)
    assert jetson.dla_cores == 0 and not jetson.sparse_tensor_cores
    arm64 = load_target("arm64")
    for member in map(load_target, arm64.members):
        assert member.arch == arm64.arch and set(arm64.cpu_features) <= set(member.cpu_features)
    x86 = load_target("x86-64")  # x86-64-v2; every member has AVX2, so v3 and v2 with it
    assert x86.cpu == "x86-64-v2" and all(load_target(m).has("avx2") for m in x86.members)


def test_a_jetson_bundle_resolves_sparsity_and_dla_per_board(tmp_path):
    bundle = api.compile_model(
        "mnist-cnn",
        "jetson",
        load_recipe(None).extended(passes_from_flags({"sparsity": "2:4"})),
        tmp_path / "b",
        backend_options={"dla_core": 0},
    )
    plan = bundle.manifest["backend"]["engine_build"]
    assert "--useDLACore=0" not in plan["argv"] and "--sparsity=enable" not in plan["argv"]
    resolved = {
        board: (options["sparsity"], options["dla_core"]) for board, options in plan["members"].items()
    }
    assert resolved == {
        "jetson-nano": (False, None),
        "jetson-xavier-nx": (False, 0),
        "jetson-orin-nano": (True, None),
        "jetson-agx-orin": (True, 0),
    }
    assert "--sparsity=enable" in plan["members"]["jetson-orin-nano"]["argv"]
    assert bundle.manifest["backend"]["support"]["tensorrt"] == "8.2"


@pytest.mark.slow
def test_one_minilm_jetson_bundle_flashed_to_a_mixed_fleet(cli, env, tmp_path_factory):
    out = tmp_path_factory.mktemp("family") / "jetson"
    compiled = cli("compile", "--model", "minilm-l6", "--target", "jetson", "--dla-core", "0", "-o", out)
    assert compiled.exit_code == 0, compiled.stderr
    for name, (target, tensorrt, gpu) in BOARDS.items():
        python = _board_python(env / f"{name}-tools", tensorrt, gpu)
        added = add_local_device(cli, name, env / name, target, "--python", python, "--group", "fleet")
        assert added.exit_code == 0, added.stderr

    rows = {row["device"]: row for row in json.loads(cli("flash", out, "--group", "fleet", "--json").stdout)}
    for name, (target, tensorrt, gpu) in BOARDS.items():
        row = rows[name]
        assert row["ok"] and row["health"]["healthy"], row["error"]
        engine = row["engine"]
        # The device's cache key: engine name, its TensorRT, its GPU, its board.
        assert engine["key"].endswith(f"-trt{tensorrt}-{re.sub(r'[^A-Za-z0-9]+', '_', gpu)}-{target}")
        assert engine["resolved"] == {
            "board": target,
            "sparsity": False,
            "dla_core": 0 if target == "jetson-xavier-nx" else None,
        }
        engines = env / name / "releases" / row["release"] / "engines"
        assert [p.name for p in engines.glob("*.plan")] == [Path(engine["engine"]).name]
        assert engine["engine"].endswith(f"-trt{tensorrt}.plan")


@pytest.mark.slow
def test_a_family_bundle_is_refused_by_a_device_outside_it(cli, env, tmp_path):
    jetson = api.compile_model("mnist-cnn", "jetson", load_recipe(None), tmp_path / "jetson").path
    arm64 = api.compile_model("mnist-cnn", "arm64", load_recipe(None), tmp_path / "arm64").path
    assert add_local_device(cli, "gateway", env / "gateway", "x86-64-avx2").exit_code == 0
    assert add_local_device(cli, "orin", env / "orin", "jetson-orin-nano").exit_code == 0
    for bundle, device in ((jetson, "gateway"), (arm64, "orin")):
        result = cli("flash", bundle, "--device", device)
        assert_clean_user_error(result, env, message="its boards:")
    assert not (env / "gateway").exists() and not (env / "orin").exists(), "nothing was sent"
    check = json.loads(cli("devices", "check", "gateway", "--bundle", jetson, "--json").stdout)
    assert any("outside the bundle's target jetson" in warning for warning in check["warnings"])


def test_an_x86_64_family_bundle_runs_its_health_check_on_this_machine(cli, env, tmp_path):
    bundle = api.compile_model("mnist-cnn", "x86-64", load_recipe(None), tmp_path / "x86").path
    assert add_local_device(cli, "gateway", env / "gateway", "x86-64").exit_code == 0
    (row,) = json.loads(cli("flash", bundle, "--device", "gateway", "--json").stdout)
    assert row["ok"] and row["health"]["healthy"], row["error"]


@pytest.mark.slow
@pytest.mark.skipif(board_python() is None, reason="no emulated aarch64 board (make test builds it as root)")
def test_an_arm64_family_bundle_runs_its_health_check_on_the_emulated_board(cli, env, tmp_path):
    bundle = api.compile_model("mnist-cnn", "arm64", load_recipe(None), tmp_path / "arm64").path
    added = add_local_device(cli, "pi", env / "pi", "arm64-cortex-a72", "--python", board_python())
    assert added.exit_code == 0, added.stderr
    (row,) = json.loads(cli("flash", bundle, "--device", "pi", "--json").stdout)
    assert row["ok"] and row["health"]["healthy"], row["error"]
    assert os.readlink(env / "pi" / "current") == f"releases/{row['release']}"
