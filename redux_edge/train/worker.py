"""One rank of ``redux-edge train``: started by torch's launcher (``torch.distributed.run``), which sets the
rank, world size and rendezvous in the environment; this file is what each process runs.

Per step: this rank's share of the global batch, forward (the task's module returns the loss), backward,
optimizer step; the loss averaged over ranks; rank 0 appends a JSON line to ``metrics.jsonl`` (step,
loss, samples per second) and drives the progress display. Sharded checkpoints every
``checkpoint.every`` steps; a run started again in the same output directory resumes from the latest.
The bytes each rank holds (parameters, gradients, optimizer state) go to ``memory.json``; at the end
rank 0 writes the task's artifacts and ``run.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist

from redux_edge import zoo
from redux_edge.errors import UserError
from redux_edge.files import write_atomically
from redux_edge.train import checkpoint, zero
from redux_edge.train.mask_aware import MaskAwareTask
from redux_edge.train.recipe import TrainRecipe, load_train_recipe
from redux_edge.train.recover import RecoverTask
from redux_edge.train.shrp import ShrpTask
from redux_edge.train.tasks import AdapterTask, MaskTask

__all__ = ["ERROR_FILE", "main"]

ERROR_FILE = "error.json"


def _task(recipe: TrainRecipe):

    tasks = {"shrp": ShrpTask, "recover": RecoverTask, "maskllm": MaskTask, "adapters": AdapterTask}
    if Path(recipe.model).is_dir():
        from redux_edge.frontend.huggingface import load_directory
        from redux_edge.train.directory import DirectoryRecoverTask, DirectoryShrpTask

        directory_tasks = {"recover": DirectoryRecoverTask, "shrp": DirectoryShrpTask}
        return directory_tasks[recipe.task](load_directory(Path(recipe.model)), recipe)
    entry = zoo.load_model(recipe.model)
    image_model = entry.architecture.get("family") == "cnn"
    if recipe.task == "mask-aware":
        if not image_model:
            raise UserError(f"mask-aware trains image zoo models, not {recipe.model}", "use mnist-cnn")

        return MaskAwareTask.from_recipe(entry, recipe)
    if entry.architecture.get("family") != "bert":
        raise UserError(f"{recipe.task} takes BERT-family zoo models, not {recipe.model}", "use minilm-l6")
    return tasks[recipe.task](entry, recipe)


def _full_state(module: torch.nn.Module, stage: int) -> dict[str, torch.Tensor]:
    """The whole model's parameters on rank 0 (FSDP gathers its shards; a collective call)."""
    if stage in (2, 3):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return cast(dict[str, torch.Tensor], get_model_state_dict(module, options=options))
    return zero.unwrapped(module).state_dict()


def _train(args: argparse.Namespace, rank: int, world: int) -> dict:
    recipe = load_train_recipe(args.recipe, args.set)
    if args.plan:
        recipe.options["plan"] = args.plan
    torch.manual_seed(recipe.optim.seed)
    task = _task(recipe)
    if torch.cuda.is_available():
        task.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
    module, optimizer = zero.shard(
        task.module, args.zero, recipe.optim.lr, recipe.optim.weight_decay, task.blocks
    )
    out = Path(args.out)
    meta = {"world": world, "zero": args.zero, "task": recipe.task}
    start = 0
    if (found := checkpoint.latest(out / "checkpoints")) is not None:
        start = checkpoint.restore(found, module, optimizer, meta)
    progress = _Progress(recipe, start) if rank == 0 else None
    memory: dict = {}
    began = time.perf_counter()
    loss_value = float("nan")
    for step in range(start, recipe.optim.steps):
        ticked = time.perf_counter()
        recipe.optim.set_lr(optimizer, step)
        loss = module(*task.batch(step, rank, world))
        loss.backward()
        optimizer.step()
        if not memory:
            memory = zero.memory(module, optimizer)
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        dist.all_reduce(total)
        loss_value = float(total) / world
        if progress is not None:
            progress.step(
                out, step + 1, loss_value, recipe.optim.global_batch / (time.perf_counter() - ticked)
            )
        every = recipe.checkpoint.every
        if every and (step + 1) % every == 0 and step + 1 < recipe.optim.steps:
            checkpoint.save(out / "checkpoints", step + 1, module, optimizer, meta)
    if start < recipe.optim.steps:
        checkpoint.save(out / "checkpoints", recipe.optim.steps, module, optimizer, meta)
    ranks = [None] * world
    dist.all_gather_object(ranks, {"rank": rank, **memory})
    state = _full_state(module, args.zero)
    extra = {}
    if hasattr(task, "usage"):
        usage = task.usage()
        for value in usage.values():
            dist.all_reduce(value)
        extra["usage"] = usage
    if rank != 0:
        return {}
    artifacts = task.finish(state, out, **extra)
    report = {
        "recipe": recipe.to_json(),
        "world": world,
        "zero": args.zero,
        "steps": recipe.optim.steps,
        "resumed_from": start,
        "final_loss": loss_value,
        "seconds": time.perf_counter() - began,
        "memory": ranks,
        "artifacts": artifacts,
    }
    write_atomically(
        out / "memory.json", lambda p: p.write_text(json.dumps({"zero": args.zero, "ranks": ranks}))
    )
    write_atomically(out / "run.json", lambda p: p.write_text(json.dumps(report, indent=1)))
    assert progress is not None  # rank 0 has one
    progress.close()
    return report


class _Progress:
    """Rank 0: a rich progress bar (loss, samples/s) on a terminal, and the JSON lines of every step."""

    def __init__(self, recipe: TrainRecipe, start: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn(f"{recipe.task} {recipe.model}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.5f}  {task.fields[rate]:.1f} samples/s"),
            TimeRemainingColumn(),
            disable=not sys.stdout.isatty(),
        )
        self.task = self.bar.add_task("train", total=recipe.optim.steps, completed=start, loss=0.0, rate=0.0)
        self.bar.start()
        self.started = time.time()

    def step(self, out: Path, step: int, loss: float, rate: float) -> None:
        self.bar.update(self.task, completed=step, loss=loss, rate=rate)
        line = {"step": step, "loss": loss, "samples_per_s": rate, "time": time.time()}
        with (out / "metrics.jsonl").open("a") as metrics:
            metrics.write(json.dumps(line) + "\n")

    def close(self) -> None:
        self.bar.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one rank of redux-edge train (started by torchrun)")
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--out", required=True)
    parser.add_argument("--zero", type=int, choices=zero.STAGES, default=0)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--plan")
    args = parser.parse_args(argv)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        _train(args, rank, world)
    except UserError as exc:
        if rank == 0:
            error = {"message": exc.message, "hint": exc.hint}
            write_atomically(Path(args.out) / ERROR_FILE, lambda p: p.write_text(json.dumps(error)))
        return 2
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
