"""2:4 sparsity: the pass equals the PyTorch model with the same masked weights, the bundle stores the
weights packed and its runner expands them, learned (MaskLLM) masks are valid N:M plans the pass applies."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from conftest import TOKEN_AXES, assert_clean_user_error
from graphs import make_mlp_onnx
from test_structural import _hf_encoder

from redux_edge import api, zoo
from redux_edge.analysis.reference import masked
from redux_edge.bundle import device_files
from redux_edge.errors import UserError
from redux_edge.frontend.module_run import run_module
from redux_edge.frontend.torch import export_module
from redux_edge.ir import nm
from redux_edge.ir.weights import find_weights
from redux_edge.passes import build_pass
from redux_edge.passes.cleanup import CleanupPass
from redux_edge.passes.sparsity import load_mask_plan
from redux_edge.recipe import load_recipe
from redux_edge.runtime.packed import unpacked_weights
from redux_edge.train.maskllm import MaskSchedule, MaskStudent


def test_magnitude_masks_keep_the_largest_of_every_group_along_the_inputs():
    weight = np.array([[1.0, -4.0, 3.0, 0.5, 0.0, 2.0, -2.0, 1.0]], np.float32)
    keep = nm.magnitude_mask(weight, 2, 4)
    assert keep.tolist() == [[False, True, True, False, False, True, True, False]]
    assert nm.violations(weight * keep, 2, 4) == 0 and nm.violations(weight, 2, 4) == 2
    assert len(nm.candidates(2, 4)) == 6
    conv = np.random.default_rng(0).standard_normal((4, 8, 3, 3)).astype(np.float32)
    # Conv groups run along the input channels at every kernel position.
    grouped = (conv * nm.magnitude_mask(conv, 2, 4)).transpose(0, 2, 3, 1).reshape(-1, 4)
    assert ((grouped != 0).sum(axis=1) == 2).all()


@pytest.mark.parametrize("pattern", ["3:2", "2:4:8", "0:4", "two:four"])
def test_a_pattern_that_is_not_n_of_m_is_refused(pattern):
    with pytest.raises(UserError, match="not N:M"):
        nm.parse_pattern(pattern)


@pytest.fixture(scope="module")
def encoders():
    """family -> (torch module, real inputs, exported IR proto)."""
    entry = zoo.load_model("minilm-l6")
    cache = {}

    def get(family: str):
        if family not in cache:
            module = entry.module if family == "minilm-l6" else _hf_encoder(family)
            model = export_module(module, entry.inputs, TOKEN_AXES, ["output"])
            CleanupPass()(model)
            cache[family] = (module, entry.inputs, ir.to_proto(model))
        module, inputs, proto = cache[family]
        return module, inputs, ir.from_proto(proto)

    return get


def _run(model: ir.Model, inputs: dict, tmp_path) -> np.ndarray:
    ir.save(model, str(tmp_path / "model.onnx"))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["minilm-l6", "bert", "distilbert"])
def test_sparsified_graph_equals_torch_with_the_same_masked_weights(family, encoders, tmp_path):
    module, inputs, model = encoders(family)
    sparsity = build_pass("sparsity", {"min_weights": 0})(model)
    assert sparsity.masks and all(entry["sparsified"] for entry in sparsity.report)
    parameters = dict(module.named_parameters())
    for name, keep in sparsity.masks.items():
        assert keep.shape == tuple(parameters[name].shape)  # named and laid out as PyTorch has them
    with masked(module, {}, 0, sparsity.masks):
        expected = run_module(module, inputs)[0]
    ours = _run(model, inputs, tmp_path)
    assert np.abs(ours - expected).max() <= 1e-4
    assert np.abs(ours - run_module(module, inputs)[0]).max() > 1e-3  # the masks did change the model
    for weight in find_weights(model):
        assert nm.violations(weight.torch_layout, 2, 4) == 0


def test_the_report_says_why_a_weight_stays_dense(tmp_path):
    model = ir.load(str(make_mlp_onnx(tmp_path / "mlp.onnx", hidden=16)))
    strict = build_pass("sparsity", {})(model)
    reasons = {entry["weight"]: entry.get("reason", "") for entry in strict.report}
    assert "tensor-core tiles" in reasons["w1"] and "tensor-core tiles" in reasons["w2"]
    assert not strict.masks
    relaxed = build_pass("sparsity", {"tensor_core_shapes": False, "min_weights": 0, "exclude": ["w2"]})(
        model
    )
    assert list(relaxed.masks) == ["w1"]
    assert [entry["reason"] for entry in relaxed.report if not entry["sparsified"]] == ["excluded by 'w2'"]


@pytest.fixture(scope="session")
def sparse_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "sparse"
    recipe = load_recipe(None).extended([build_pass("sparsity", {"pattern": "2:4"})])
    # Magnitude 2:4 without recovery moves MiniLM's embeddings beyond the sparsity gate (docs/QUALITY.md):
    # these tests are about what the bundle stores and runs.
    return api.compile_model("minilm-l6", "host", recipe, out, waive_gate=True)


@pytest.mark.slow
def test_sparse_bundle_is_verified_against_torch_and_reports_quality(sparse_bundle):
    manifest = sparse_bundle.manifest
    assert manifest["verify"]["reference"] == "pytorch, with the sparsity masks multiplied into the weights"
    assert manifest["verify"]["ir"]["sentence_embedding"]["max_abs"] <= 1e-4
    assert manifest["verify"]["artifact"]["sentence_embedding"]["max_abs"] <= 1e-4
    report = manifest["compression"]
    assert report["sparsity"]["sparsified"] == report["sparsity"]["weights"] == 36
    assert 0.0 < report["quality"]["embedding_cosine"]["mean"] < 1.0
    assert report["quality"]["probe_accuracy"]["compressed"] > 0.6
    assert report["speed"]["measured"] is False  # no CPU speed-up is claimed


@pytest.mark.slow
def test_the_cost_table_counts_the_non_zero_parameters_of_a_2_4_model(sparse_bundle):
    compiled = sparse_bundle.manifest["metrics"]["compiled"]
    sparsified = 6 * (4 * 384 * 384 + 2 * 384 * 1536)  # every projection weight of the 6 layers
    assert compiled["params"] - compiled["nonzero_params"] >= sparsified // 2
    assert sparse_bundle.manifest["metrics"]["original"]["nonzero_params"] > compiled["nonzero_params"]


@pytest.mark.slow
def test_every_onnx_file_of_a_2_4_bundle_opens_in_stock_tools_with_2_of_4_weights(sparse_bundle):
    for path in sorted(sparse_bundle.path.rglob("*.onnx")):
        onnx.checker.check_model(str(path))  # by path, so that the external data is checked too
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    weights = {w.name: w for w in find_weights(ir.load(str(sparse_bundle.path / "model.onnx")))}
    sparsified = [e["weight"] for e in sparse_bundle.manifest["compression"]["sparsity"]["layers"]]
    assert len(sparsified) == 36
    for name in sparsified:
        assert nm.violations(weights[name].torch_layout, 2, 4) == 0
        assert (weights[name].torch_layout != 0).mean() == pytest.approx(0.5, abs=0.01)
    storage = sparse_bundle.manifest["storage"]
    assert storage["packed_to_dense"] <= 0.6
    assert set(storage["packed_files"]) == {"model.onnx", "artifact/model.onnx"}


@pytest.mark.slow
def test_the_device_form_of_a_2_4_bundle_runs_from_the_packed_file_alone(sparse_bundle, tmp_path):
    device = tmp_path / "device-copy"
    for relative in [*device_files(sparse_bundle.manifest), "manifest.json"]:
        (device / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sparse_bundle.path / relative, device / relative)
    assert not (device / "artifact" / "model.onnx.data").exists()
    checked = subprocess.run(
        [sys.executable, str(device / "runner" / "run.py"), "--check"], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["healthy"] is True


@pytest.mark.slow
def test_unpacking_restores_every_weight_exactly(sparse_bundle):
    index = sparse_bundle.manifest["storage"]["packed_files"]["model.onnx"]
    dense = unpacked_weights(sparse_bundle.path, index)
    assert len(dense) == 36
    for name, array in dense.items():
        assert list(array.shape) == index["tensors"][name]["shape"]
        grouped = np.moveaxis(array, index["tensors"][name]["axis"], -1).reshape(-1, 4)
        assert ((grouped != 0).sum(axis=1) <= 2).all()


@pytest.mark.slow
def test_inspect_prints_the_sparsity_and_the_packed_size(cli, sparse_bundle):
    result = cli("inspect", sparse_bundle.path)
    assert result.exit_code == 0, result.stderr
    assert "sparsity 2:4 in 36 of 36 weights (magnitude masks); stored packed:" in result.stdout


@pytest.mark.slow
def test_learned_masks_are_a_plan_the_pass_applies_exactly(encoders, tmp_path):
    module, inputs, model = encoders("minilm-l6")
    magnitude = build_pass("sparsity", {})(ir.from_proto(ir.to_proto(model)))
    learned_file = tmp_path / "learned.npz"
    api.learn_mask_plan("minilm-l6", learned_file, steps=3, sentences=32)
    learned = load_mask_plan(str(learned_file))
    assert set(learned) == set(magnitude.masks)
    assert all(nm.violations(keep, 2, 4) == 0 and keep.mean() == 0.5 for keep in learned.values())
    assert all(p.requires_grad for p in module.parameters())  # the module is left as it was
    plan = tmp_path / "masks.npz"
    np.savez_compressed(plan, **learned)
    applied = build_pass("sparsity", {"mask": "learned", "plan": str(plan)})(model)
    assert {entry["mask"] for entry in applied.report} == {"learned"}
    for name in learned:
        assert np.array_equal(applied.masks[name], learned[name])
    with masked(module, {}, 0, applied.masks):
        expected = run_module(module, inputs)[0]
    assert np.abs(_run(model, inputs, tmp_path) - expected).max() <= 1e-4


def _learn(network: torch.nn.Module, initial: dict, data: list, schedule: MaskSchedule, lr: float) -> dict:
    """MaskLLM on one process, as the maskllm task's loop runs it: sampled masks, 1 - cosine to dense."""
    with torch.no_grad():
        teachers = [network(*batch) for batch in data]
    student = MaskStudent(network, initial, "2:4", schedule)
    optimizer = torch.optim.Adam(student.learner.parameters(), lr=lr)
    for step in range(schedule.steps):
        output = student(*data[step % len(data)], step=step)
        loss = 1 - torch.nn.functional.cosine_similarity(output, teachers[step % len(data)]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return student.learner.most_likely()


def test_learned_masks_distil_better_than_magnitude_on_a_small_network():
    torch.manual_seed(0)
    network = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64), torch.nn.GELU()
    ).eval()
    data = [(torch.randn(256, 64),) for _ in range(4)]
    names = ["0.weight", "2.weight"]
    parameters = dict(network.named_parameters())
    magnitude = {name: nm.magnitude_mask(parameters[name].detach().numpy(), 2, 4) for name in names}
    learned = _learn(network, magnitude, data, MaskSchedule(steps=150, prior=1.0), lr=0.1)

    def distance(masks: dict) -> float:
        with torch.no_grad():
            teacher = torch.cat([network(*batch) for batch in data])
            with masked(network, {}, 0, masks):
                student = torch.cat([network(*batch) for batch in data])
        return float(1 - torch.nn.functional.cosine_similarity(student, teacher).mean())

    assert distance(learned) < 0.8 * distance(magnitude)


