"""`redux-edge train` on real processes: torch's launcher, gloo on CPU, 1 and 2 ranks, ZeRO 1 and 3.

The runs are short (6 steps of 8 Rotten Tomatoes snippets on all-MiniLM-L6-v2, sequences cut at 32
tokens): what is checked is that sharding changes memory, not the computation, and that a killed run
resumes where it left off. Quality of the trained results is measured by tools/train_eval.py
(docs/COMPRESSION.md).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import assert_clean_user_error
from graphs import make_mlp_onnx

from redux_edge.train.launch import train
from redux_edge.train.recipe import Optim

RECIPES = Path(__file__).resolve().parent.parent / "models" / "minilm-l6"
SHORT = (
    "optim.steps=6",
    "optim.global_batch=8",
    "data.sentences=96",
    "data.max_length=32",
    "checkpoint.every=2",
    "optim.schedule=cosine",  # a rate that changes every step: resumed and sharded runs must follow it
)
PLAN = {"heads": {"0": [0, 1, 2], "2": [5]}, "ffn": {"1": list(range(0, 1536, 3))}, "layers": [4]}


def _losses(out: Path) -> dict[int, float]:
    """The loss of every step, the last record of a step winning (a resumed run repeats none)."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    path.write_text(json.dumps(PLAN))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, plan_file) -> dict[str, dict]:
    """The same recover recipe on 1 process (DDP, replicated AdamW) and on 2 with ZeRO-1, 2 and 3."""
    folder = tmp_path_factory.mktemp("train")
    results = {}
    for name, zero, processes in (("single", 0, 1), ("zero1", 1, 2), ("zero2", 2, 2), ("zero3", 3, 2)):
        out = folder / name
        report = train(
            RECIPES / "train-recover.toml", out, zero, processes, overrides=SHORT, plan=str(plan_file)
        )
        results[name] = {"out": out, "report": report, "losses": _losses(out)}
    return results


