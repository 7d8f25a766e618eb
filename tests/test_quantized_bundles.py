"""The quantize pass on real models: INT8 (static and dynamic), BF16 and FP16, on every backend that runs
here, in the form each target's hardware runs, with its quality measured and gated.

Quantization changes numerics on purpose, so what is checked is the contract: the model before the pass
equals the exact reference, the artifact equals ONNX Runtime running the quantized model.onnx, and the
quality retention on real task data is reported (and fails the compile below ``--min-quality``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import assert_clean_user_error
from graphs import make_mlp_onnx

from redux_edge import api
from redux_edge.backends import BACKENDS
from redux_edge.passes.quantize import scheme_for
from redux_edge.recipe import load_recipe, passes_from_flags
from redux_edge.targets import load_target

EDGE = Path(__file__).resolve().parent.parent / "models" / "minilm-l6" / "edge.toml"


def _recipe(precision: str, base: Path | None = None):
    return load_recipe(base).extended(passes_from_flags({"quantize": precision}))


def _ops(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _int8_weights(path: Path) -> list[np.ndarray]:
    """The stored values of the quantized weights: INT8 initializers read by a DequantizeLinear (biases
    are INT32)."""
    model = onnx.load(str(path))
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    stored = [arrays.get(node.input[0]) for node in model.graph.node if node.op_type == "DequantizeLinear"]
    return [array for array in stored if array is not None and array.dtype == np.int8 and array.size > 64]


@pytest.fixture(scope="module")
def minilm_int8(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "int8"
    api.compile_model("minilm-l6", "host", _recipe("int8"), out)
    return out


@pytest.mark.slow
def test_minilm_int8_runs_integer_kernels_and_reports_its_quality(minilm_int8):
    manifest = json.loads((minilm_int8 / "manifest.json").read_text())
    section = manifest["quantization"]
    operators = section["backend_operators"]
    assert operators.get("QLinearMatMul", 0) + operators.get("MatMulIntegerToFloat", 0) >= 30, operators
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(_ops(minilm_int8 / "model.onnx"))
    # Every weight MatMul but the six feed-forward down projections, whose inputs carry the outliers.
    assert section["quantized_weights"] == 30
    assert [entry["weight"] for entry in section["kept_in_float"]] == [
        f"encoder.layer.{i}.output.dense.weight" for i in range(6)
    ]
    quality = section["quality"]
    assert quality["task"].startswith("Rotten Tomatoes") and quality["test_sentences"] == 1000
    assert quality["embedding_cosine"]["mean"] >= 0.98  # measured 0.990
    assert abs(quality["probe_accuracy"]["compressed"] - quality["probe_accuracy"]["dense"]) <= 0.02
    assert section["calibration"] == {"method": "minmax", "data": "128 Rotten Tomatoes training sentences"}
    verify = manifest["verify"]
    assert verify["ir"]["sentence_embedding"]["min_cosine"] >= 0.9999  # the float model before the pass
    assert verify["rebased"]["shift"]["sentence_embedding"]["min_cosine"] < 0.9999  # it did quantize
    assert verify["artifact"]["sentence_embedding"]["min_cosine"] >= verify["tolerance"]["min_cosine"]
    assert (
        manifest["metrics"]["compiled"]["weight_bytes"]
        < 0.8 * manifest["metrics"]["original"]["weight_bytes"]  # the word embeddings stay fp32
    )
    checked = subprocess.run(
        [sys.executable, str(minilm_int8 / "runner" / "run.py"), "--check"], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["healthy"] is True


@pytest.mark.slow
def test_int8_dynamic_through_a_recipe_step_and_bf16_on_the_backend_that_has_it(cli, tmp_path, held_out_csv):
    result = cli(
        "compile", "--model", "minilm-l6", "--pass", "quantize:precision=int8-dynamic",
        "--eval-data", held_out_csv, "-o", tmp_path / "dyn", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    section = json.loads(result.stdout)["quantization"]
    assert section["backend_operators"]["DynamicQuantizeLinear"] >= 6
    assert section["quantized_weights"] == 36 and section["kept_in_float"] == []
    assert section["quality"]["embedding_cosine"]["mean"] >= 0.98  # measured 0.992 on the full task
    host = load_target("host")
    if BACKENDS["openvino"].precision_refusal("bf16", host):
        pytest.skip("this CPU has no bf16 (AVX512-BF16 or AMX)")
    result = cli("compile", "--model", "minilm-l6", "--quantize", "bf16", "--eval-data", held_out_csv,
                 "-o", tmp_path / "bf16", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    manifest = json.loads(result.stdout)
    # ONNX Runtime has no bf16 kernels on CPUs: the host's next backend serves.
    assert manifest["backend"]["name"] == "openvino"
    assert manifest["backend"]["session"]["inference_precision"] == "bf16"
    section = manifest["quantization"]
    assert section["backend_operators"]["bf16"] > 50
    assert section["quality"]["embedding_cosine"]["min"] >= 0.999


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "tvm"])
def test_the_qdq_model_and_its_artifact_agree_on_every_backend_here(tmp_path, backend):
    out = tmp_path / backend
    api.compile_model("mnist-cnn", "host", _recipe("int8"), out, backend_name=backend)
    manifest = json.loads((out / "manifest.json").read_text())
    section = manifest["quantization"]
    assert section["quality"]["accuracy"]["compressed"] >= section["quality"]["accuracy"]["dense"] - 0.005
    assert manifest["verify"]["artifact"]["logits"]["min_cosine"] >= 0.999
    if backend == "tvm":
        assert "dequantized values in fp32" in section["computes"]
    else:
        assert section["backend_operators"], "integer operators in the artifact"


def test_the_int8_form_follows_the_target():
    def form(target: str, backend: str) -> tuple[str, bool, bool]:
        scheme = scheme_for(load_target(target), BACKENDS[backend])
        return scheme.activations, scheme.reduce_range, scheme.symmetric

    assert form("x86-64-avx512", "onnxruntime") == ("u8", False, False)  # VNNI
    assert form("x86-64-avx2", "onnxruntime") == ("u8", True, False)  # VPMADDUBSW saturation
    assert form("arm64-cortex-a76", "onnxruntime") == ("s8", False, False)  # SDOT
    assert form("arm64-cortex-a72", "onnxruntime") == ("u8", False, False)
    assert form("jetson-orin-nano", "tensorrt") == ("s8", False, True)


@pytest.mark.slow
def test_avx2_without_vnni_gets_seven_bit_weights_in_the_graph(tmp_path):
    wide, narrow = tmp_path / "avx512", tmp_path / "avx2"
    api.compile_model("mnist-cnn", "x86-64-avx512", _recipe("int8"), wide)
    api.compile_model("mnist-cnn", "x86-64-avx2", _recipe("int8"), narrow)
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in _int8_weights(wide / "model.onnx")) == 127
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in _int8_weights(narrow / "model.onnx")) <= 64
    scheme = json.loads((narrow / "manifest.json").read_text())["quantization"]["scheme"]
    assert scheme["reduce_range"] is True and "VPMADDUBSW" in scheme["why"]


@pytest.mark.slow
def test_arm64_with_dot_product_gets_signed_activations_in_the_graph(tmp_path):
    for target, dtype in (("arm64-cortex-a76", np.int8), ("arm64-cortex-a72", np.uint8)):
        out = tmp_path / target
        api.compile_model("mnist-cnn", target, _recipe("int8"), out, backend_name="onnxruntime")
        model = onnx.load(str(out / "model.onnx"))
        arrays = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        zero_points = [arrays[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
        assert zero_points and all(z.dtype == dtype for z in zero_points), target


@pytest.mark.slow
def test_tensorrt_gets_symmetric_qdq_it_parses_and_builds_with_int8(tmp_path):
    out = tmp_path / "orin"
    api.compile_model("mnist-cnn", "jetson-orin-nano", _recipe("int8"), out)
    manifest = json.loads((out / "manifest.json").read_text())
    argv = manifest["backend"]["engine_build"]["argv"]
    assert "--int8" in argv and "--fp16" in argv
    assert manifest["backend"]["support"]["unsupported"] == 0
    model = onnx.load(str(out / "artifact" / "model.trt.onnx"))
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    zero_points = [arrays[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    # Weights stay float behind their own Q/DQ pair, as TensorRT's explicit quantization reads them.
    quantized_floats = [n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert any(arrays.get(name, np.zeros(0, np.int8)).dtype == np.float32 for name in quantized_floats)

    half = tmp_path / "orin-fp16"
    api.compile_model("mnist-cnn", "jetson-orin-nano", _recipe("fp16"), half)
    manifest = json.loads((half / "manifest.json").read_text())
    assert "--fp16" in manifest["backend"]["engine_build"]["argv"]
    assert "--int8" not in manifest["backend"]["engine_build"]["argv"]
    assert manifest["quantization"]["quality"]["measured"] is False


@pytest.mark.slow
def test_quantize_stacks_on_the_edge_recipe(tmp_path, held_out_csv):
    out = tmp_path / "edge-int8"
    api.compile_model("minilm-l6", "host", _recipe("int8", EDGE), out, eval_data=held_out_csv)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["compression"]["plan"]["layers"]  # the structural passes ran
    section = manifest["quantization"]
    assert section["quantized_weights"] == 20 and len(section["kept_in_float"]) == 4  # 4 layers left
    assert section["quality"]["embedding_cosine"]["mean"] >= 0.98
    # Exact check of the pruned float model against PyTorch with the same units masked out.
    assert manifest["verify"]["reference"].startswith("pytorch")
    assert manifest["verify"]["ir"]["sentence_embedding"]["min_cosine"] >= 0.9999


def test_targets_lists_precisions_per_backend(cli):
    result = cli("targets", "--json")
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    backends = {status["backend"]: status for status in rows["x86-64-avx2"]["backend_status"]}
    assert {"fp32", "int8", "int8-dynamic"} <= set(backends["onnxruntime"]["precisions"])
    assert "bf16" not in backends["openvino"]["precisions"]  # the target lists no AVX512-BF16
    orin = {status["backend"]: status for status in rows["jetson-orin-nano"]["backend_status"]}
    assert {"fp16", "int8"} <= set(orin["tensorrt"]["precisions"])


def test_bad_quantize_inputs_get_the_user_error_contract(cli, tmp_path):
    mlp = make_mlp_onnx(tmp_path / "mlp.onnx")
    misfit = tmp_path / "misfit.npz"
    np.savez(misfit, x=np.zeros((4, 5), np.float32))
    cases = {
        "unknown precision 'int3'": ["--model", "mnist-cnn", "--quantize", "int3"],
        "the onnxruntime backend cannot run --quantize bf16": [
            "--model", "mnist-cnn", "--backend", "onnxruntime", "--quantize", "bf16",
        ],
        "no backend of target x86-64-avx2 can run this recipe": [
            "--model", "mnist-cnn", "--target", "x86-64-avx2", "--quantize", "bf16",
        ],
        "mlp came without inputs": ["--model", mlp, "--quantize", "int8"],
        "input 'x' has shape [4, 5]": ["--model", mlp, "--quantize", "int8", "--calibration-data", misfit],
        "--calibration-method needs --quantize": ["--model", "mnist-cnn", "--calibration-method", "entropy"],
        "has no precision 'int8'": ["--model", "mnist-cnn", "--precision", "int8"],
    }  # fmt: skip
    for message, args in cases.items():
        result = cli("compile", *args, "-o", tmp_path / "out")
        assert_clean_user_error(result, tmp_path, message=message)


@pytest.mark.slow
def test_a_quality_gate_that_is_not_met_fails_the_compile_and_writes_nothing(cli, tmp_path, held_out_csv):
    result = cli(
        "compile", "--model", "minilm-l6", "--quantize", "int8", "--min-quality", "0.999",
        "--eval-data", held_out_csv, "-o", tmp_path / "out",
    )  # fmt: skip
    assert_clean_user_error(result, tmp_path, message="is below the --min-quality 0.999 asked for")


@pytest.mark.slow
def test_precision_auto_times_the_backends_here_and_keeps_the_fastest(tmp_path):
    out = tmp_path / "auto"
    api.compile_model("mnist-cnn", "host", load_recipe(None), out, backend_options={"precision": "auto"})
    manifest = json.loads((out / "manifest.json").read_text())
    choice = manifest["backend"]["choice"]
    timed = {entry["candidate"]: entry for entry in choice["candidates"]}
    assert {"onnxruntime fp32", "openvino fp32"} <= set(timed)
    assert [entry["backend"] for entry in choice["not_timed"]] == ["tvm"]  # static shapes
    kept = {name: entry["p50_ms"] for name, entry in timed.items() if entry["kept"]}
    assert choice["chosen"] == min(kept, key=kept.__getitem__)
    assert f"{manifest['backend']['name']} {manifest['backend']['precision']}" == choice["chosen"]
    other = tmp_path / "avx2"
    api.compile_model(
        "mnist-cnn", "x86-64-avx2", load_recipe(None), other, backend_options={"precision": "auto"}
    )
    backend = json.loads((other / "manifest.json").read_text())["backend"]
    assert backend["name"] == "onnxruntime" and backend["choice"]["measured"] is False


@pytest.mark.slow
def test_int8_stacks_on_2_4_for_orins_sparse_tensor_cores(tmp_path, held_out_csv):
    recipe = load_recipe(None).extended(passes_from_flags({"sparsity": "2:4", "quantize": "int8"}))
    out = tmp_path / "orin"
    api.compile_model("minilm-l6", "jetson-orin-nano", recipe, out, eval_data=held_out_csv, waive_gate=True)
    manifest = json.loads((out / "manifest.json").read_text())
    argv = manifest["backend"]["engine_build"]["argv"]
    assert {"--int8", "--fp16", "--sparsity=enable"} <= set(argv)
    # The float weights behind their Q/DQ pairs keep the 2:4 pattern, so they are still stored packed.
    assert manifest["storage"]["packed_to_dense"] < 0.6
    assert manifest["verify"]["ir"]["sentence_embedding"]["min_cosine"] >= 0.9999  # masks, before INT8
