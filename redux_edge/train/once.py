"""The one-process trainers of the command line, ``learn-masks`` and ``train-adapter``: the ``maskllm`` and
``adapters`` training tasks run by ``redux-edge train``'s own launcher on one process, in a scratch run
directory, and what they write moved to where the user asked, so that there is one path for each."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import tomli_w

from redux_edge.datasets import rotten_tomatoes
from redux_edge.errors import UserError
from redux_edge.files import save_arrays, write_atomically
from redux_edge.interfaces import Step, no_progress
from redux_edge.ir import nm
from redux_edge.preprocess import TextPreprocessor
from redux_edge.runtime.adapter_pack import parse_adapter_pack, with_metrics

__all__ = ["learn_mask_plan", "train_adapter_pack"]

_GLOBAL_BATCH, _MAX_LENGTH = 32, 64


def _zoo_card(model: str, verb: str) -> dict:
    from redux_edge import zoo

    if model.endswith(".onnx") or Path(model).is_file():
        raise UserError(f"{verb} trains a PyTorch model", "give a zoo model (redux-edge models)")
    return zoo.load_card(model)


def _run(task: str, model: str, sections: dict, scratch: Path) -> dict:
    from redux_edge.train.launch import train

    recipe = scratch / "recipe.toml"
    recipe.write_text(tomli_w.dumps({"task": task, "model": model, **sections}))
    return train(recipe, scratch / "run")


def learn_mask_plan(
    model: str,
    out: Path,
    pattern: str = "2:4",
    steps: int = 300,
    sentences: int = 4096,
    seed: int = 0,
    step: Step = no_progress,
) -> dict:
    """Learn N:M masks (MaskLLM) for the weights the ``sparsity`` pass would sparsify in a zoo model, on
    the card's Rotten Tomatoes training sentences, and write them to ``out`` (.npz)."""
    from redux_edge import zoo
    from redux_edge.train.maskllm import eligible_masks

    _zoo_card(model, "learn-masks")
    nm.parse_pattern(pattern)
    count = len(rotten_tomatoes.load(train=sentences, test=0).train_texts)
    data = f"{count} Rotten Tomatoes training sentences"
    sections = {
        "data": {"sentences": sentences, "max_length": _MAX_LENGTH},
        "optim": {"steps": steps, "global_batch": _GLOBAL_BATCH, "lr": 5e-2, "seed": seed},
        "checkpoint": {"every": 0},
        "maskllm": {"pattern": pattern},
    }
    with tempfile.TemporaryDirectory(prefix="redux-edge-masks-") as scratch:
        with step(f"learning {pattern} masks on {data} ({steps} steps, the maskllm task on one process)"):
            _run("maskllm", model, sections, Path(scratch))
        run = Path(scratch) / "run"
        with np.load(run / "masks.npz", allow_pickle=False) as archive:
            learned = {name: archive[name] for name in archive.files}
        losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    write_atomically(out, lambda path: save_arrays(path, learned, compressed=True))
    m = nm.parse_pattern(pattern)[1]
    magnitude = eligible_masks(zoo.load_model(model).module, pattern)
    changed = sum(
        int((nm.groups(learned[n], m) != nm.groups(magnitude[n], m)).any(axis=1).sum()) for n in learned
    )
    return {
        "plan": str(out),
        "pattern": pattern,
        "weights": len(learned),
        "data": data,
        "steps": steps,
        "groups_changed_from_magnitude": changed / sum(keep.size // m for keep in learned.values()),
        "distillation_loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None},
    }


def train_adapter_pack(
    model: str,
    task: str,
    out: Path,
    bits: int = 1,
    rank: int = 4,
    sentences: int = 2000,
    epochs: int = 2,
    seed: int = 0,
    test_sentences: int = 1000,
    step: Step = no_progress,
) -> dict:
    """Train a low-bit adapter pack for a Rotten Tomatoes ``task`` on a zoo text model (the ``adapters``
    task on one process), measure its test accuracy through the pack as a device reads it, and write it
    to ``out``."""
    import torch

    from redux_edge import zoo
    from redux_edge.analysis.adapted import PackedAdapters

    card = _zoo_card(model, "train-adapter")
    if card.get("task_data") != "rotten-tomatoes":
        raise UserError(f"{model} has no task data to train adapters on", "use minilm-l6")
    if task not in rotten_tomatoes.TASKS:
        raise UserError(f"unknown task '{task}'", f"choose one of: {', '.join(rotten_tomatoes.TASKS)}")
    data = rotten_tomatoes.load(train=sentences, test=test_sentences, seed=seed, task=task)
    steps = max(1, math.ceil(len(data.train_texts) * epochs / _GLOBAL_BATCH))
    sections = {
        "data": {"sentences": sentences, "max_length": _MAX_LENGTH},
        "optim": {"steps": steps, "global_batch": _GLOBAL_BATCH, "lr": 2e-3, "seed": seed},
        "checkpoint": {"every": 0},
        "adapters": {"task": task, "bits": bits, "rank": rank},
    }
    with tempfile.TemporaryDirectory(prefix="redux-edge-adapters-") as scratch:
        trained = f"{bits}-bit rank-{rank} adapters for '{task}' on {len(data.train_texts)} sentences"
        with step(f"training {trained} ({steps} steps, the adapters task on one process)"):
            _run("adapters", model, sections, Path(scratch))
        blob = (Path(scratch) / "run" / f"{task}.bin").read_bytes()
    entry = zoo.load_model(model)
    assert isinstance(entry.preprocessor, TextPreprocessor), "a text model (its card names text data)"
    with step(f"measuring accuracy on {len(data.test_texts)} test sentences"):
        adapted = PackedAdapters(entry.module, parse_adapter_pack(blob))
        correct = 0
        with torch.inference_mode():
            for start in range(0, len(data.test_texts), 64):
                feeds = entry.preprocessor(data.test_texts[start : start + 64])
                logits = adapted(*(torch.from_numpy(array) for array in feeds.values()))[1]
                correct += int((logits.argmax(1).numpy() == data.test_labels[start : start + 64]).sum())
    metrics = {
        "accuracy": correct / len(data.test_texts),
        "train_sentences": len(data.train_texts),
        "test_sentences": len(data.test_texts),
    }
    blob = with_metrics(blob, metrics)
    write_atomically(out, lambda path: path.write_bytes(blob))
    return {"pack": str(out), "task": task, "bits": bits, "rank": rank, "bytes": len(blob), **metrics}
