"""``train`` (torch.distributed, ZeRO), and the one-process trainers ``train-adapter`` and ``learn-masks``."""

from __future__ import annotations

from pathlib import Path

import click

from redux_edge.cli.common import AT_LEAST_ONE, NON_NEGATIVE, SEED, emit_json, out, progress
from redux_edge.errors import UserError

__all__ = ["learn_masks_command", "train_adapter_command", "train_command"]


@click.command("train-adapter")
@click.option("-m", "--model", default="minilm-l6", show_default=True, help="Zoo text model.")
@click.option("--task", type=click.Choice(["sentiment", "plot"]), required=True, help="Rotten Tomatoes task.")
@click.option(
    "-o", "--output", "pack_file", required=True, type=click.Path(path_type=Path), help="Pack file."
)
@click.option("--bits", type=click.Choice(["1", "2", "4", "8", "32"]), default="1", show_default=True)
@click.option("--rank", type=AT_LEAST_ONE, default=4, show_default=True)
@click.option("--sentences", type=AT_LEAST_ONE, default=2000, show_default=True, help="Training sentences.")
@click.option("--epochs", type=AT_LEAST_ONE, default=2, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def train_adapter_command(
    model: str,
    task: str,
    pack_file: Path,
    bits: str,
    rank: int,
    sentences: int,
    epochs: int,
    seed: int,
    as_json: bool,
) -> None:
    """Train a low-bit LoRA adapter pack and task head for TASK on a frozen zoo model (quantization-aware,
    straight-through estimator); compile it with --adapters, swap it at run time with --adapter.

    \b
    Example:
      redux-edge train-adapter --task sentiment --bits 1 -o build/sentiment.bin
      redux-edge compile -m minilm-l6 --adapters build/sentiment.bin --adapters build/plot.bin -o build/tasks
      redux-edge run build/tasks sentences.txt --adapter plot
    """
    from redux_edge import api

    if rank < 1 or sentences < 1 or epochs < 1:
        raise UserError("--rank, --sentences and --epochs must be positive", "e.g. --rank 4 --epochs 2")
    report = api.train_adapter_pack(
        model, task, pack_file, int(bits), rank, sentences, epochs, seed=seed, step=progress
    )
    if as_json:
        emit_json(report)
        return
    out.print(
        f"wrote {report['pack']}: {report['bits']}-bit rank-{report['rank']} adapters for {report['task']}, "
        f"{report['bytes']:,} bytes; test accuracy {report['accuracy']:.3f} on {report['test_sentences']} "
        f"sentences (trained on {report['train_sentences']})"
    )


@click.command("learn-masks")
@click.option("-m", "--model", required=True, help="Zoo name (the masks are trained in PyTorch).")
@click.option(
    "-o", "--output", "plan_file", required=True, type=click.Path(path_type=Path), help="Mask plan (.npz)."
)
@click.option("--pattern", default="2:4", show_default=True, help="N:M: at most N non-zeros in every M.")
@click.option("--steps", type=AT_LEAST_ONE, default=300, show_default=True, help="Optimiser steps.")
@click.option(
    "--sentences",
    type=AT_LEAST_ONE,
    default=4096,
    show_default=True,
    help="Calibration sentences (task data).",
)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def learn_masks_command(
    model: str, plan_file: Path, pattern: str, steps: int, sentences: int, seed: int, as_json: bool
) -> None:
    """Learn N:M sparsity masks for MODEL (MaskLLM: Gumbel-softmax over the candidate masks of every
    group, weights frozen, distilling the dense model on real data); compile with --sparsity-masks.

    \b
    Example:
      redux-edge learn-masks --model minilm-l6 -o build/minilm-2to4.npz
      redux-edge compile --model minilm-l6 --sparsity-masks build/minilm-2to4.npz -o build/sparse
    """
    from redux_edge import api

    if steps < 1 or sentences < 1:
        raise UserError("--steps and --sentences must be positive", "e.g. --steps 300 --sentences 4096")
    report = api.learn_mask_plan(model, plan_file, pattern, steps, sentences, seed=seed, step=progress)
    if as_json:
        emit_json(report)
        return
    loss = report["distillation_loss"]
    out.print(
        f"wrote {report['plan']}: {report['pattern']} masks for {report['weights']} weights, learned on "
        f"{report['data']} in {report['steps']} steps; distillation loss (1 - cosine to dense) "
        f"{loss['first']:.4f} -> {loss['last']:.4f}; {report['groups_changed_from_magnitude']:.1%} of the "
        "groups differ from the magnitude mask"
    )


@click.command("train")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option(
    "--zero",
    type=click.IntRange(0, 3),
    default=0,
    show_default=True,
    help="0: DDP; 1: ZeroRedundancyOptimizer; 2/3: FSDP2 without/with resharding after forward.",
)
@click.option(
    "--nproc-per-node",
    type=AT_LEAST_ONE,
    default=1,
    show_default=True,
    help="Processes on this node (one per GPU).",
)
@click.option("--nnodes", type=AT_LEAST_ONE, default=1, show_default=True, help="Nodes (torchrun --nnodes).")
@click.option(
    "--node-rank",
    type=NON_NEGATIVE,
    default=0,
    show_default=True,
    help="This node's rank (multi-node).",
)
@click.option("--rdzv-endpoint", help="HOST:PORT every node reaches (multi-node c10d rendezvous).")
@click.option("--rdzv-id", default="redux-edge", show_default=True, help="Job id shared by the nodes.")
@click.option(
    "--max-restarts",
    type=NON_NEGATIVE,
    default=0,
    show_default=True,
    help="Restart failed ranks (they resume).",
)
@click.option("--engine", type=click.Choice(["torch", "deepspeed"]), default="torch", show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override the recipe.")
@click.option("--plan", help="recover: the pruned model's plan (JSON, or the bundle's manifest.json).")
@click.option(
    "-m", "--model", help="Train this model instead of the recipe's (recover: a Hugging Face directory too)."
)
@click.option("--json", "as_json", is_flag=True)
def train_command(
    recipe: Path,
    out: Path,
    zero: int,
    nproc_per_node: int,
    nnodes: int,
    node_rank: int,
    rdzv_endpoint: str | None,
    rdzv_id: str,
    max_restarts: int,
    engine: str,
    overrides: tuple[str, ...],
    plan: str | None,
    model: str | None,
    as_json: bool,
) -> None:
    """Train a compression RECIPE (models/*/train-*.toml: shrp, maskllm, adapters, recover) with
    torch.distributed, and write what `compile` consumes. Running it again in the same --output resumes
    from the latest checkpoint.

    \b
    Examples:
      redux-edge train models/minilm-l6/train-shrp.toml -o build/shrp --nproc-per-node 2 --zero 1
      redux-edge train models/minilm-l6/train-recover.toml --plan build/edge/manifest.json -o build/recover
      redux-edge train models/minilm-l6/train-recover.toml --model my-bert/ --plan build/mine/manifest.json \
          -o build/mine-recover
      redux-edge train models/minilm-l6/train-maskllm.toml -o build/masks --nnodes 2 --node-rank 0 \\
          --rdzv-endpoint node0:29400 --nproc-per-node 4 --zero 3
    """
    from redux_edge.train.launch import train

    if model is not None:
        # A directory by absolute path: the ranks may start elsewhere.
        overrides = (*overrides, f"model={Path(model).resolve() if Path(model).is_dir() else model}")
    report = train(
        recipe,
        out,
        zero,
        nproc_per_node,
        nnodes,
        node_rank,
        rdzv_endpoint,
        rdzv_id,
        max_restarts,
        overrides,
        plan,
        engine,
    )
    if as_json:
        emit_json(report)
        return
    if not report:
        click.echo(f"node {node_rank} done; the node with rank 0 writes the report")
        return
    memory = report["memory"][0]
    click.echo(
        f"{report['recipe']['task']}: {report['steps']} steps on {report['world']} process(es), "
        f"ZeRO {report['zero']}, final loss {report['final_loss']:.5f}, {report['seconds']:.0f} s"
    )
    click.echo(
        "rank 0 holds: parameters {parameter_bytes:,} B, gradients {gradient_bytes:,} B, "
        "optimizer state {optimizer_bytes:,} B".format(**memory)
    )
    for name, value in report["artifacts"].items():
        click.echo(f"  {name}: {value}")
