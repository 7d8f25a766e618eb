"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP): every rank writes its own shards.

A checkpoint is ``<out>/checkpoints/step-<n>/`` holding DCP's files and ``meta.json`` (step, world size,
ZeRO stage, task). It is written into ``step-<n>.partial`` and renamed by rank 0 after every rank has
finished, so a run killed while saving leaves the previous checkpoint as the latest complete one.

FSDP's sharded parameters and optimizer state go through ``get_state_dict``/``set_state_dict``; under
ZeRO-1 each rank's optimizer partition is saved under its own key (``optimizer.rank<r>``), which DCP
stores once per rank. A run resumes only with the world size and stage it was saved with.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from redux_edge.errors import UserError
from redux_edge.train.zero import init_optimizer_state, local_optimizer, unwrapped

__all__ = ["latest", "restore", "save"]

_STEP = re.compile(r"^step-(\d+)$")


def _state(module: nn.Module, optimizer: torch.optim.Optimizer, stage: int) -> dict:
    if stage == 1:
        return {
            "model": unwrapped(module).state_dict(),
            f"optimizer.rank{dist.get_rank()}": local_optimizer(optimizer).state_dict(),
        }
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(module, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save(folder: Path, step: int, module: nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> Path:
    final = folder / f"step-{step:06d}"
    partial = final.with_name(final.name + ".partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    dcp.save(_state(module, optimizer, meta["zero"]), checkpoint_id=str(partial))
    dist.barrier()
    if dist.get_rank() == 0:
        (partial / "meta.json").write_text(json.dumps({**meta, "step": step}))
        shutil.rmtree(final, ignore_errors=True)  # the same step saved again by a run that resumed there
        partial.rename(final)
    dist.barrier()
    return final


def latest(folder: Path) -> Path | None:
    steps = [
        (int(match.group(1)), path)
        for path in folder.glob("step-*")
        if (match := _STEP.match(path.name)) and (path / "meta.json").is_file()
    ]
    return max(steps)[1] if steps else None


def restore(checkpoint: Path, module: nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> int:
    """Load ``checkpoint`` into the module and optimizer in place; the number of steps it had done."""
    saved = json.loads((checkpoint / "meta.json").read_text())
    for key in ("world", "zero", "task"):
        if saved[key] != meta[key]:
            raise UserError(
                f"checkpoint {checkpoint} was saved with {key}={saved[key]}, this run has {meta[key]}",
                "resume with the same settings, or start a new run in another --output",
            )
    init_optimizer_state(optimizer)
    state = _state(module, optimizer, meta["zero"])
    dcp.load(state, checkpoint_id=str(checkpoint))
    if meta["zero"] == 1:
        unwrapped(module).load_state_dict(state["model"])
        local_optimizer(optimizer).load_state_dict(state[f"optimizer.rank{dist.get_rank()}"])
    else:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
    return saved["step"]