@pytest.mark.slow
@pytest.mark.parametrize("sharded", ["zero1", "zero2", "zero3"])
def test_two_processes_follow_the_single_process_loss(runs, sharded):
    single, other = runs["single"]["losses"], runs[sharded]["losses"]
    assert sorted(single) == sorted(other) == list(range(1, 7))
    assert single[6] < single[1]  # it learns
    for step in single:
        # Same global batch, gradients averaged over ranks: equal up to float summation order.
        assert other[step] == pytest.approx(single[step], rel=2e-4, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("sharded", ["zero1", "zero2", "zero3"])
def test_optimizer_state_per_rank_is_halved(runs, sharded):
    (alone,) = runs["single"]["report"]["memory"]
    ranks = runs[sharded]["report"]["memory"]
    assert len(ranks) == 2
    for rank in ranks:
        assert rank["optimizer_bytes"] == pytest.approx(alone["optimizer_bytes"] / 2, rel=0.05)
    if sharded != "zero1":  # FSDP also shards gradients, and parameters outside forward and backward
        for rank in ranks:
            assert rank["parameter_bytes"] == pytest.approx(alone["parameter_bytes"] / 2, rel=0.05)
            assert rank["gradient_bytes"] == pytest.approx(alone["gradient_bytes"] / 2, rel=0.05)
    else:  # ZeRO-1 replicates parameters and gradients
        assert all(rank["parameter_bytes"] == alone["parameter_bytes"] for rank in ranks)


@pytest.mark.slow
def test_recover_writes_what_compile_reads(runs):
    out = runs["single"]["out"]
    assert json.loads((out / "plan.json").read_text()) == PLAN
    recipe = (out / "recipe.toml").read_text()
    assert (
        'pass = "drop-layers"' in recipe
        and 'pass = "prune-heads"' in recipe
        and 'pass = "prune-ffn"' in recipe
    )
    from safetensors.torch import load_file

    weights = load_file(out / "weights.safetensors")
    assert weights["encoder.layer.0.attention.self.query.weight"].shape == (384, 384)
    assert len([name for name in weights if name.startswith("encoder.layer.4.")]) == 16  # kept, to be dropped


@pytest.mark.slow
def test_a_recovered_model_compiles_pruned_and_quantized(runs, tmp_path, held_out_csv):
    from redux_edge.api import compile_model
    from redux_edge.recipe import load_recipe, passes_from_flags

    out = runs["single"]["out"]
    recipe = load_recipe(out / "recipe.toml").extended(passes_from_flags({"quantize": "int8"}))
    bundle = compile_model(
        "minilm-l6",
        "host",
        recipe,
        tmp_path / "b",
        weights=out / "weights.safetensors",
        eval_data=held_out_csv,
    )
    assert bundle.manifest["compression"]["plan"] == PLAN
    section = bundle.manifest["quantization"]
    assert section["quantized_weights"] == 25 and section["quality"]["embedding_cosine"]["mean"] >= 0.97
    assert "weights.safetensors" in bundle.manifest["model"]["weights"]


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(runs, plan_file, tmp_path):
    out = tmp_path / "resumed"
    command = [
        sys.executable, "-m", "redux_edge.cli", "train", str(RECIPES / "train-recover.toml"), "-o", str(out),
        "--zero", "1", "--nproc-per-node", "2", "--plan", str(plan_file), *(f"--set={s}" for s in SHORT),
    ]  # fmt: skip
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step-000002" / "meta.json").is_file():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    # As a scheduler ends a job: the launcher, torchrun's agent and both ranks (each in a session of its own).
    everything = [psutil.Process(first.pid), *psutil.Process(first.pid).children(recursive=True)]
    for process in everything:
        process.send_signal(signal.SIGKILL)
    first.wait()
    psutil.wait_procs(everything, timeout=30)
    done = _losses(out)
    assert 2 <= max(done) < 6, "the run was killed before its end"

    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    report = json.loads((out / "run.json").read_text())
    assert report["resumed_from"] >= 2
    uninterrupted = runs["zero1"]["losses"]
    resumed = _losses(out)
    for step in range(report["resumed_from"] + 1, 7):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_cosine_schedule_is_recorded_and_decays_to_zero(runs):
    optim = runs["zero1"]["report"]["recipe"]["optim"]
    assert optim["schedule"] == "cosine"
    schedule = Optim(steps=6, lr=1e-3, schedule="cosine")
    assert [schedule.lr_at(step) for step in (0, 3)] == pytest.approx([1e-3, 5e-4])
    assert schedule.lr_at(5) == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * 5 / 6)))
    assert Optim(lr=1e-3).lr_at(150) == 1e-3


@pytest.mark.slow
def test_training_user_errors(cli, tmp_path, plan_file):
    bad = tmp_path / "bad.toml"
    bad.write_text('task = "distill"\n')
    assert_clean_user_error(cli("train", bad, "-o", tmp_path / "o"), tmp_path, message="has task 'distill'")
    assert_clean_user_error(
        cli("train", RECIPES / "train-recover.toml", "-o", tmp_path / "o"), tmp_path, message="needs the plan"
    )
    assert_clean_user_error(
        cli("train", RECIPES / "train-shrp.toml", "-o", tmp_path / "o", "--set", "optim.stepz=3"),
        tmp_path,
        message="unknown keys ['stepz']",
    )
    assert_clean_user_error(
        cli("train", RECIPES / "train-shrp.toml", "-o", tmp_path / "o", "--set", "optim.schedule=linear"),
        tmp_path,
        message="optim.schedule 'linear'",
    )
    assert_clean_user_error(
        cli("train", RECIPES / "train-shrp.toml", "-o", tmp_path / "o", "--nnodes", "2"),
        tmp_path,
        message="need a rendezvous point",
    )
    # Found by a rank, reported by the launcher: the global batch does not split over 2 processes.
    result = cli(
        "train", RECIPES / "train-shrp.toml", "-o", tmp_path / "odd", "--nproc-per-node", "2",
        "--set", "optim.global_batch=3", "--set", "optim.steps=1", "--set", "data.sentences=16",
    )  # fmt: skip
    assert_clean_user_error(result, tmp_path, message="does not split over 2 processes")


