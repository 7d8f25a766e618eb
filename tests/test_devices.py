"""The device registry, the local transport, the Jetson engine build on a device, and the profilers.

The Jetson test runs the real flash sequence against a local device whose ``trtexec`` is a labelled
stand-in (tests/data/trtexec_standin.py: trtexec's command line and file formats, ONNX Runtime inside),
since TensorRT and a Jetson GPU are absent here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import add_local_device, assert_clean_user_error

from redux_edge import api
from redux_edge.bundle import load_bundle
from redux_edge.recipe import load_recipe
from redux_edge.runtime.session import BundleSession
from redux_edge.runtime.tegrastats import parse_tegrastats

STANDIN = Path(__file__).parent / "data" / "trtexec_standin.py"


def test_registry_round_trip(cli, env):
    assert add_local_device(cli, "bench-a", env / "a", "host", "--group", "lab").exit_code == 0
    added = cli(
        "devices", "add", "orin-1", "--target", "jetson-orin-nano", "--address", "ssh://ubuntu@10.0.0.21:2222",
        "--root", "/opt/redux-edge", "--key", "~/.ssh/id_ed25519", "--group", "lab",
    )  # fmt: skip
    assert added.exit_code == 0, added.stderr
    listed = json.loads(cli("devices", "list", "--json").stdout)
    assert listed["groups"] == {"lab": ["bench-a", "orin-1"]}
    orin = next(device for device in listed["devices"] if device["name"] == "orin-1")
    assert orin["target"] == "jetson-orin-nano" and orin["python"] == "python3"
    assert_clean_user_error(add_local_device(cli, "bench-a", env / "a"), env, message="already registered")
    assert cli("devices", "remove", "bench-a").exit_code == 0
    assert json.loads(cli("devices", "list", "--json").stdout)["groups"] == {"lab": ["orin-1"]}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "nope", "--address", "local"], "unknown target 'nope'"),
        (["--target", "host", "--address", "http://x"], "has address 'http://x'"),
        (["--target", "host", "--address", "ssh://h:notaport"], "device 'x'"),
        (["--target", "host", "--address", "ssh://h/path"], "has address"),
    ],
)
def test_bad_registrations(cli, env, args, message):
    result = cli("devices", "add", "x", "--root", env / "r", *args)
    assert_clean_user_error(result, env, message=message)
    assert not (env / "devices.toml").exists()


def test_broken_registry_and_unknown_group(cli, env, mnist_bundle):
    assert_clean_user_error(
        cli("flash", mnist_bundle, "--group", "none"), env, message="unknown group 'none'"
    )
    assert_clean_user_error(cli("flash", mnist_bundle), env, message="name one device or one group")
    (env / "devices.toml").write_text("[devices.x\n")
    assert_clean_user_error(cli("devices", "list"), env, message="is not valid TOML")


def test_local_device_flash_rollback_and_profile(cli, env, mnist_bundle):
    root = env / "device"
    assert add_local_device(cli, "here", root).exit_code == 0
    (first,) = json.loads(cli("flash", mnist_bundle, "--device", "here", "--json").stdout)
    assert first["ok"] and os.readlink(root / "current") == f"releases/{first['release']}"
    record = json.loads(
        cli("profile", mnist_bundle, "--device", "here", "--duration", "0.5", "--json").stdout
    )
    assert record["stats"]["iterations"] == len(record["latencies_ms"]) > 10
    assert_clean_user_error(cli("rollback", "--device", "here"), env, message="no earlier release")


@pytest.mark.slow
def test_jetson_engine_is_built_on_the_device_and_cached(cli, env, monkeypatch, tmp_path_factory):
    bundle = tmp_path_factory.mktemp("jetson") / "mnist-orin"
    api.compile_model("mnist-cnn", "jetson-orin-nano", load_recipe(None), bundle)
    tools = env / "bin"
    tools.mkdir()
    (tools / "trtexec").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STANDIN}" "$@"\n')
    (tools / "trtexec").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    root = env / "orin"
    assert add_local_device(cli, "orin", root, "jetson-orin-nano").exit_code == 0

    (row,) = json.loads(cli("flash", bundle, "--device", "orin", "--json").stdout)
    assert row["ok"], row["error"]
    engine_name = load_bundle(bundle).manifest["backend"]["engine_build"]["engine_name"]
    key = (
        f"{engine_name}-trt100300-nogpu-jetson-orin-nano"
        if not Path("/proc/device-tree/model").exists()
        else None
    )
    assert row["engine"]["cached"] is False and (key is None or row["engine"]["key"] == key)
    assert all(Path(log).is_file() for log in row["engine"]["log"]) and row["engine"]["log"]
    release = root / "releases" / row["release"]
    assert (release / "engines" / f"{engine_name}-trt100300.plan").is_file()
    assert row["health"]["healthy"] and row["health"]["max_abs"] <= 1e-6  # the runner went through trtexec

    record = json.loads(cli("profile", bundle, "--device", "orin", "--iterations", "20", "--json").stdout)
    assert record["stats"]["iterations"] == 20 and record["layers"]["source"].startswith("trtexec profiler")

    # Same engine name, TensorRT and GPU: a new release takes the engine from the device's cache.
    (root / "current").unlink()
    for path in (root / "releases").iterdir():
        os.rename(path, root / "releases" / "0000000000000000")
    (again,) = json.loads(cli("flash", bundle, "--device", "orin", "--json").stdout)
    assert (
        again["ok"] and again["engine"]["cached"] is True and again["engine"]["key"] == row["engine"]["key"]
    )

    check = json.loads(cli("devices", "check", "orin", "--json").stdout)
    assert any("no /etc/nv_tegra_release" in warning for warning in check["warnings"])
    assert check["device"]["trtexec"].endswith("trtexec")


@pytest.mark.slow
def test_openvino_and_onnxruntime_layer_profiles(tmp_path, mnist_bundle):
    ort_layers = BundleSession(mnist_bundle).layer_times(BundleSession(mnist_bundle).sample()[0], runs=3)
    assert ort_layers["source"].startswith("onnxruntime") and {"Conv"} <= {
        layer["op"] for layer in ort_layers["layers"]
    }
    bundle = tmp_path / "mnist-ov"
    api.compile_model("mnist-cnn", "host", load_recipe(None), bundle, backend_name="openvino")
    session = BundleSession(bundle)
    layers = session.layer_times(session.sample()[0], runs=3)
    assert layers["source"].startswith("OpenVINO") and layers["total_ms"] > 0
    assert any(layer["op"] == "Convolution" for layer in layers["layers"])


def test_tegrastats_lines_of_three_jetson_generations():
    orin_nano = (
        "11-29-2026 10:00:01 RAM 3120/7620MB (lfb 9x4MB) SWAP 0/3810MB (cached 0MB) CPU [5%@1510,3%@1510] "
        "EMC_FREQ 1%@2133 GR3D_FREQ 61%@[624] cpu@51.2C tj@52.0C VDD_IN 6410mW/5900mW "
        "VDD_CPU_GPU_CV 1650mW/1500mW"
    )
    agx_orin = (
        "11-29-2026 10:00:02 RAM 9000/62841MB (lfb 400x4MB) CPU [10%@2201,4%@2201] GR3D_FREQ 40%@[918,918] "
        "VDD_GPU_SOC 5200mW/5000mW VDD_CPU_CV 900mW/900mW VIN_SYS_5V0 4100mW/4100mW"
    )
    nano = (
        "RAM 2100/3956MB (lfb 50x4MB) CPU [20%@1479,off] GR3D_FREQ 12%@921 POM_5V_IN 3998/3800 "
        "POM_5V_GPU 800/700"
    )
    summary = parse_tegrastats([orin_nano, orin_nano.replace("6410mW", "6610mW").replace("61%", "63%")])
    assert summary["power_rail"] == "VDD_IN" and summary["power_mw"] == {"mean": 6510.0, "max": 6610.0}
    assert summary["gpu_load_pct"]["max"] == 63.0 and summary["gpu_freq_mhz"]["mean"] == 624.0
    assert summary["ram_used_mb"]["max"] == 3120.0
    assert parse_tegrastats([agx_orin])["power_rail"] == "VIN_SYS_5V0"
    assert parse_tegrastats([agx_orin])["gpu_freq_mhz"]["mean"] == 918.0
    older = parse_tegrastats([nano])
    assert older["power_rail"] == "POM_5V_IN" and older["power_mw"]["mean"] == 3998.0
    assert older["gpu_freq_mhz"]["mean"] == 921.0
