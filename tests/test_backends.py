"""Each backend computes what ONNX Runtime computes on the same IR, on real inputs; and says what it built."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import assert_clean_user_error

from redux_edge import api, zoo
from redux_edge.backends import BACKENDS
from redux_edge.errors import UserError
from redux_edge.recipe import load_recipe
from redux_edge.runtime.backend_tensorrt import EngineBuildError, check_sparse_tactics, parse_trtexec_log
from redux_edge.runtime.session import BundleSession
from redux_edge.targets import load_target

DATA = Path(__file__).parent / "data"
SENTENCES = [
    "The ferry to the island was cancelled because of the storm.",
    "A quietly devastating film about memory and loss.",
    "Please send the invoice to the accounts department by Friday.",
]


def _compile(tmp_path_factory, name: str, target: str, **kwargs) -> Path:
    out = tmp_path_factory.mktemp("backends") / name
    api.compile_model(kwargs.pop("model", "minilm-l6"), target, load_recipe(None), out, **kwargs)
    return out


def _onnxruntime_on_ir(bundle: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _real_sentences(length: int | None = None) -> dict[str, np.ndarray]:
    entry = zoo.load_model("minilm-l6")
    feeds = entry.preprocessor(SENTENCES)
    if length is not None:
        pad = length - feeds["input_ids"].shape[1]
        feeds = {k: np.pad(v, ((0, 0), (0, pad))) for k, v in feeds.items()}
    return feeds


@pytest.fixture(scope="module")
def openvino_bundle(tmp_path_factory):
    return _compile(tmp_path_factory, "ov", "x86-64-avx2", backend_name="openvino")


@pytest.fixture(scope="module")
def tvm_bundle(tmp_path_factory):
    shapes = {"input_ids": [1, 32], "attention_mask": [1, 32]}
    return _compile(tmp_path_factory, "tvm", "x86-64-avx2", backend_name="tvm", shapes=shapes)


@pytest.mark.slow
def test_openvino_matches_onnxruntime_on_real_sentences(openvino_bundle):
    manifest = json.loads((openvino_bundle / "manifest.json").read_text())
    assert manifest["backend"]["session"]["inference_precision"] == "f32"
    assert (openvino_bundle / "artifact" / "model.xml").is_file()
    assert (openvino_bundle / "artifact" / "model.bin").is_file()
    feeds = _real_sentences()
    ours = BundleSession(openvino_bundle).run(feeds)[0]
    assert _cosine(ours, _onnxruntime_on_ir(openvino_bundle, feeds)).min() >= 0.9999
    assert manifest["verify"]["artifact_vs_onnxruntime"]["sentence_embedding"]["min_cosine"] >= 0.9999


def test_openvino_precision_is_an_explicit_recorded_choice(tmp_path_factory, cli, tmp_path):
    # A CPU without bf16 would compute f32 under a bf16 hint: refused where the target lacks it.
    result = cli(
        "compile", "--model", "mnist-cnn", "--target", "x86-64-avx2", "--backend", "openvino",
        "--precision", "bf16", "-o", tmp_path / "out",
    )  # fmt: skip
    assert_clean_user_error(result, tmp_path, message="openvino computes bf16 only with avx512_bf16")
    if BACKENDS["openvino"].precision_refusal("bf16", load_target("host")):
        pytest.skip("this CPU has no bf16 (AVX512-BF16 or AMX)")
    bundle = _compile(
        tmp_path_factory,
        "ov-bf16",
        "host",
        model="mnist-cnn",
        backend_name="openvino",
        backend_options={"precision": "bf16"},
    )
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["backend"]["precision"] == "bf16"
    assert manifest["backend"]["session"]["inference_precision"] == "bf16"
    assert manifest["verify"]["tolerance"] == {"min_cosine": 0.999, "atol": 0.05}


@pytest.mark.slow
def test_tvm_matches_onnxruntime_on_real_sentences(tvm_bundle):
    manifest = json.loads((tvm_bundle / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [1, 32]
    assert manifest["backend"]["target"]["mcpu"] == "haswell"
    assert manifest["backend"]["elf_machine"] == "x86-64"
    # verified on all 8 card sentences, one static batch at a time
    assert manifest["verify"]["samples"] == 8
    session = BundleSession(tvm_bundle)
    feeds = _real_sentences(length=32)
    ours = np.concatenate([session.run({k: v[i : i + 1] for k, v in feeds.items()})[0] for i in range(3)])
    assert _cosine(ours, _onnxruntime_on_ir(tvm_bundle, feeds)).min() >= 0.9999


@pytest.mark.slow
def test_tvm_bundle_rejects_other_shapes(tvm_bundle, cli, tmp_path):
    np.savez(
        tmp_path / "x.npz", input_ids=np.ones((1, 16), np.int64), attention_mask=np.ones((1, 16), np.int64)
    )
    result = cli("run", tvm_bundle, tmp_path / "x.npz")
    assert result.exit_code == 2 and "expected [1, 32]" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["openvino_bundle", "tvm_bundle"])
def test_bench_runs_each_backend(cli, request, fixture):
    result = cli("bench", request.getfixturevalue(fixture), "--iterations", 2, "--warmup", 1, "--json")
    assert result.exit_code == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["iterations"] == 2 and stats["p50_ms"] > 0


@pytest.mark.slow
def test_aarch64_library_runs_under_qemu_and_matches_onnxruntime(tmp_path_factory, cli):
    bundle = _compile(tmp_path_factory, "a72", "arm64-cortex-a72", backend_name="tvm")
    library = bundle / "artifact" / "model.so"
    header = library.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["backend"]["name"] == "tvm"
    assert manifest["backend"]["target"] == {
        "kind": "llvm",
        "mtriple": "aarch64-linux-gnu",
        "mcpu": "cortex-a72",
        "mattr": ["+neon", "+crc"],
    }
    assert manifest["verify"]["artifact_run"].startswith("ran under qemu-aarch64")
    assert manifest["verify"]["artifact_vs_onnxruntime"]["sentence_embedding"]["min_cosine"] >= 0.9999
    assert manifest["verify"]["samples"] == 8
    result = cli("bench", bundle)
    assert result.exit_code == 2 and "cannot run on this machine" in result.stderr


@pytest.mark.slow
def test_jetson_bundle_carries_tensorrt_ready_onnx_and_engine_build(tmp_path_factory):
    shapes = {"input_ids": [1, 128], "attention_mask": [1, 128]}
    bundle = _compile(tmp_path_factory, "orin", "jetson-orin-nano", shapes=shapes)
    manifest = json.loads((bundle / "manifest.json").read_text())
    backend = manifest["backend"]
    assert backend["name"] == "tensorrt" and backend["precision"] == "fp16"
    assert backend["support"] == {
        "tensorrt": "10.3",
        "opset": 20,
        "max_opset": 20,
        "nodes": 200,
        "decomposed": {},  # TensorRT 10.3 parses LayerNormalization and Gelu
        "opset_rewritten": {},
        "unsupported": 0,
    }
    report = json.loads((bundle / "artifact" / "support.json").read_text())
    assert report["unsupported"] == []
    build = backend["engine_build"]
    assert build["argv"][:2] == ["trtexec", "--onnx=artifact/model.trt.onnx"]
    assert "--fp16" in build["argv"] and "--sparsity=enable" not in build["argv"]
    assert build["engine_name"].endswith("-sm87-fp16")
    assert manifest["inputs"][0]["shape"] == [1, 128]
    assert "ONNX Runtime here" in manifest["verify"]["artifact_run"]
    assert manifest["verify"]["artifact_vs_onnxruntime"]["sentence_embedding"]["min_cosine"] >= 0.9999


def test_dla_core_adds_gpu_fallback_where_the_target_has_dla(tmp_path_factory):
    bundle = _compile(
        tmp_path_factory, "agx", "jetson-agx-orin", model="mnist-cnn", backend_options={"dla_core": 1}
    )
    argv = json.loads((bundle / "manifest.json").read_text())["backend"]["engine_build"]["argv"]
    assert argv[-2:] == ["--useDLACore=1", "--allowGPUFallback"]


def test_dla_core_on_a_target_without_dla(tmp_path):
    with pytest.raises(UserError, match="has 0 DLA cores"):
        api.compile_model(
            "mnist-cnn",
            "jetson-orin-nano",
            load_recipe(None),
            tmp_path / "out",
            backend_options={"dla_core": 0},
        )
    assert not (tmp_path / "out").exists()


def test_trtexec_log_with_sparse_tactics():
    report = parse_trtexec_log((DATA / "trtexec_sparse.log").read_text())
    assert report["sparse_eligible"] == [
        "/encoder/layer.0/intermediate/dense/MatMul",
        "/encoder/layer.0/output/dense/MatMul",
        "/encoder/layer.1/intermediate/dense/MatMul",
    ]
    assert report["sparse_picked"] == [
        "/encoder/layer.0/intermediate/dense/MatMul",
        "/encoder/layer.1/intermediate/dense/MatMul",
    ]
    check_sparse_tactics(report, sparsity_requested=True)


def test_trtexec_log_without_sparse_tactics_fails_loudly_when_2_4_was_asked():
    report = parse_trtexec_log((DATA / "trtexec_dense.log").read_text())
    assert report["sparse_picked"] == []
    check_sparse_tactics(report, sparsity_requested=False)
    with pytest.raises(EngineBuildError, match="picked no sparse tactic"):
        check_sparse_tactics(report, sparsity_requested=True)


@pytest.mark.slow
def test_tvm_tuning_writes_a_database_that_later_compiles_reuse(tmp_path_factory):
    database = tmp_path_factory.mktemp("tuning")
    tuned = _compile(
        tmp_path_factory,
        "tuned",
        "host",
        model="mnist-cnn",
        backend_name="tvm",
        backend_options={"tune": 2, "tuning_db": database},
    )
    tuning = json.loads((tuned / "manifest.json").read_text())["backend"]["tuning"]
    records = (database / "database_tuning_record.json").read_text().splitlines()
    assert tuning == {
        "trials": 2,
        "database": str(database),
        "records_before": 0,
        "records_after": len(records),
    }
    assert 1 <= len(records) <= 2
    # MetaSchedule records a candidate that failed to build or run with a run time of 1e10 s
    measured = [min(json.loads(line)[1][1]) for line in records]
    assert min(measured) < 1.0, measured
    reused = _compile(
        tmp_path_factory,
        "reused",
        "host",
        model="mnist-cnn",
        backend_name="tvm",
        backend_options={"tuning_db": database},
    )
    manifest = json.loads((reused / "manifest.json").read_text())
    assert manifest["backend"]["tuning"]["records_before"] == len(records)
    assert manifest["verify"]["artifact"]["logits"]["min_cosine"] >= 0.9999


def test_tuning_for_a_board_needs_its_rpc_tracker(tmp_path):
    with pytest.raises(UserError, match="must measure on an aarch64 board") as info:
        api.compile_model(
            "mnist-cnn",
            "arm64-cortex-a72",
            load_recipe(None),
            tmp_path / "out",
            backend_name="tvm",
            backend_options={"tune": 8},
        )
    assert "--rpc-tracker" in info.value.hint
