"""The bundle on the device: stock-openable ONNX files, what flash sends and stores, hard-linked releases,
and releases that would not fit refused before anything changes. Devices are local directories."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import add_local_device, assert_clean_user_error

from redux_edge import api
from redux_edge.bundle import device_files, load_bundle, write_manifest
from redux_edge.passes import build_pass
from redux_edge.recipe import load_recipe


@pytest.fixture(scope="session")
def sparse_cnn(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "cnn-2-4"
    recipe = load_recipe(None).extended([build_pass("sparsity", {"pattern": "2:4"})])
    return api.compile_model("mnist-cnn", "host", recipe, out).path


def _add_local(cli, name: str, root: Path, *extra: str) -> None:
    added = add_local_device(cli, name, root, "host", *extra)
    assert added.exit_code == 0, added.stderr


def _stored_bytes(root: Path) -> int:
    """Bytes a device root holds, each hard-linked file once."""
    inodes = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            inodes[path.stat().st_ino] = path.stat().st_size
    return sum(inodes.values())


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def _assert_opens_in_stock_tools(bundle: Path) -> None:
    models = sorted(bundle.rglob("*.onnx"))
    assert models
    for path in models:
        onnx.checker.check_model(str(path))  # by path: external data is checked too
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_a_2_4_cnn_bundle_opens_in_stock_tools_and_the_device_stores_its_packed_weights(
    cli, env, sparse_cnn, mnist_bundle
):
    _assert_opens_in_stock_tools(sparse_cnn)
    dense_weight_bytes = load_bundle(mnist_bundle).manifest["metrics"]["compiled"]["weight_bytes"]
    root = env / "device"
    _add_local(cli, "board", root)
    (row,) = json.loads(cli("flash", sparse_cnn, "--device", "board", "--json").stdout)
    assert row["ok"] and row["health"]["healthy"], row["error"]
    release = root / "releases" / row["release"]
    assert (release / "artifact" / "model.onnx.packed").is_file()
    assert not (release / "artifact" / "model.onnx.data").exists()  # the dense twin stays on the host
    assert not (release / "model.onnx").exists()  # no runner reads the portable IR
    sent_weights = sum(
        load_bundle(sparse_cnn).manifest["files"][relative]["bytes"]
        for relative in row["uploaded"]
        if relative.startswith("artifact/")
    )
    stored_weights = sum(p.stat().st_size for p in (release / "artifact").rglob("*") if p.is_file())
    assert sent_weights <= 0.6 * dense_weight_bytes
    assert stored_weights <= 0.6 * dense_weight_bytes


def test_a_host_bundle_stores_each_weight_once_for_model_onnx_and_its_artifact(minilm_bundle, sparse_cnn):
    manifest = load_bundle(minilm_bundle).manifest
    weight_bytes = manifest["metrics"]["compiled"]["weight_bytes"]
    onnx_files = sum(entry["bytes"] for relative, entry in manifest["files"].items() if ".onnx" in relative)
    stored = manifest["storage"]
    assert stored["shared_file"] == "artifact/weights.bin" and stored["shared_bytes"] >= 0.99 * weight_bytes
    assert onnx_files + manifest["files"]["artifact/weights.bin"]["bytes"] <= 1.05 * weight_bytes
    _assert_opens_in_stock_tools(minilm_bundle)
    session = ort.InferenceSession(str(minilm_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs, outputs = (
        np.load(minilm_bundle / "sample" / "inputs.npz"),
        np.load(minilm_bundle / "sample" / "outputs.npz"),
    )
    np.testing.assert_allclose(session.run(None, dict(inputs))[0], outputs[outputs.files[0]], atol=1e-5)
    # The packed figure is what a device stores: the artifact's N:M weights, not the portable IR's too.
    sparse = load_bundle(sparse_cnn).manifest["storage"]
    artifact_index = sparse["packed_files"]["artifact/model.onnx"]
    assert sparse["sparse_weights_dense_bytes"] == sum(
        tensor["dense_bytes"] for tensor in artifact_index["tensors"].values()
    )


def test_the_packed_device_form_runs_and_expands_back_to_the_bundles_dense_file(sparse_cnn, tmp_path):
    manifest = load_bundle(sparse_cnn).manifest
    device = tmp_path / "device-copy"
    for relative in [*device_files(manifest), "manifest.json"]:
        (device / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sparse_cnn / relative, device / relative)
    runner = [sys.executable, str(device / "runner" / "run.py")]
    checked = subprocess.run([*runner, "--check"], capture_output=True, text=True)
    assert checked.returncode == 0 and json.loads(checked.stdout)["healthy"], checked.stderr
    expanded = subprocess.run([*runner, "--expand"], capture_output=True, text=True)
    assert expanded.returncode == 0, expanded.stderr
    dense = "artifact/model.onnx.data"
    assert (device / dense).read_bytes() == (sparse_cnn / dense).read_bytes()


def _same_weights_release(source: Path, out: Path) -> Path:
    shutil.copytree(source, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["note"] = "a second release of the same weights"
    write_manifest(out, {k: v for k, v in manifest.items() if k not in ("files", "format_version")})
    return out


def test_a_flashed_release_stores_its_artifact_once_and_releases_share_files(
    cli, env, minilm_bundle, tmp_path
):
    root = env / "device"
    _add_local(cli, "board", root)
    (first,) = json.loads(cli("flash", minilm_bundle, "--device", "board", "--json").stdout)
    assert first["ok"], first["error"]
    files = load_bundle(minilm_bundle).manifest["files"]
    artifact = sum(entry["bytes"] for relative, entry in files.items() if relative.startswith("artifact/"))
    runner = sum(entry["bytes"] for relative, entry in files.items() if relative.startswith("runner/"))
    after_first = _stored_bytes(root)
    assert after_first <= 1.1 * artifact + runner
    assert first["release_bytes"] <= 1.1 * artifact + runner and first["free_bytes"] > 0

    second_bundle = _same_weights_release(minilm_bundle, tmp_path / "second")
    (second,) = json.loads(cli("flash", second_bundle, "--device", "board", "--json").stdout)
    assert second["ok"] and second["uploaded"] == ["manifest.json"], second["error"]
    assert _stored_bytes(root) - after_first < 1 << 20
    shared = "artifact/model.onnx"
    assert (root / "releases" / first["release"] / shared).stat().st_ino == (
        root / "releases" / second["release"] / shared
    ).stat().st_ino

    back = json.loads(cli("rollback", "--device", "board", "--json").stdout)
    assert back["to"] == first["release"] and back["health"]["healthy"]
    check = json.loads(cli("devices", "check", "board", "--json").stdout)["device"]["storage"]
    assert check["used"] == _stored_bytes(root) and set(check["releases"]) >= {first["release"]}


def test_with_ir_also_stores_the_portable_model(cli, env, mnist_bundle):
    root = env / "device"
    _add_local(cli, "board", root)
    (row,) = json.loads(cli("flash", mnist_bundle, "--device", "board", "--with-ir", "--json").stdout)
    assert row["ok"] and (root / "current" / "model.onnx").is_file()


def test_a_release_that_would_not_fit_the_storage_limit_is_refused_and_nothing_changes(
    cli, env, mnist_bundle, minilm_bundle
):
    root = env / "device"
    _add_local(cli, "board", root, "--storage-limit", "40MiB")
    assert cli("flash", mnist_bundle, "--device", "board").exit_code == 0
    before = _tree(root)
    result = cli("flash", minilm_bundle, "--device", "board")
    assert_clean_user_error(result, env, message="the release needs")
    assert "nothing was changed on the device" in result.stderr and "storage_limit" in result.stderr
    assert _tree(root) == before
    storage = json.loads(cli("devices", "check", "board", "--json").stdout)["device"]["storage"]
    assert storage["limit"] == 40 << 20


def test_a_bad_storage_limit_is_a_user_error(cli, env):
    result = cli(
        "devices", "add", "x", "--target", "host", "--address", "local", "--root", env / "r",
        "--storage-limit", "lots",
    )  # fmt: skip
    assert_clean_user_error(result, env, message="storage_limit 'lots'")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_release_that_would_not_fit_a_small_file_system_is_refused(cli, env, minilm_bundle):
    root = env / "small"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(root)], check=False)
    if mounted.returncode != 0:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        _add_local(cli, "board", root)
        result = cli("flash", minilm_bundle, "--device", "board")
        assert_clean_user_error(result, env, message="the release needs")
        assert not (root / "releases").exists() and not (root / "current").exists()
    finally:
        subprocess.run(["umount", str(root)], check=True)
