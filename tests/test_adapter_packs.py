"""Low-bit adapter packs: the quantizer, the pack format, and bundles that merge one pack or swap several
on one compiled base, each checked against PyTorch with the pack's dequantized adapters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_clean_user_error
from graphs import make_mlp_onnx

from redux_edge import api, zoo
from redux_edge.analysis.adapted import PackedAdapters
from redux_edge.frontend.module_run import run_module
from redux_edge.passes import build_pass
from redux_edge.recipe import load_recipe
from redux_edge.runtime.adapter_pack import parse_adapter_pack, read_adapter_pack
from redux_edge.train.adapters import AdapterPack, dequantize, quantize


def test_one_bit_is_the_sign_times_the_mean_magnitude_of_each_row():
    weight = torch.tensor([[0.5, -1.5, 1.0], [-2.0, 0.0, 4.0]])
    codes, scales = quantize(weight, 1)
    assert codes.tolist() == [[1, -1, 1], [-1, 1, 1]]
    assert scales.tolist() == pytest.approx([1.0, 2.0])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_the_scale_search_beats_scaling_to_the_largest_weight(bits):
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(bits)) ** 3  # heavy tails
    codes, scales = quantize(weight, bits)
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
    high = 2 ** (bits - 1) - 1
    naive_scale = weight.abs().amax(dim=1) / high
    naive = torch.clamp(torch.round(weight / naive_scale[:, None]), -high - 1, high) * naive_scale[:, None]
    ours = dequantize(codes, scales)
    assert ((ours - weight) ** 2).sum(1).le(((naive - weight) ** 2).sum(1) + 1e-9).all()


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32])
def test_a_pack_reads_back_what_was_written(bits):
    rng = np.random.default_rng(bits)
    low, high = (-1, 1) if bits == 1 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)

    def codes(shape):
        if bits == 32:
            return rng.standard_normal(shape).astype(np.float32)
        values = rng.integers(low, high + 1, shape)
        return np.where(values == 0, 1, values) if bits == 1 else values

    factors = {
        "layer.query.weight": {
            "down": (codes((4, 24)), rng.random(4).astype(np.float16)),
            "up": (codes((16, 4)), rng.random(16).astype(np.float16)),
        }
    }
    head = rng.standard_normal((2, 16)).astype(np.float16)
    pack = AdapterPack(
        "demo", ["no", "yes"], bits, 4, factors, head, np.zeros(2, np.float16), {"accuracy": 0.5}
    )
    read = parse_adapter_pack(pack.to_bytes())
    assert read["header"]["task"] == "demo" and read["header"]["metrics"] == {"accuracy": 0.5}
    for part, (written, scales) in factors["layer.query.weight"].items():
        expected = written.astype(np.float32) * scales.astype(np.float32)[:, None]
        np.testing.assert_array_equal(read["factors"]["layer.query.weight"][part], expected)
    np.testing.assert_array_equal(read["head_weight"], head.astype(np.float32))
    with pytest.raises(ValueError, match="header describes"):
        parse_adapter_pack(pack.to_bytes() + b"extra")


@pytest.fixture(scope="session")
def packs(tmp_path_factory):
    """Two 1-bit packs for two tasks of the same corpus, trained briefly (the training itself is measured
    by tools/adapter_bits.py)."""
    folder = tmp_path_factory.mktemp("packs")
    reports = {}
    for task in ("sentiment", "plot"):
        reports[task] = api.train_adapter_pack(
            "minilm-l6", task, folder / f"{task}.bin", bits=1, sentences=64, epochs=1, test_sentences=64
        )
    return reports


@pytest.mark.slow
def test_a_one_bit_pack_for_minilm_is_under_16_kb(packs):
    for report in packs.values():
        assert report["bytes"] < 16_000
        assert 0.0 <= report["accuracy"] <= 1.0


@pytest.fixture(scope="session")
def swappable_bundle(packs, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "tasks"
    step = build_pass("adapters", {"packs": [packs["sentiment"]["pack"], packs["plot"]["pack"]]})
    return api.compile_model("minilm-l6", "host", load_recipe(None).extended([step]), out)


@pytest.mark.slow
def test_two_packs_swap_on_one_base_bundle_and_each_equals_torch(swappable_bundle):
    manifest = swappable_bundle.manifest
    assert [p["task"] for p in manifest["adapters"]["packs"]] == ["sentiment", "plot"]
    assert [o["name"] for o in manifest["outputs"]] == ["sentence_embedding", "logits"]
    entry = zoo.load_model("minilm-l6")
    logits = {}
    for pack in manifest["adapters"]["packs"]:
        assert pack["verify"]["logits"]["max_abs"] <= 1e-4
        outputs, _ = api.run(swappable_bundle.path, adapter=pack["task"])
        read = read_adapter_pack(swappable_bundle.path / pack["file"])
        expected = run_module(PackedAdapters(entry.module, read), entry.inputs)
        assert np.abs(outputs["logits"] - expected[1]).max() <= 1e-4
        assert np.abs(outputs["sentence_embedding"] - expected[0]).max() <= 1e-4
        logits[pack["task"]] = outputs["logits"]
    assert np.abs(logits["sentiment"] - logits["plot"]).max() > 1e-3  # the swap changed the task
    default, _ = api.run(swappable_bundle.path)
    np.testing.assert_allclose(default["logits"], logits["sentiment"], atol=1e-5)


@pytest.mark.slow
def test_run_prints_the_task_labels_of_the_swapped_pack(cli, swappable_bundle):
    result = cli("run", swappable_bundle.path, "--adapter", "plot")
    assert result.exit_code == 0, result.stderr
    assert "review" in result.stdout or "plot summary" in result.stdout
    unknown = cli("run", swappable_bundle.path, "--adapter", "weather")
    assert unknown.exit_code == 2 and "choose one of: sentiment, plot" in unknown.stderr


@pytest.mark.slow
def test_a_merged_pack_equals_torch_and_cannot_be_swapped(cli, packs, tmp_path):
    out = tmp_path / "merged"
    result = cli(
        "compile", "-m", "minilm-l6", "--adapters", packs["plot"]["pack"], "--merge-adapters", "-o", out
    )
    assert result.exit_code == 0, result.stderr
    manifest = api.inspect(out)[0]
    assert manifest["adapters"]["merged"] is True
    assert manifest["verify"]["ir"]["logits"]["max_abs"] <= 1e-4
    assert "adapter.encoder" not in (out / "model.onnx").read_bytes().decode("latin-1")  # no branch left
    again = cli("run", out, "--adapter", "plot")
    assert again.exit_code == 2 and "no swappable adapter" in again.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--merge-adapters"], "--merge-adapters needs --adapters"),
        (["--adapters", "{junk}"], "not a redux-edge adapter pack"),
        (["--adapters", "{plot}", "--adapters", "{plot}"], "two adapter packs are for task 'plot'"),
        (
            ["--adapters", "{plot}", "--adapters", "{sentiment}", "--merge-adapters"],
            "merge takes exactly one",
        ),
        (["--adapters", "{plot}", "--backend", "openvino"], "swappable adapter packs need the onnxruntime"),
        (["--adapters", "{plot}", "--prune-heads", "0.5"], "do not fit"),
        (["--adapters", "{plot}", "--sparsity", "2:4"], "not supported"),
    ],
)
@pytest.mark.slow
def test_bad_adapter_flags_are_user_errors(cli, packs, tmp_path, extra, message):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a pack")
    paths = {"junk": junk, "plot": packs["plot"]["pack"], "sentiment": packs["sentiment"]["pack"]}
    flags = [flag.format(**paths) for flag in extra]
    result = cli("compile", "-m", "minilm-l6", "-o", tmp_path / "out", *flags)
    assert_clean_user_error(result, tmp_path, message=message)


@pytest.mark.slow
def test_adapters_need_the_pytorch_model_they_were_trained_on(cli, packs, tmp_path):
    model = make_mlp_onnx(tmp_path / "mlp.onnx")
    result = cli("compile", "-m", model, "--adapters", packs["plot"]["pack"], "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "targets weights this model lacks" in result.stderr