def test_a_plan_for_another_model_is_refused(encoders, tmp_path):
    _, _, model = encoders("minilm-l6")
    plan = tmp_path / "masks.npz"
    np.savez(plan, **{"encoder.layer.9.output.dense.weight": np.ones((384, 1536), bool)})
    with pytest.raises(UserError, match="names weights the model does not have"):
        build_pass("sparsity", {"mask": "learned", "plan": str(plan)})(model)
    np.savez(plan, **{"encoder.layer.0.output.dense.weight": np.ones((384, 1536), bool)})
    with pytest.raises(UserError, match="is not 2:4"):
        build_pass("sparsity", {"mask": "learned", "plan": str(plan)})(model)
    np.savez(plan, **{"encoder.layer.0.output.dense.weight": np.ones((384, 384), bool)})
    with pytest.raises(UserError, match="has shape"):
        build_pass("sparsity", {"mask": "learned", "plan": str(plan)})(model)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sparsity", "3:2"], "is not N:M"),
        (["--sparsity-masks", "missing.npz"], "cannot read mask plan"),
        (["--pass", "sparsity:mask=learned"], "needs a plan"),
        (["--pass", "sparsity:exclude=['(']"], "bad pattern"),
    ],
)
def test_bad_sparsity_flags_are_user_errors(cli, tmp_path, flags, message):
    model = make_mlp_onnx(tmp_path / "mlp.onnx")
    result = cli("compile", "--model", model, "-o", tmp_path / "out", *flags)
    assert_clean_user_error(result, tmp_path, message=message)


