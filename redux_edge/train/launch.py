"""``redux-edge train``: check the recipe here, then start the ranks with torch's own launcher,
``torch.distributed.run`` (torchrun), which also does multi-node rendezvous and restarts.

One machine: ``--nproc-per-node N`` (``--standalone`` rendezvous). Several nodes: the same command on
every node with ``--nnodes``, ``--node-rank`` and a shared ``--rdzv-endpoint host:port`` (c10d
rendezvous), e.g. from a Slurm batch script (docs/COMPRESSION.md, "Training at scale"). Backend: gloo
on CPUs, NCCL on GPUs (one process per GPU). A rank that fails with a user error leaves ``error.json`` in
the output directory, which the launcher reads and removes; an output directory this run created is
removed again when the run ends in a user error, so that a mistake leaves nothing behind. The launcher's
own log goes to ``<out>/logs/launcher.log``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from redux_edge import zoo
from redux_edge.errors import UserError
from redux_edge.train.recipe import load_train_recipe
from redux_edge.train.recover import read_plan
from redux_edge.train.worker import ERROR_FILE
from redux_edge.train.zero import STAGES

__all__ = ["train"]

# More ranks than this per core only time-slice: a run of 1,000 ranks on 2 cores exhausted memory first.
_RANKS_PER_CORE = 4


def train(
    recipe_path: Path,
    out: Path,
    zero: int = 0,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "redux-edge",
    max_restarts: int = 0,
    overrides: tuple[str, ...] = (),
    plan: str | None = None,
    engine: str = "torch",
) -> dict:
    """Run the recipe on ``nnodes`` x ``nproc_per_node`` processes; rank 0's run report."""
    recipe = load_train_recipe(recipe_path, overrides)  # a bad recipe fails here, before any process starts
    cores = os.cpu_count() or 1
    if nproc_per_node > _RANKS_PER_CORE * cores:
        raise UserError(
            f"--nproc-per-node {nproc_per_node} would start more than {_RANKS_PER_CORE} ranks per core "
            f"of this machine's {cores}; each rank holds its own copy of the model and data",
            f"give at most {_RANKS_PER_CORE * cores} (one per GPU, or about one per core)",
        )
    if zero not in STAGES:
        raise UserError(f"--zero {zero}", f"choose one of: {', '.join(map(str, STAGES))}")
    if engine == "deepspeed":
        raise UserError(
            "the deepspeed engine is not wired in this release",
            "use the default torch engine: --zero 1 (ZeroRedundancyOptimizer) or --zero 2/3 (FSDP2)",
        )
    if Path(recipe.model).is_dir():
        from redux_edge.frontend.huggingface import check_directory

        check_directory(Path(recipe.model))
        if recipe.task not in ("recover", "shrp"):
            raise UserError(
                f"the {recipe.task} task trains zoo models; a Hugging Face directory trains with recover "
                "or shrp",
                "use models/minilm-l6/train-recover.toml or train-shrp.toml with --model DIR",
            )
    else:
        zoo.load_card(recipe.model)  # an unknown name fails here, not in every rank
    if recipe.task == "recover":
        if not (plan or recipe.options.get("plan")):
            raise UserError(
                "recover needs the plan of the pruned model", "pass --plan <bundle>/manifest.json"
            )
        read_plan(plan or recipe.options["plan"])
    if nnodes > 1 and not rdzv_endpoint:
        raise UserError(f"{nnodes} nodes need a rendezvous point", "pass --rdzv-endpoint HOST:PORT")
    if node_rank >= nnodes:
        raise UserError(f"--node-rank {node_rank} with {nnodes} node(s)", f"give 0 to {nnodes - 1}")
    rendezvous = (
        ["--standalone"]
        if nnodes == 1 and not rdzv_endpoint
        else [
            f"--nnodes={nnodes}",
            f"--node-rank={node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}",
            f"--rdzv-id={rdzv_id}",
        ]
    )
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *rendezvous,
        f"--nproc-per-node={nproc_per_node}",
        f"--max-restarts={max_restarts}",
        "-m",
        "redux_edge.train.worker",
        str(Path(recipe_path).resolve()),
        f"--out={out.resolve()}",
        f"--zero={zero}",
        *(f"--set={assignment}" for assignment in overrides),
        *([f"--plan={Path(plan).resolve()}"] if plan else []),
    ]
    with _removed_on_user_error(out):
        (out / ERROR_FILE).unlink(missing_ok=True)
        logs = out / "logs"
        logs.mkdir(exist_ok=True)
        with (logs / "launcher.log").open("w") as log:
            # The ranks print their progress on stdout; the launcher's noise and tracebacks go to the log.
            code = subprocess.run(argv, stderr=log, check=False).returncode
        if (out / ERROR_FILE).is_file():
            error = json.loads((out / ERROR_FILE).read_text())
            (out / ERROR_FILE).unlink()
            raise UserError(error["message"], error["hint"])
    if code != 0:
        raise RuntimeError(f"training failed (exit code {code}); see {logs / 'launcher.log'}")
    return json.loads((out / "run.json").read_text()) if node_rank == 0 else {}


@contextlib.contextmanager
def _removed_on_user_error(out: Path) -> Iterator[None]:
    """Create ``out`` for the run; if the run ends in a user error, remove it again when this run made it
    (a resumed run's directory keeps its checkpoints)."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        yield
    except OSError as exc:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise UserError(f"cannot write to {out}: {exc.strerror or exc}", "choose a writable -o") from exc
    except UserError:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
