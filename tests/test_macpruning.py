"""MACPruning end to end on the zoo's mnist-cnn and real MNIST digits: the pass, its exactness against
PyTorch, the emitted C kernel against integer references (built with the host gcc), simulated EM traces,
the CPA attack and the t-test, and captured-trace readers (ChipWhisperer layout, ETS, lascar, npy)."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from conftest import assert_clean_user_error, assert_runtime_check_healthy

from redux_edge import api
from redux_edge.datasets import images
from redux_edge.errors import UserError
from redux_edge.leakage import attack, campaign, kernel, simulate, traces
from redux_edge.passes import build_pass

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits():
    return images.mnist()


def _session(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])


def test_protected_model_equals_torch_fed_the_same_masked_digits(digits):
    source = api.load_source("mnist-cnn")
    configured = build_pass("mac-prune", {"drop": 0.5, "keep_top": 0.2, "seed": 3}).prepared(
        {"calibration": source.preprocessor.pixels(digits.train_images[:32])}
    )
    protect = configured(source.model)
    feeds = source.preprocessor.pixels(digits.test_images[:200])
    logits, keep = _session(source.model).run(None, feeds)
    assert keep.shape == (200, 1, 28, 28) and keep.dtype == np.uint8
    # The critical pixels are always kept, the others about half the time.
    assert keep[:, 0][:, protect.critical].all()
    assert 0.4 < keep[:, 0][:, ~protect.critical].mean() < 0.6
    with torch.no_grad():
        reference = source.module(torch.from_numpy(feeds["image"] * keep)).numpy()
    assert np.abs(reference - logits).max() <= 1e-4
    # A fixed seed gives a fresh session the same first draw; the next run draws anew.
    again = _session(source.model)
    assert np.array_equal(again.run(None, feeds)[1], keep)
    assert not np.array_equal(again.run(None, feeds)[1], keep)


def test_compile_reports_protection_accuracy_and_a_checked_kernel(protected_bundle, cli):
    manifest = json.loads((protected_bundle / "manifest.json").read_text())
    protection = manifest["protection"]
    assert protection["critical_pixels"] == round(0.2 * 784)
    assert np.load(protected_bundle / "mac_prune" / "critical.npy").sum() == protection["critical_pixels"]
    quality = protection["quality"]
    assert quality["samples"] == 4000 and quality["accuracy"]["dense"] > 0.98
    assert 0.5 < quality["accuracy"]["compressed"] <= quality["accuracy"]["dense"]
    assert manifest["verify"]["ir"]["logits"]["max_abs"] <= 1e-4
    assert manifest["verify"]["artifact"]["pixel_keep"]["max_abs"] == 0
    assert protection["kernel"]["integer_exact"] is True
    report = cli("inspect", protected_bundle).stdout
    assert "mac-prune on 'image'" in report and "integer-exact" in report
    assert_runtime_check_healthy(protected_bundle)


def test_c_kernel_equals_torch_onnx_and_numpy_on_int8(protected_bundle, digits):
    # The bundle's model.onnx names its weights in artifact/weights.bin: read them in, to run from bytes.
    model = ir.external_data.load_to_model(ir.load(str(protected_bundle / "model.onnx")))
    layer = kernel.QuantizedLayer.load(protected_bundle / "c" / "layer.npz")
    feeds = {"image": api.load_source("mnist-cnn").preprocessor.pixels(digits.test_images[:20])["image"]}
    keep = _session(model).run(None, feeds)[1][:, 0]
    quantized = layer.quantize_input(feeds["image"])
    from_c = kernel.run_c_kernel(protected_bundle / "c", layer, quantized, keep)
    assert np.array_equal(from_c, kernel.accumulate(layer, quantized, keep))
    masked = quantized.astype(np.float64) * keep[:, None]
    from_torch = (
        torch.nn.functional.conv2d(
            torch.from_numpy(masked),
            torch.from_numpy(layer.weights.astype(np.float64)),
            padding=layer.padding,
        ).numpy()
        + layer.bias[None, :, None, None]
    )
    assert np.array_equal(from_c, from_torch.astype(np.int64))
    conv = oh.make_graph(
        [oh.make_node("ConvInteger", ["x", "w"], ["y"], pads=[layer.padding] * 4)],
        "first_layer",
        [oh.make_tensor_value_info("x", onnx.TensorProto.INT8, [None, *quantized.shape[1:]])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.INT32, None)],
        initializer=[onnx.numpy_helper.from_array(layer.weights, "w")],
    )
    session = ort.InferenceSession(
        oh.make_model(conv, opset_imports=[oh.make_opsetid("", 17)], ir_version=9).SerializeToString()
    )
    masked_int8 = (quantized * keep[:, None]).astype(np.int8)
    from_onnx = session.run(None, {"x": masked_int8})[0] + layer.bias[None, :, None, None]
    assert np.array_equal(from_c, from_onnx)
    # Dequantised, the kernel approximates the float first layer of the protected model.
    source = api.load_source("mnist-cnn")
    with torch.no_grad():
        first = source.module.features[0](torch.from_numpy(feeds["image"] * keep[:, None])).numpy()
    dequantized = from_c * layer.input_scale * layer.weight_scales[None, :, None, None]
    assert np.abs(dequantized - first).max() < 0.05 * np.abs(first).max()


@pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None, reason="gcc-arm-none-eabi is not installed")
def test_c_kernel_cross_compiles_for_cortex_m4(protected_bundle, tmp_path):
    subprocess.run(
        [
            *("arm-none-eabi-gcc", "-mcpu=cortex-m4", "-mthumb", "-std=c99", "-O2", "-Wall", "-Werror", "-c"),
            *(str(protected_bundle / "c" / "macprune_layer.c"), "-o", str(tmp_path / "layer.o")),
        ],
        check=True,
    )


def test_mask_drawn_by_the_c_kernel_keeps_the_critical_pixels(protected_bundle, tmp_path):
    program = tmp_path / "draw.c"
    program.write_text(
        '#include <stdio.h>\n#include "macprune_layer.h"\n'
        "int main(void) { uint8_t keep[MACPRUNE_LAYER_HEIGHT][MACPRUNE_LAYER_WIDTH]; long kept = 0;\n"
        "  macprune_layer_seed(12345u);\n"
        "  for (int i = 0; i < 1000; ++i) { macprune_layer_draw_mask(keep);\n"
        "    for (int y = 0; y < MACPRUNE_LAYER_HEIGHT; ++y) for (int x = 0; x < MACPRUNE_LAYER_WIDTH; ++x)"
        " kept += keep[y][x]; }\n"
        '  printf("%ld\\n", kept); return 0; }\n'
    )
    binary = tmp_path / "draw"
    folder = protected_bundle / "c"
    subprocess.run(
        [
            "gcc",
            "-std=c99",
            "-O2",
            "-I",
            str(folder),
            str(program),
            str(folder / "macprune_layer.c"),
            "-o",
            str(binary),
        ],
        check=True,
    )
    kept = int(subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout)
    critical = np.load(protected_bundle / "mac_prune" / "critical.npy").mean()
    expected = critical + (1 - critical) * 0.5
    assert abs(kept / (1000 * 784) - expected) < 0.01


def test_hypotheses_that_tie_exactly_are_scored_as_one_group():
    def group(domain: np.ndarray, guess: int) -> int:
        return int(attack.tie_groups(domain)[guess + 128])

    non_negative = np.arange(-128, 128) >= 0
    # With non-negative inputs a shift keeps the bits: 3, 6, 12 and 96 predict the same Hamming weights.
    assert (
        group(non_negative, 3) == group(non_negative, 6) == group(non_negative, 12) == group(non_negative, 96)
    )
    assert group(non_negative, 3) != group(non_negative, 5)
    # With inputs of both signs, shifting a negative product drops a leading 1: no tie.
    both = np.ones(256, dtype=bool)
    assert group(both, 3) != group(both, 6)
    x = np.arange(-128, 128, dtype=np.int32)
    assert np.array_equal(simulate.hamming_weight(5 * x[128:]), simulate.hamming_weight(20 * x[128:]))
    assert not np.array_equal(simulate.hamming_weight(5 * x), simulate.hamming_weight(20 * x))


def test_unprotected_weights_are_recovered_from_1000_traces_at_sigma_1(protected_bundle, tmp_path, cli):
    traces_file = tmp_path / "plain.ets"
    result = cli(
        "leakage",
        "simulate",
        "--bundle",
        protected_bundle,
        "--traces",
        1000,
        "--unprotected",
        "-o",
        traces_file,
    )
    assert result.exit_code == 0, result.stderr
    result = cli("leakage", "attack", traces_file, "--bundle", protected_bundle, "-o", tmp_path / "report")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "report" / "attack.json").read_text())
    final = report["checkpoints"][-1]
    assert final["traces"] == 1000
    assert final["recovered"] == report["weights"] == 288
    assert (tmp_path / "report" / "rank_vs_traces.png").stat().st_size > 0
    assert max(report["traces_to_disclosure"]) <= 1000


def test_masking_hides_most_weights_and_control_flow_gives_them_back(protected_bundle, tmp_path):
    plain = simulate.LeakageModel(noise=1.0)
    leaky = simulate.LeakageModel(noise=1.0, control_flow=8.0)
    for name, model in (("masked", plain), ("branch", leaky)):
        campaign.simulate_file(protected_bundle, tmp_path / f"{name}.ets", 1000, model, seed=1)
    masked = campaign.attack_file(tmp_path / "masked.ets", tmp_path / "r1", bundle=protected_bundle)
    realigned = campaign.attack_file(
        tmp_path / "branch.ets", tmp_path / "r2", bundle=protected_bundle, realign=4.0
    )
    assert masked["checkpoints"][-1]["recovered"] < 0.1 * 288
    assert realigned["checkpoints"][-1]["recovered"] > 0.7 * 288


def test_tvla_flags_the_unprotected_kernel(protected_bundle, tmp_path, cli):
    for name, extra in (("fixed", ["--fixed"]), ("random", [])):
        result = cli(
            "leakage",
            "simulate",
            "--bundle",
            protected_bundle,
            "--traces",
            500,
            "--unprotected",
            *extra,
            "-o",
            tmp_path / f"{name}.ets",
        )
        assert result.exit_code == 0
    result = cli(
        "leakage", "tvla", tmp_path / "fixed.ets", tmp_path / "random.ets", "-o", tmp_path / "tvla", "--json"
    )
    report = json.loads(result.stdout)
    assert report["leaks"] and report["max_abs_t"] > 4.5
    assert (tmp_path / "tvla" / "t_vs_sample.png").is_file()


def _write_chipwhisperer_project(folder, samples, textin, segments=2):
    """What ChipWhisperer 5 saves (as in NewAE's cwtraces wheel): project.cwp lists each segment's config,
    written with Windows separators; a segment's files are <prefix>traces.npy etc., and its trace buffer
    holds a never-captured row past numTraces."""
    parts = np.array_split(np.arange(len(samples)), segments)
    prefixes = [f"2026.11.29-10.0{index}.00_0" for index in range(segments)]
    listed = "".join(
        f"tracefile{index} = project_data\\traces\\config_{prefix}.cfg\nenabled{index} = True\n"
        for index, prefix in enumerate(prefixes)
    )
    (folder / "project.cwp").write_text(
        f"[Trace Management]\n{listed}[ChipWhisperer]\n[[General Settings]]\nProject Name = macprune\n"
    )
    data = folder / "project_data" / "traces"
    data.mkdir(parents=True)
    for prefix, part in zip(prefixes, parts, strict=True):
        (data / f"config_{prefix}.cfg").write_text(
            f"[Trace Config]\nformat = native\nnumTraces = {len(part)}\nprefix = {prefix}\n"
        )
        unused = np.zeros((1, samples.shape[1]), samples.dtype)
        np.save(data / f"{prefix}traces.npy", np.concatenate([samples[part], unused]))
        np.save(data / f"{prefix}textin.npy", textin[part].view(np.uint8))
        np.save(data / f"{prefix}textout.npy", np.zeros((len(part), 16), np.uint8))
    return folder / "project.cwp"


def test_captured_formats_run_through_attack_and_tvla(protected_bundle, tmp_path, cli):
    layer = campaign.load_layer(protected_bundle)
    captured = simulate.simulate(layer, 600, simulate.LeakageModel(noise=1.0), protected=False, seed=5)
    fixed = simulate.simulate(
        layer,
        600,
        simulate.LeakageModel(noise=1.0),
        protected=False,
        seed=6,
        fixed_input=np.zeros((1, 28, 28), np.int8) + 7,
    )
    project = _write_chipwhisperer_project(tmp_path, captured.samples, captured.operands)
    ets = tmp_path / "capture.ets"
    traces.write_ets(ets, captured.samples, captured.operands)
    lascar = tmp_path / "capture.npz"
    np.savez(lascar, leakages=captured.samples, values=captured.operands)
    np.save(tmp_path / "capture.npy", captured.samples)
    np.save(tmp_path / "inputs.npy", captured.operands)
    np.save(tmp_path / "fixed.npy", fixed.samples)
    for index, (path, extra) in enumerate(
        [
            (project, []),
            (ets, []),
            (lascar, []),
            (tmp_path / "capture.npy", ["--inputs", tmp_path / "inputs.npy"]),
        ]
    ):
        result = cli(
            "leakage", "attack", path, *extra, "--bundle", protected_bundle, "-o", tmp_path / f"r{index}"
        )
        assert result.exit_code == 0, result.stderr
        report = json.loads((tmp_path / f"r{index}" / "attack.json").read_text())
        # Captured traces carry no kernel description: every weight is searched over the whole trace,
        # where weights sharing a pixel confuse each other, so fewer are recovered than with windows.
        assert report["windows"] == "whole trace" and report["checkpoints"][-1]["recovered"] > 0
    for path in (project, ets):
        result = cli("leakage", "tvla", tmp_path / "fixed.npy", path, "-o", tmp_path / "tvla", "--json")
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["leaks"]


def test_bad_trace_files_are_user_errors(tmp_path, cli):
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    np.save(tmp_path / "traces.npy", np.zeros((10, 5), np.float32))
    np.save(tmp_path / "short.npy", np.zeros((9, 3), np.int8))
    nan = np.zeros((10, 5), np.float32)
    nan[4, 2] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "inputs.npy", np.zeros((10, 3), np.int8))
    np.save(tmp_path / "floats.npy", np.zeros((10, 3), np.float32))
    cases = [
        (["junk.npy", "--inputs", "inputs.npy"], "junk.npy: ValueError: the magic string is not correct"),
        (["traces.npy"], "need their inputs"),
        (["traces.npy", "--inputs", "short.npy"], "10 traces but 9 input rows"),
        (["nan.npy", "--inputs", "inputs.npy"], "trace 4 holds NaN"),
        (["traces.npy", "--inputs", "floats.npy"], "inputs must be integers"),
        (["missing.ets"], "does not exist"),
        (["project.cwp"], "does not exist"),
    ]
    for arguments, message in cases:
        result = cli(
            "leakage",
            "attack",
            *[tmp_path / a if not a.startswith("--") else a for a in arguments],
            "-o",
            tmp_path / "out",
        )
        assert_clean_user_error(result, tmp_path, message=message)
    (tmp_path / "empty.cwp").write_text("[ChipWhisperer]\n")
    result = cli("leakage", "attack", tmp_path / "empty.cwp", "-o", tmp_path / "out")
    assert_clean_user_error(result, tmp_path, message="no ")


def test_protection_misuse_is_a_user_error(tmp_path, cli, digits):
    parent = tmp_path
    cases = [
        (["--model", "minilm-l6", "--mac-prune", "0.5"], "needs a float image"),
        (["--model", "mnist-cnn", "--mac-prune", "1.5"], "not in [0, 1)"),
        (["--model", "mnist-cnn", "--mac-keep-top", "0.1"], "go with --mac-prune"),
        (["--model", "mnist-cnn", "--emit-c"], "--emit-c writes the kernel"),
        (["--model", "mnist-cnn", "--mac-prune", "0.5", "--backend", "openvino"], "onnxruntime backend"),
    ]
    for arguments, message in cases:
        result = cli("compile", *arguments, "-o", parent / "out")
        assert_clean_user_error(result, parent, message=message)
    with pytest.raises(UserError, match="calibration images"):
        protect = build_pass("mac-prune", {"drop": 0.5, "keep_top": 0.1})
        protect(api.load_source("mnist-cnn").model)


def test_image_datasets_are_real_and_split(digits, tmp_path):
    assert digits.train_images.shape == (1000, 28, 28) and digits.test_images.shape == (4000, 28, 28)
    assert np.bincount(digits.train_labels).tolist() == [100] * 10
    fashion = images.fashion_mnist()
    assert fashion.train_images.shape == (60000, 28, 28) and fashion.test_images.shape == (10000, 28, 28)
    assert np.bincount(fashion.test_labels).tolist() == [1000] * 10
    for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(UserError, match="not an unsigned-byte IDX file"):
        images.fashion_mnist(tmp_path)