@pytest.mark.slow
def test_sparsity_after_pruning_in_one_compile_is_refused_with_the_two_step_way(cli, tmp_path):
    flags = ["--prune-heads", "0.5", "--sparsity", "2:4"]
    result = cli("compile", "--model", "minilm-l6", "-o", tmp_path / "out", *flags)
    assert_clean_user_error(result, tmp_path, message="does not fit the original model")
    assert "--model <pruned bundle>/model.onnx --sparsity 2:4" in result.stderr


def test_learn_masks_needs_a_pytorch_model(cli, tmp_path):
    model = make_mlp_onnx(tmp_path / "mlp.onnx")
    result = cli("learn-masks", "--model", model, "-o", tmp_path / "masks.npz")
    assert result.exit_code == 2 and "learn-masks trains a PyTorch model" in result.stderr
    assert not (tmp_path / "masks.npz").exists()


def test_a_jetson_bundle_asks_tensorrt_for_sparse_tactics_and_ships_packed_weights(cli, tmp_path):
    model = make_mlp_onnx(tmp_path / "mlp.onnx", hidden=256)
    relaxed = "sparsity:min_weights=0,tensor_core_shapes=false"
    out = tmp_path / "orin"
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32))
    # Random weights lose half their magnitude to 2:4; the test is about what TensorRT is asked for.
    result = cli(
        *("compile", "-m", model, "-t", "jetson-orin-nano", "--shapes", "x:4x8", "--pass", relaxed),
        *("--inputs", tmp_path / "x.npz", "--waive-gate", "-o", out, "--json"),
    )
    assert result.exit_code == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert "--sparsity=enable" in manifest["backend"]["engine_build"]["argv"]
    assert "artifact/model.trt.onnx" in manifest["storage"]["packed_files"]
    assert manifest["compression"]["sparsity"]["target_has_sparse_tensor_cores"] is True
    # The TensorRT-ready ONNX (standard external data, as trtexec reads it) was checked here through ORT.
    assert manifest["verify"]["artifact"]["y"]["max_abs"] <= 1e-4


@pytest.mark.slow
def test_learn_masks_writes_a_plan_of_valid_masks(cli, tmp_path):
    plan = tmp_path / "plans" / "masks.npz"
    result = cli("learn-masks", "-m", "minilm-l6", "-o", plan, "--steps", "2", "--sentences", "32", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["weights"] == 36 and report["data"] == "32 Rotten Tomatoes training sentences"
    masks = load_mask_plan(str(plan))
    assert len(masks) == 36 and all(nm.violations(keep, 2, 4) == 0 for keep in masks.values())
    assert [p.name for p in plan.parent.iterdir()] == ["masks.npz"]  # no temporary file left