@pytest.mark.slow
def test_shrp_usage_becomes_a_head_plan(tmp_path):
    out = tmp_path / "shrp"
    report = train(RECIPES / "train-shrp.toml", out, 1, 2, overrides=("optim.steps=3", *SHORT[1:]))
    plan = json.loads((out / "plan.json").read_text())
    assert sorted(plan["heads"]) == [str(layer) for layer in range(6)]
    assert all(len(heads) == 6 and len(set(heads)) == 6 for heads in plan["heads"].values())
    assert 'pass = "prune-heads"' in (out / "recipe.toml").read_text()  # for compile --recipe
    usage = json.loads((out / "usage.json").read_text())
    for layer, heads in plan["heads"].items():
        share = usage["share"][int(layer)]
        assert sum(share) == pytest.approx(1.0, abs=1e-3)  # router shares over heads, per token
        kept = [h for h in range(12) if h not in heads]
        assert max(share[h] for h in heads) <= min(share[h] for h in kept)
    assert report["memory"][0]["parameter_bytes"] == 6 * (384 * 12 + 12) * 4  # only the routers train


@pytest.mark.slow
def test_maskllm_and_adapter_recipes_write_what_compile_reads(tmp_path):
    from redux_edge.ir import nm
    from redux_edge.runtime.adapter_pack import parse_adapter_pack

    masks_run = tmp_path / "masks"
    train(RECIPES / "train-maskllm.toml", masks_run, overrides=("optim.steps=2", *SHORT[1:]))
    with np.load(masks_run / "masks.npz") as masks:
        assert len(masks.files) == 36  # 6 projections of 6 layers
        assert all(nm.violations(masks[name], 2, 4) == 0 for name in masks.files)
        assert masks["encoder.layer.0.attention.self.query.weight"].mean() == pytest.approx(0.5)
    adapters_run = tmp_path / "adapters"
    report = train(RECIPES / "train-adapters.toml", adapters_run, overrides=("optim.steps=2", *SHORT[1:]))
    pack = parse_adapter_pack((adapters_run / "sentiment.bin").read_bytes())
    assert pack["header"]["bits"] == 1 and pack["head_weight"].shape == (2, 384)
    assert report["artifacts"]["bytes"] == (adapters_run / "sentiment.bin").stat().st_size


def test_compile_takes_recovered_weights_and_refuses_misfits(cli, tmp_path, mlp_onnx):
    import torch
    from safetensors.torch import save_file

    from redux_edge import zoo
    from redux_edge.frontend.torch import load_weights

    entry = zoo.load_model("minilm-l6")
    state = {name: value.clone() for name, value in entry.module.state_dict().items()}
    state["encoder.layer.1.output.dense.bias"] += 1.0
    good = tmp_path / "good.safetensors"
    save_file(state, str(good))
    fresh = zoo.load_model("minilm-l6").module
    assert "good.safetensors (sha256 " in load_weights(fresh, good)
    assert torch.equal(fresh.encoder.layer[1].output.dense.bias, state["encoder.layer.1.output.dense.bias"])

    state["encoder.layer.0.intermediate.dense.weight"] = state["encoder.layer.0.intermediate.dense.weight"][
        :640
    ]
    misfit = tmp_path / "pruned.safetensors"
    save_file(state, str(misfit))
    result = cli("compile", "--model", "minilm-l6", "--weights", misfit, "-o", tmp_path / "out")
    assert_clean_user_error(
        result, tmp_path, message="do not fit the model (e.g. encoder.layer.0.intermediate"
    )
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    result = cli(
        "compile", "--model", "minilm-l6", "--weights", tmp_path / "junk.safetensors", "-o", tmp_path / "o"
    )
    assert_clean_user_error(result, tmp_path, message="cannot read weights")
    result = cli("compile", "--model", mlp_onnx, "--weights", good, "-o", tmp_path / "o2")
    assert_clean_user_error(result, tmp_path, message="--weights replaces a zoo model's parameters")
    assert not any(path.name.startswith(("out", "o")) for path in tmp_path.iterdir())


@pytest.fixture
def mlp_onnx(tmp_path):
    return make_mlp_onnx(tmp_path / "mlp.onnx")
