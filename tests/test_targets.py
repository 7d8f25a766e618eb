"""All nine targets load with their hardware facts; targets whose backend is missing fail clearly."""

from __future__ import annotations

import platform
import sys

import pytest

from redux_edge import api
from redux_edge.backends import select_backend
from redux_edge.errors import UserError
from redux_edge.recipe import load_recipe
from redux_edge.targets import available_targets, load_target

ALL_TARGETS = {
    "host",
    "x86-64-avx2",
    "x86-64-avx512",
    "arm64-cortex-a72",
    "arm64-cortex-a76",
    "jetson-orin-nano",
    "jetson-agx-orin",
    "jetson-xavier-nx",
    "jetson-nano",
}
FAMILIES = {"jetson", "arm64", "x86-64"}


def test_the_nine_targets_and_three_families_exist():
    assert set(available_targets()) == ALL_TARGETS | FAMILIES


@pytest.mark.parametrize(
    ("name", "sm", "l4t", "jetpack", "sparse"),
    [
        ("jetson-orin-nano", "8.7", "R36.4", "6.2", True),
        ("jetson-agx-orin", "8.7", "R36.4", "6.2", True),
        ("jetson-xavier-nx", "7.2", "R35.5", "5.1.3", False),
        ("jetson-nano", "5.3", "R32.7", "4.6", False),
    ],
)
def test_jetson_facts(name, sm, l4t, jetpack, sparse):
    target = load_target(name)
    assert target.gpu_compute_capability == sm
    assert target.runtime["l4t"] == l4t
    assert target.runtime["jetpack"] == jetpack
    assert target.sparse_tensor_cores is sparse
    assert target.arch == "aarch64"
    assert target.backends[0] == "tensorrt"


def test_host_is_this_machine():
    host = load_target("host")
    assert host.arch == platform.machine()
    assert host.backends == ("onnxruntime", "openvino", "tvm")
    assert select_backend(host, None).name == "onnxruntime"


def test_unknown_target_lists_the_choices():
    with pytest.raises(UserError, match="unknown target 'pdp-11'") as info:
        load_target("pdp-11")
    assert "jetson-orin-nano" in info.value.hint


def test_target_name_cannot_reach_outside_the_targets_folder():
    with pytest.raises(UserError, match="unknown target"):
        load_target("../pyproject")


def test_tensorrt_for_a_target_without_gpu_names_what_is_missing():
    with pytest.raises(UserError, match="TensorRT needs an NVIDIA GPU, and target host has none") as info:
        select_backend(load_target("host"), "tensorrt")
    assert "jetson" in info.value.hint


def test_missing_tvm_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tvm", None)  # what a machine without apache-tvm shows import
    with pytest.raises(UserError, match="apache-tvm is not installed") as info:
        select_backend(load_target("arm64-cortex-a72"), "tvm")
    assert "pip install apache-tvm==" in str(info.value)


def test_missing_cross_compiler_says_what_to_install(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UserError, match="needs aarch64-linux-gnu-g\\+\\+") as info:
        select_backend(load_target("arm64-cortex-a72"), "tvm")
    assert info.value.hint == "apt-get install g++-aarch64-linux-gnu"


@pytest.mark.parametrize("name", ["arm64-cortex-a72", "arm64-cortex-a76"])
def test_arm64_targets_default_to_onnxruntime_as_measured(name):
    # tools/bench_arm.py: untuned TVM is slower there; docs/TARGETS.md says by how much.
    assert select_backend(load_target(name), None).name == "onnxruntime"


def test_jetson_targets_lower_with_tensorrt():
    assert select_backend(load_target("jetson-orin-nano"), None).name == "tensorrt"


def test_backend_override_must_be_one_the_target_runs():
    with pytest.raises(UserError, match="unknown backend"):
        select_backend(load_target("host"), "coreml")


def test_a_flag_of_another_backend_is_refused_not_ignored(tmp_path):
    with pytest.raises(UserError, match="--tune is an option of the tvm backend") as info:
        api.compile_model(
            "mnist-cnn", "arm64-cortex-a72", load_recipe(None), tmp_path / "out", backend_options={"tune": 2}
        )
    assert info.value.hint == "add --backend tvm, or drop --tune"
    assert not (tmp_path / "out").exists()
