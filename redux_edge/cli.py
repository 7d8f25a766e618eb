"""``redux-edge``: the command line. Thin: parse, call ``redux_edge.api``, print with rich.

Verbs are the user's words (compile, run, bench, inspect, targets, models, passes, devices, flash,
rollback, profile, leakage). Reports go to
stdout (``--json`` for scripts), progress to stderr. A user's mistake is one line and exit code 2; a
bug is exit code 1; ``--debug`` shows the traceback of either.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from redux_edge.errors import UserError

__all__ = ["cli", "entry_point", "main"]

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


def _progress(message: str) -> contextlib.AbstractContextManager:
    @contextlib.contextmanager
    def step() -> Iterator[None]:
        started = time.perf_counter()
        with err.status(message):
            yield
        err.print(f"[green]✓[/] {message} [dim]({time.perf_counter() - started:.1f}s)[/]")

    return step()


def _emit_json(payload: object) -> None:
    click.echo(json.dumps(payload, indent=2, default=_json_default))


def _json_default(value: object) -> object:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _parse_shapes(text: str | None) -> dict[str, list[int]]:
    """trtexec's form: ``name:1x128,other:1x3x28x28``."""
    shapes = {}
    for item in filter(None, (text or "").split(",")):
        name, sep, dims = item.rpartition(":")
        try:
            shapes[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            sep = ""
        if not sep or not name:
            raise UserError(
                f"cannot read shape '{item}'", "write --shapes input_ids:1x128,attention_mask:1x128"
            )
    return shapes


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.version_option(package_name="redux-edge")
def cli(debug: bool) -> None:
    """Compile compressed PyTorch and ONNX models into verified bundles for edge devices.

    \b
    Examples:
      redux-edge compile --model minilm-l6 --target host -o build/minilm
      redux-edge run build/minilm sentences.txt
      redux-edge bench build/minilm --json
    """
    # Libraries' warnings (exporter, converters) are not actionable for a user; ours are.
    logging.basicConfig(level=logging.DEBUG if debug else logging.ERROR, format="%(name)s: %(message)s")
    logging.getLogger("redux_edge").setLevel(logging.DEBUG if debug else logging.WARNING)


@cli.command("compile")
@click.option(
    "-m", "--model", required=True, help="Zoo name (see `redux-edge models`) or path to an .onnx file."
)
@click.option(
    "-t", "--target", default="host", show_default=True, help="Target name (see `redux-edge targets`)."
)
@click.option(
    "-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Bundle directory."
)
@click.option("--recipe", type=click.Path(path_type=Path), help="Recipe .toml, or a bundle's manifest.json.")
@click.option(
    "--pass",
    "extra_passes",
    multiple=True,
    metavar="NAME[:K=V,...]",
    help="Append a pass to the recipe (repeatable), e.g. --pass cleanup:iterations=3.",
)
@click.option("--prune-heads", type=float, help="Remove this fraction of attention heads (prune-heads).")
@click.option("--prune-ffn", type=float, help="Remove this fraction of feed-forward neurons (prune-ffn).")
@click.option(
    "--drop-layers", metavar="N|I,J,...", help="Drop N layers by block influence, or the listed layers."
)
@click.option(
    "--importance",
    type=click.Choice(["magnitude", "calibration", "random", "plan"]),
    help="How the structural flags choose units [magnitude; --drop-layers N: calibration].",
)
@click.option("--plan", type=click.Path(path_type=Path), help="Plan JSON naming heads/neurons/layers.")
@click.option("--sparsity", metavar="N:M", help="Semi-structured weight sparsity, e.g. 2:4 (sparsity pass).")
@click.option(
    "--adapters",
    "adapter_packs",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Adapter pack from train-adapter (repeatable; the first is the default task).",
)
@click.option("--merge-adapters", is_flag=True, help="Merge the (one) adapter pack into the weights.")
@click.option(
    "--sparsity-masks",
    type=click.Path(path_type=Path),
    help="Learned N:M masks from `redux-edge learn-masks` (.npz) [default: magnitude].",
)
@click.option(
    "--mac-prune",
    "mac_drop",
    type=float,
    metavar="P",
    help="MACPruning: drop each non-critical input pixel with probability P on every inference.",
)
@click.option(
    "--mac-keep-top",
    type=float,
    metavar="F",
    help="MACPruning: always keep this fraction of pixels, the most important by occlusion [0.4].",
)
@click.option("--mac-seed", type=int, help="MACPruning: fix the draw sequence (tests, reproducible runs).")
@click.option(
    "--emit-c", is_flag=True, help="MACPruning: also write the protected first layer as C (bundle's c/)."
)
@click.option("--backend", help="Override the target's preferred backend.")
@click.option(
    "--shapes",
    help="Input shapes, trtexec style (input:1x3x28x28,...): an ONNX file's verification inputs, "
    "and the fixed shapes of static-shape backends (TVM, TensorRT).",
)
@click.option(
    "--inputs",
    "inputs_file",
    type=click.Path(path_type=Path),
    help="Real inputs to verify on: .npz, .npy, or the model's text/image format.",
)
@click.option(
    "--weights",
    type=click.Path(path_type=Path),
    help="Zoo models: parameters to use instead of the package's (.safetensors, e.g. from `train recover`).",
)
@click.option("--threads", type=int, help="Threads recorded for the device (default: all cores).")
@click.option("--precision", help="fp32, fp16 or bf16 where the backend has it [fp32; TensorRT: fp16].")
@click.option("--dla-core", type=int, help="TensorRT: run on this DLA core, with GPU fallback.")
@click.option(
    "--tune", type=int, default=0, help="TVM: MetaSchedule trial budget (0 = reuse the database only)."
)
@click.option("--tuning-db", type=click.Path(path_type=Path), help="TVM: tuning database directory.")
@click.option("--rpc-tracker", metavar="HOST:PORT", help="TVM: tune on a board through this RPC tracker.")
@click.option("--rpc-key", help="TVM: the board's key at the RPC tracker.")
@click.option(
    "--tolerance-cosine", type=float, help="Minimum cosine vs the reference [0.9999; 0.999 below fp32]."
)
@click.option(
    "--tolerance-atol",
    type=float,
    help="Maximum abs difference vs the reference, scaled by its magnitude above 1 [1e-3; 5e-2 below fp32].",
)
@click.option("-f", "--force", is_flag=True, help="Replace an existing bundle directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def compile_command(
    model: str,
    target: str,
    out: Path,
    recipe: Path | None,
    extra_passes: tuple[str, ...],
    prune_heads: float | None,
    prune_ffn: float | None,
    drop_layers: str | None,
    importance: str | None,
    plan: Path | None,
    sparsity: str | None,
    sparsity_masks: Path | None,
    adapter_packs: tuple[Path, ...],
    merge_adapters: bool,
    mac_drop: float | None,
    mac_keep_top: float | None,
    mac_seed: int | None,
    emit_c: bool,
    backend: str | None,
    shapes: str | None,
    inputs_file: Path | None,
    weights: Path | None,
    threads: int | None,
    precision: str | None,
    dla_core: int | None,
    tune: int,
    tuning_db: Path | None,
    rpc_tracker: str | None,
    rpc_key: str | None,
    tolerance_cosine: float | None,
    tolerance_atol: float | None,
    force: bool,
    as_json: bool,
) -> None:
    """Compile MODEL for TARGET into a verified bundle.

    \b
    Examples:
      redux-edge compile --model minilm-l6 --target host -o build/minilm
      redux-edge compile --model minilm-l6 --target x86-64-avx2 --backend openvino -o build/ov
      redux-edge compile --model minilm-l6 --target x86-64-avx2 --backend tvm --shapes \\
          input_ids:1x128,attention_mask:1x128 --tune 64 -o build/tvm
      redux-edge compile --model minilm-l6 --target arm64-cortex-a72 -o build/a72
      redux-edge compile --model my.onnx --shapes x:1x3x224x224 -o build/my
      redux-edge compile --model minilm-l6 --recipe models/minilm-l6/edge.toml -o build/edge
      redux-edge compile --model minilm-l6 --prune-heads 0.5 --importance calibration -o build/half
      redux-edge compile --model minilm-l6 --target jetson-orin-nano --sparsity 2:4 -o build/sparse
      redux-edge compile --model mnist-cnn --mac-prune 0.5 --mac-keep-top 0.4 --emit-c -o build/protected
      redux-edge compile --model minilm-l6 --recipe build/minilm/manifest.json -o build/again
      redux-edge compile --model minilm-l6 --weights build/recover/weights.safetensors \
          --recipe build/recover/recipe.toml -o build/edge-recovered
    """
    from redux_edge import api
    from redux_edge.ir.verify import Tolerance
    from redux_edge.passes import build_pass
    from redux_edge.recipe import load_recipe, parse_pass_flag

    if (rpc_tracker is None) != (rpc_key is None):
        raise UserError("--rpc-tracker and --rpc-key go together", "give both, or neither to tune locally")
    options = {
        "threads": threads,
        "precision": precision,
        "tune": tune,
        "tuning_db": tuning_db,
        "dla_core": dla_core,
    }
    if rpc_tracker:
        options["rpc"] = {"tracker": rpc_tracker, "key": rpc_key}
    tolerance = None  # the backend's precision decides, unless the user sets either bound
    if tolerance_cosine is not None or tolerance_atol is not None:
        default = Tolerance.for_precision(precision or "fp32")
        tolerance = Tolerance(tolerance_cosine or default.min_cosine, tolerance_atol or default.atol)
    structural = _structural_flags(prune_heads, prune_ffn, drop_layers, importance, plan)
    masking = _sparsity_flags(sparsity, sparsity_masks)
    flags = [*(parse_pass_flag(flag) for flag in extra_passes), *structural, *masking]
    if merge_adapters and not adapter_packs:
        raise UserError("--merge-adapters needs --adapters PACK", "give the pack to merge")
    if adapter_packs:
        flags.append(
            build_pass("adapters", {"packs": [str(p) for p in adapter_packs], "merge": merge_adapters})
        )
    flags += _protection_flags(mac_drop, mac_keep_top, mac_seed)
    chosen = load_recipe(recipe).extended(flags)
    with api.native_output_to_stderr():
        bundle = api.compile_model(
            model,
            target,
            chosen,
            out,
            force=force,
            backend_name=backend,
            shapes=_parse_shapes(shapes),
            inputs_file=inputs_file,
            weights=weights,
            tolerance=tolerance,
            backend_options=options,
            emit_c=emit_c,
            step=_progress,
        )
    if as_json:
        _emit_json(bundle.manifest)
    else:
        _print_report(bundle.path, bundle.manifest, [])


@cli.command("train-adapter")
@click.option("-m", "--model", default="minilm-l6", show_default=True, help="Zoo text model.")
@click.option("--task", type=click.Choice(["sentiment", "plot"]), required=True, help="Rotten Tomatoes task.")
@click.option(
    "-o", "--output", "pack_file", required=True, type=click.Path(path_type=Path), help="Pack file."
)
@click.option("--bits", type=click.Choice(["1", "2", "4", "8", "32"]), default="1", show_default=True)
@click.option("--rank", default=4, show_default=True)
@click.option("--sentences", default=2000, show_default=True, help="Training sentences.")
@click.option("--epochs", default=2, show_default=True)
@click.option("--seed", default=0, show_default=True)
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
        model, task, pack_file, int(bits), rank, sentences, epochs, seed=seed, step=_progress
    )
    if as_json:
        _emit_json(report)
        return
    out.print(
        f"wrote {report['pack']}: {report['bits']}-bit rank-{report['rank']} adapters for {report['task']}, "
        f"{report['bytes']:,} bytes; test accuracy {report['accuracy']:.3f} on {report['test_sentences']} "
        f"sentences (trained on {report['train_sentences']})"
    )


@cli.command("learn-masks")
@click.option("-m", "--model", required=True, help="Zoo name (the masks are trained in PyTorch).")
@click.option(
    "-o", "--output", "plan_file", required=True, type=click.Path(path_type=Path), help="Mask plan (.npz)."
)
@click.option("--pattern", default="2:4", show_default=True, help="N:M: at most N non-zeros in every M.")
@click.option("--steps", default=300, show_default=True, help="Optimiser steps.")
@click.option("--sentences", default=4096, show_default=True, help="Calibration sentences (task data).")
@click.option("--seed", default=0, show_default=True)
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
    report = api.learn_mask_plan(model, plan_file, pattern, steps, sentences, seed=seed, step=_progress)
    if as_json:
        _emit_json(report)
        return
    loss = report["distillation_loss"]
    out.print(
        f"wrote {report['plan']}: {report['pattern']} masks for {report['weights']} weights, learned on "
        f"{report['data']} in {report['steps']} steps; distillation loss (1 - cosine to dense) "
        f"{loss['first']:.4f} -> {loss['last']:.4f}; {report['groups_changed_from_magnitude']:.1%} of the "
        "groups differ from the magnitude mask"
    )


@cli.command("train")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option(
    "--zero",
    type=click.IntRange(0, 3),
    default=0,
    show_default=True,
    help="0: DDP; 1: ZeroRedundancyOptimizer; 2/3: FSDP2 without/with resharding after forward.",
)
@click.option("--nproc-per-node", default=1, show_default=True, help="Processes on this node (one per GPU).")
@click.option("--nnodes", default=1, show_default=True, help="Nodes (torchrun --nnodes).")
@click.option("--node-rank", default=0, show_default=True, help="This node's rank (multi-node).")
@click.option("--rdzv-endpoint", help="HOST:PORT every node reaches (multi-node c10d rendezvous).")
@click.option("--rdzv-id", default="redux-edge", show_default=True, help="Job id shared by the nodes.")
@click.option("--max-restarts", default=0, show_default=True, help="Restart failed ranks (they resume).")
@click.option("--engine", type=click.Choice(["torch", "deepspeed"]), default="torch", show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override the recipe.")
@click.option("--plan", help="recover: the pruned model's plan (JSON, or the bundle's manifest.json).")
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
    as_json: bool,
) -> None:
    """Train a compression RECIPE (models/*/train-*.toml: shrp, maskllm, adapters, recover) with
    torch.distributed, and write what `compile` consumes. Running it again in the same --output resumes
    from the latest checkpoint.

    \b
    Examples:
      redux-edge train models/minilm-l6/train-shrp.toml -o build/shrp --nproc-per-node 2 --zero 1
      redux-edge train models/minilm-l6/train-recover.toml --plan build/edge/manifest.json -o build/recover
      redux-edge train models/minilm-l6/train-maskllm.toml -o build/masks --nnodes 2 --node-rank 0 \\
          --rdzv-endpoint node0:29400 --nproc-per-node 4 --zero 3
    """
    from redux_edge.train.launch import train

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
        _emit_json(report)
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


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("inputs_file", required=False, type=click.Path(path_type=Path))
@click.option("--output", "output_file", type=click.Path(path_type=Path), help="Save outputs as .npz.")
@click.option("--adapter", help="Task whose adapter pack to load (bundles compiled with --adapters).")
@click.option("--json", "as_json", is_flag=True, help="Print outputs as JSON.")
def run(
    bundle: Path, inputs_file: Path | None, output_file: Path | None, adapter: str | None, as_json: bool
) -> None:
    """Run BUNDLE on INPUTS_FILE (text lines, an image, .npy or .npz); without it, on the bundle's sample.

    \b
    Examples:
      redux-edge run build/minilm sentences.txt
      redux-edge run build/mnist digit.png --json
    """
    from redux_edge import api

    outputs, manifest = api.run(bundle, inputs_file, adapter)
    if output_file is not None:
        np.savez(output_file, **outputs)
    if as_json:
        _emit_json(outputs)
        return
    for name, value in outputs.items():
        out.print(f"[bold]{name}[/] shape={list(value.shape)} dtype={value.dtype}")
        if manifest["outputs"] and name == "logits":
            labels = _task_labels(manifest, adapter)
            for index, row in enumerate(value):
                label = f" {labels[int(row.argmax())]}" if labels else ""
                out.print(
                    f"  sample {index}: class {int(row.argmax())}{label} (logit {float(row.max()):.3f})"
                )
        else:
            for index, row in enumerate(value.reshape(value.shape[0], -1)):
                shown = ", ".join(f"{x:+.4f}" for x in row[:6])
                out.print(f"  sample {index}: [{shown}, ...] norm={float(np.linalg.norm(row)):.4f}")


def _task_labels(manifest: dict, adapter: str | None) -> list[str]:
    """The class names of the adapter pack in use, if the bundle has adapters."""
    adapters = manifest.get("adapters") or {}
    task = adapter or adapters.get("default")
    return next((pack["labels"] for pack in adapters.get("packs", []) if pack["task"] == task), [])


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--inputs", "inputs_file", type=click.Path(path_type=Path), help="Inputs (default: the sample)."
)
@click.option("--warmup", default=10, show_default=True)
@click.option("--iterations", default=100, show_default=True)
@click.option("--threads", type=int, help="intra-op threads (default: as recorded in the bundle).")
@click.option("--json", "as_json", is_flag=True)
def bench(
    bundle: Path, inputs_file: Path | None, warmup: int, iterations: int, threads: int | None, as_json: bool
) -> None:
    """Measure BUNDLE's latency on this machine: p50/p90/p99 and throughput.

    \b
    Example:
      redux-edge bench build/minilm --iterations 200 --threads 2 --json
    """
    from redux_edge import api

    with _progress(f"benchmarking {bundle} ({warmup} warm-up + {iterations} runs)"):
        stats = api.bench(bundle, inputs_file, warmup, iterations, threads)
    if as_json:
        _emit_json(stats)
        return
    table = Table(
        title=f"{bundle} ({stats['backend']}, threads={stats['threads'] or 'all cores'}, "
        f"shapes={stats['shapes']})"
    )
    for column in ("p50 ms", "p90 ms", "p99 ms", "mean ms", "std ms", "throughput /s"):
        table.add_column(column, justify="right")
    table.add_row(
        *(f"{stats[key]:.3f}" for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms")),
        f"{stats['throughput_per_s']:.1f}",
    )
    out.print(table)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def inspect(bundle: Path, as_json: bool) -> None:
    """Show BUNDLE's manifest summary and check every file's sha256. Exit code 1 when a file differs."""
    from redux_edge import api

    manifest, problems = api.inspect(bundle)
    if as_json:
        _emit_json({**manifest, "file_problems": problems})
    else:
        _print_report(bundle, manifest, problems)
    if problems:
        raise click.exceptions.Exit(1)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def targets(as_json: bool) -> None:
    """List deployment targets and, per backend, whether it can build and run here."""
    from redux_edge import api

    rows = api.target_status()
    if as_json:
        _emit_json(rows)
        return
    table = Table("target", "arch / cpu", "gpu", "backend", "builds here", "runs here")
    for row in rows:
        for index, backend in enumerate(row["backend_status"]):
            first = index == 0
            table.add_row(
                row["name"] if first else "",
                f"{row['arch']} / {row['cpu']}" if first else "",
                (
                    f"sm_{row['gpu_compute_capability'].replace('.', '')}"
                    if row["gpu_compute_capability"]
                    else "-"
                )
                if first
                else "",
                backend["backend"],
                "yes" if backend["builds_here"] else f"no: {backend['build_note']}",
                "yes" if backend["runs_here"] else f"no: {backend['run_note']}",
            )
    out.print(table)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def models(as_json: bool) -> None:
    """List the model zoo (real weights from installed packages, no downloads)."""
    from redux_edge import zoo

    cards = [zoo.load_card(name) for name in zoo.available_models()]
    rows = [
        {"name": c["name"], "description": c["description"], "package": c["package"], "task": c["task"]}
        for c in cards
    ]
    if as_json:
        _emit_json(rows)
        return
    table = Table("model", "task", "weights package", "description")
    for row in rows:
        table.add_row(row["name"], row["task"], row["package"], row["description"])
    out.print(table)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def passes(as_json: bool) -> None:
    """List the passes a recipe can name, with their parameters."""
    import dataclasses

    from redux_edge.passes import PASSES

    rows = [
        {
            "pass": name,
            "summary": cls.summary,
            "parameters": {
                f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
                for f in dataclasses.fields(cls)
            },
        }
        for name, cls in PASSES.items()
    ]
    if as_json:
        _emit_json(rows)
        return
    table = Table("pass", "parameters (defaults)", "what it does")
    for row in rows:
        table.add_row(
            row["pass"], ", ".join(f"{k}={v}" for k, v in row["parameters"].items()), row["summary"]
        )
    out.print(table)


@cli.group()
def leakage() -> None:
    """EM side-channel analysis of a mac-prune bundle's first layer (compiled with --emit-c).

    \b
    Examples:
      redux-edge leakage simulate --bundle build/protected --traces 1000 -o traces/protected.ets
      redux-edge leakage simulate --bundle build/protected --unprotected -o traces/plain.ets
      redux-edge leakage attack traces/plain.ets --bundle build/protected -o reports/plain
      redux-edge leakage attack capture.cwp -o reports/capture
      redux-edge leakage tvla traces/fixed.ets traces/random.ets -o reports/tvla
    """


@leakage.command("simulate")
@click.option("--bundle", required=True, type=click.Path(path_type=Path), help="Bundle with c/layer.npz.")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="ETS file.")
@click.option("--traces", "count", default=1000, show_default=True)
@click.option("--noise", default=1.0, show_default=True, help="Gaussian noise sigma per sample.")
@click.option(
    "--leak",
    type=click.Choice(["product", "accumulator"]),
    default="product",
    show_default=True,
    help="Hamming weight of the product or of the accumulator after each MAC.",
)
@click.option("--jitter", default=0, show_default=True, help="Up to this many idle samples before each MAC.")
@click.option(
    "--control-flow",
    default=0.0,
    show_default=True,
    help="Amplitude of the keep/skip branch leak (Double Strike); 0: a balanced branch.",
)
@click.option("--unprotected", is_flag=True, help="The same layer without MACPruning: every MAC runs.")
@click.option("--fixed", is_flag=True, help="One fixed input for every trace (a TVLA fixed set).")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def leakage_simulate(
    bundle: Path,
    output: Path,
    count: int,
    noise: float,
    leak: str,
    jitter: int,
    control_flow: float,
    unprotected: bool,
    fixed: bool,
    seed: int,
    as_json: bool,
) -> None:
    """Simulate EM traces of the kernel's MAC loop (a labelled simulation: no probe here)."""
    from redux_edge.leakage import campaign, simulate

    model = simulate.LeakageModel(leak, noise, jitter, control_flow)
    described = campaign.simulate_file(bundle, output, count, model, not unprotected, seed, fixed)
    if as_json:
        _emit_json(described)
        return
    out.print(
        f"wrote {described['file']}: {count} simulated traces x {described['samples']} samples, "
        f"{described['slots']} MACs per trace ({'MACPruning' if not unprotected else 'unprotected'}, "
        f"{leak} Hamming weight, noise {noise}, jitter {jitter}, control-flow leak {control_flow}); "
        f"MACs executed {described['keep_rate']:.1%}"
    )


@leakage.command("attack")
@click.argument("traces_file", type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Report folder."
)
@click.option("--inputs", type=click.Path(path_type=Path), help="Inputs .npy for plain .npy traces.")
@click.option("--bundle", type=click.Path(path_type=Path), help="Score against this bundle's true weights.")
@click.option(
    "--realign",
    type=float,
    metavar="THRESHOLD",
    help="Double Strike: parse each trace by its branch samples (above THRESHOLD = MAC ran) first.",
)
@click.option("--checkpoints", help="Trace counts to report ranks at, e.g. 100,1000,10000.")
@click.option("--limit", type=int, help="Use only the first N traces.")
@click.option("--json", "as_json", is_flag=True)
def leakage_attack(
    traces_file: Path,
    output: Path,
    inputs: Path | None,
    bundle: Path | None,
    realign: float | None,
    checkpoints: str | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """CPA/DEMA recovery of first-layer weights (Hamming weight of weight x input, equivalence classes)."""
    from redux_edge.leakage import campaign

    try:
        counts = [int(c) for c in checkpoints.split(",")] if checkpoints else None
    except ValueError as exc:
        raise UserError(f"cannot read --checkpoints {checkpoints}", "e.g. 100,1000,10000") from exc
    result = campaign.attack_file(traces_file, output, inputs, bundle, realign, counts, limit)
    if as_json:
        _emit_json({key: value for key, value in result.items() if key != "checkpoints"})
        return
    table = Table("traces", "best peak (median)", "weights recovered" if bundle else "scored")
    for entry in result["checkpoints"]:
        recovered = (
            f"{entry['recovered']} of {result['weights']}" if "recovered" in entry else "no truth given"
        )
        table.add_row(str(entry["traces"]), f"{np.median(entry['best_peak']):.3f}", recovered)
    out.print(table)
    out.print(f"  windows  {result['windows']}; report {', '.join(result['files'])}")


@leakage.command("tvla")
@click.argument("fixed", type=click.Path(path_type=Path))
@click.argument("random", type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Report folder."
)
@click.option("--json", "as_json", is_flag=True)
def leakage_tvla(fixed: Path, random: Path, output: Path, as_json: bool) -> None:
    """Fixed-vs-random Welch t-test per sample; |t| > 4.5 is flagged."""
    from redux_edge.leakage import campaign

    result = campaign.tvla_files(fixed, random, output)
    if as_json:
        _emit_json({key: value for key, value in result.items() if key != "t"})
        return
    verdict = "LEAKS" if result["leaks"] else "no sample over the threshold"
    out.print(
        f"TVLA {result['traces']['fixed']} fixed vs {result['traces']['random']} random traces: max |t| "
        f"{result['max_abs_t']:.1f} at sample {result['at_sample']}, {result['samples_over_threshold']} "
        f"samples over {result['threshold']}: {verdict}; report {', '.join(result['files'])}"
    )


def _structural_flags(
    prune_heads: float | None,
    prune_ffn: float | None,
    drop_layers: str | None,
    importance: str | None,
    plan: Path | None,
) -> list:
    """The passes that --prune-heads/--prune-ffn/--drop-layers stand for, and a cleanup after them."""
    from redux_edge.passes import build_pass

    if importance == "plan" and plan is None:
        raise UserError("--importance plan needs --plan FILE", "give the plan JSON")
    chosen = importance or ("plan" if plan else "magnitude")
    by_plan = {"importance": "plan", "plan": str(plan)} if chosen == "plan" else {"importance": chosen}
    passes = []
    for name, fraction in (("prune-heads", prune_heads), ("prune-ffn", prune_ffn)):
        if fraction is not None:
            passes.append(build_pass(name, {"fraction": fraction, **by_plan}))
    if drop_layers is not None:
        if chosen == "plan":
            parameters = by_plan
        elif drop_layers.isdigit():
            parameters = {"count": int(drop_layers), "importance": importance or "calibration"}
        else:
            try:
                parameters = {"layers": [int(i) for i in drop_layers.split(",")]}
            except ValueError as exc:
                raise UserError(f"cannot read --drop-layers {drop_layers}", "give N or I,J,...") from exc
        passes.append(build_pass("drop-layers", parameters))
    return [*passes, build_pass("cleanup", {})] if passes else []


def _sparsity_flags(pattern: str | None, masks: Path | None) -> list:
    from redux_edge.passes import build_pass

    if pattern is None and masks is None:
        return []
    parameters = {"pattern": pattern or "2:4"}
    if masks is not None:
        parameters |= {"mask": "learned", "plan": str(masks)}
    return [build_pass("sparsity", parameters)]


def _protection_flags(drop: float | None, keep_top: float | None, seed: int | None) -> list:
    from redux_edge.passes import build_pass

    if drop is None:
        if keep_top is not None or seed is not None:
            raise UserError("--mac-keep-top and --mac-seed go with --mac-prune P", "e.g. --mac-prune 0.5")
        return []
    parameters = {"drop": drop} | ({"keep_top": keep_top} if keep_top is not None else {})
    return [build_pass("mac-prune", parameters | ({"seed": seed} if seed is not None else {}))]


def _print_protection(report: dict) -> None:
    out.print(
        f"  protect  mac-prune on '{report['input']}': {report['critical_pixels']} of {report['pixels']} "
        f"pixels always kept ({report['importance']}), the others dropped with p={report['drop']} per "
        f"inference; expected keep rate {report['expected_keep_rate']:.2f}; seed "
        + (str(report["seed"]) if report["seed"] >= 0 else "none (fresh draws every run)")
    )
    quality = report["quality"]
    if quality.get("measured", True):
        accuracy = quality["accuracy"]
        out.print(
            f"  quality  {quality['task']}, {quality['test_images']} images: accuracy "
            f"{accuracy['original']:.4f} -> {accuracy['changed']:.4f} "
            f"({quality['points_lost']:.2f} points lost)"
        )
    else:
        out.print(f"  quality  not measured: {quality['why']}")
    if kernel := report.get("kernel"):
        checked = (
            f"built with gcc and integer-exact on {kernel['samples']} samples"
            if kernel["checked"]
            else f"not checked: {kernel['why']}"
        )
        out.print(f"  kernel   {', '.join(kernel['files'])}: int8 weights {kernel['weights']}, {checked}")


def _per_layer(counts: dict) -> str:
    return " ".join(f"{layer}:{count}" for layer, count in counts.items()) or "-"


def _print_compression(report: dict, backend: str) -> None:
    before = report["architecture"]["original"]
    if report["plan"]:
        out.print(
            f"  removed  from {before['layers']} layers with heads {_per_layer(before['heads_per_layer'])}: "
            + ", ".join(f"{key} {_count_units(units)}" for key, units in report["plan"].items())
            + (f"  (calibrated on {report['calibration']})" if report["calibration"] else "")
        )
    if sparsity := report.get("sparsity"):
        storage = sparsity["storage"]
        packed = (
            f"; stored packed: {_human_bytes(storage['sparse_weights_dense_bytes'])} -> "
            f"{_human_bytes(storage['sparse_weights_packed_bytes'])} ({storage['packed_to_dense']:.2f}x)"
            if storage.get("packed_to_dense")
            else ""
        )
        masks = sorted({entry["mask"] for entry in sparsity["layers"] if entry["sparsified"]})
        runs = (
            "sparse tensor cores on this target"
            if sparsity["target_has_sparse_tensor_cores"]
            else "this target has no sparse tensor cores: it runs dense"
        )
        out.print(
            f"  sparsity {sparsity['pattern']} in {sparsity['sparsified']} of {sparsity['weights']} weights "
            f"({', '.join(masks) or 'none'} masks){packed}; {runs}"
        )
    quality = report["quality"]
    if quality.get("measured", True):
        cosine, probe = quality["embedding_cosine"], quality["probe_accuracy"]
        out.print(
            f"  quality  {quality['task']}, {quality['train_sentences']} train / {quality['test_sentences']} "
            f"test: embedding cosine to dense {cosine['mean']:.3f} (min {cosine['min']:.3f}); linear-probe "
            f"accuracy {probe['dense']:.3f} dense -> {probe['compressed']:.3f} "
            f"({probe['retention']:.1%} kept, before fine-tuning; the dense probe unchanged: "
            f"{probe['dense_probe_on_compressed']:.3f})"
        )
    else:
        out.print(f"  quality  not measured: {quality['why']}")
    speed = report["speed"]
    if speed.get("measured", True):
        shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in speed["shapes"].items())
        out.print(
            f"  speed    {backend}, {shapes}, p50 of {speed['calls']} calls each, alternating blocks: dense "
            f"{speed['dense_p50_ms']:.1f} ms -> {speed['compressed_p50_ms']:.1f} ms ({speed['speedup']:.2f}x)"
        )
    else:
        out.print(f"  speed    not measured: {speed['why']}")


def _print_adapters(adapters: dict) -> None:
    how = "merged into the weights" if adapters["merged"] else "swap with run --adapter TASK"
    for pack in adapters["packs"]:
        checked = pack.get("verify", {}).get("logits", {}).get("max_abs")
        verified = f", verified swapped in (logits max abs {checked:.1e})" if checked is not None else ""
        default = " (default)" if pack["task"] == adapters["default"] and not adapters["merged"] else ""
        out.print(
            f"  adapter  {pack['task']}{default}: {pack['bits']}-bit rank {pack['rank']}, "
            f"{pack['bytes']:,} bytes, test accuracy {pack['accuracy']:.3f} ({pack['test_sentences']} "
            f"sentences){verified}; {how}"
        )


def _count_units(units: dict | list) -> str:
    if isinstance(units, list):
        return str(units)
    return str(sum(len(v) for v in units.values()))


_DEVICES_OPTION = click.option(
    "--devices",
    "registry_path",
    type=click.Path(path_type=Path),
    help="Device registry [$REDUX_EDGE_DEVICES or ~/.config/redux-edge/devices.toml].",
)


@cli.group()
def devices() -> None:
    """The device registry (devices.toml): devices, their targets and addresses, and groups (fleets).

    \b
    Examples:
      redux-edge devices add orin-1 --target jetson-orin-nano --address ssh://ubuntu@10.0.0.21 \\
          --key ~/.ssh/redux_ed25519 --root /opt/redux-edge --group lab
      redux-edge devices add bench-dir --target host --address local --root /tmp/fake-device
      redux-edge devices list
      redux-edge devices check orin-1 --bundle build/orin
    """


@devices.command("add")
@click.argument("name")
@click.option("--target", required=True, help="Target name (see redux-edge targets).")
@click.option("--address", required=True, help="ssh://user@host:port, or local (a directory here).")
@click.option("--root", required=True, help="Directory on the device that holds releases/ and current.")
@click.option("--key", help="Private key file (default: the ssh-agent's keys).")
@click.option("--known-hosts", help="known_hosts file that holds the device's host key [~/.ssh/known_hosts].")
@click.option("--python", default="python3", show_default=True, help="Python on the device.")
@click.option("--group", "groups", multiple=True, help="Add the device to this group (repeatable).")
@click.option("--replace", is_flag=True, help="Replace a device of the same name.")
@_DEVICES_OPTION
def devices_add(
    name: str,
    target: str,
    address: str,
    root: str,
    key: str | None,
    known_hosts: str | None,
    python: str,
    groups: tuple[str, ...],
    replace: bool,
    registry_path: Path | None,
) -> None:
    """Register device NAME (nothing is contacted; `devices check` does that)."""
    from redux_edge.deploy.devices import Device, load_registry

    registry = load_registry(registry_path)
    registry.add(Device(name, target, address, root, key, known_hosts, python), list(groups), replace)
    registry.save()
    out.print(f"registered {name} in {registry.path}")


@devices.command("remove")
@click.argument("name")
@_DEVICES_OPTION
def devices_remove(name: str, registry_path: Path | None) -> None:
    """Remove device NAME from the registry and its groups (the device itself is not touched)."""
    from redux_edge.deploy.devices import load_registry

    registry = load_registry(registry_path)
    registry.remove(name)
    registry.save()
    out.print(f"removed {name} from {registry.path}")


@devices.command("list")
@_DEVICES_OPTION
@click.option("--json", "as_json", is_flag=True)
def devices_list(registry_path: Path | None, as_json: bool) -> None:
    """List registered devices and groups."""
    import dataclasses

    from redux_edge.deploy.devices import load_registry

    registry = load_registry(registry_path)
    if as_json:
        _emit_json(
            {
                "devices": [dataclasses.asdict(device) for device in registry.devices.values()],
                "groups": registry.groups,
            }
        )
        return
    table = Table("device", "target", "address", "root", "groups", title=str(registry.path))
    for device in registry.devices.values():
        member_of = [group for group, members in registry.groups.items() if device.name in members]
        table.add_row(device.name, device.target, device.describe(), device.root, ", ".join(member_of))
    out.print(table)


@devices.command("check")
@click.argument("name")
@click.option("--bundle", type=click.Path(path_type=Path), help="Warn when the device does not suit it.")
@_DEVICES_OPTION
@click.option("--json", "as_json", is_flag=True)
def devices_check(name: str, bundle: Path | None, registry_path: Path | None, as_json: bool) -> None:
    """Connect to device NAME and report what it is: architecture, OS, Python, runtimes, JetPack, the
    release it serves; warn where it does not match its target (or --bundle)."""
    from redux_edge.deploy import inspect as device_inspect
    from redux_edge.deploy.devices import load_registry

    device = load_registry(registry_path).resolve(name, None)[0]
    with _progress(f"connecting to {device.name} ({device.describe()})"):
        report = device_inspect.check(device, bundle)
    if as_json:
        _emit_json(report)
        return
    facts = report["device"]
    for label, key in (("machine", "machine"), ("os", "os"), ("kernel", "kernel"), ("python", "python")):
        out.print(f"  {label:<9}{facts[key]}")
    runtimes = ", ".join(f"{k} {v}" for k, v in facts["runtimes"].items()) or "none"
    out.print(f"  runtimes {runtimes}")
    if facts["jetpack"] or facts["trtexec"]:
        out.print(f"  jetpack  {facts['jetpack'] or 'none'}; trtexec {facts['trtexec'] or 'none'}")
    out.print(f"  current  {facts['current'] or 'nothing flashed'} ({len(facts['releases'])} release(s))")
    for warning in report["warnings"]:
        err.print(f"[yellow]warning:[/] {warning}")


def _flash_table(results: list) -> Table:
    table = Table("device", "status", "release", "previous", "uploaded", "reused", "health", "s")
    verdicts = {None: "", True: "passed", False: "failed"}
    for result in results:
        table.add_row(
            result.device,
            "[green]ok[/]" if result.ok else "[red]failed[/]",
            result.release or "",
            result.previous or "",
            f"{len(result.uploaded)} ({_human_bytes(result.uploaded_bytes)})",
            str(len(result.reused)),
            verdicts[(result.health or {}).get("healthy")],
            f"{result.seconds:.1f}",
        )
    return table


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--device", help="Registered device name.")
@click.option("--group", help="Registered group: its devices are flashed concurrently.")
@click.option("--keep", default=3, show_default=True, help="Releases kept on each device.")
@click.option("--any-target", is_flag=True, help="Flash even when the device's target differs.")
@_DEVICES_OPTION
@click.option("--json", "as_json", is_flag=True)
def flash(
    bundle: Path,
    device: str | None,
    group: str | None,
    keep: int,
    any_target: bool,
    registry_path: Path | None,
    as_json: bool,
) -> None:
    """Flash BUNDLE to a device or a group over SSH: upload what the device lacks, verify every sha256
    there, switch `current` atomically, health-check, and roll back when anything fails.

    \b
    Examples:
      redux-edge flash build/orin --device orin-1
      redux-edge flash build/orin --group lab --keep 5 --json
    """
    import dataclasses

    from redux_edge.deploy.devices import load_registry
    from redux_edge.deploy.flash import flash as flash_devices

    targets = load_registry(registry_path).resolve(device, group)
    with err.status(f"flashing {bundle} to {len(targets)} device(s)") as status:
        results = flash_devices(
            bundle,
            targets,
            keep,
            any_target,
            progress=lambda name, message: status.update(f"{name}: {message}"),
        )
    if as_json:
        _emit_json([dataclasses.asdict(result) | {"ok": result.ok} for result in results])
    else:
        out.print(_flash_table(results))
    failed = [result for result in results if not result.ok]
    if len(failed) == 1 and len(results) == 1:
        raise UserError(failed[0].error)
    if failed:
        first = failed[0].error
        raise UserError(
            f"{len(failed)} of {len(results)} devices failed; {first}",
            "the table shows each device; failed devices serve their previous release",
        )


@cli.command()
@click.option("--device", required=True, help="Registered device name.")
@click.option("--to", "release", help="Release id to go back to (default: the one before the current).")
@_DEVICES_OPTION
@click.option("--json", "as_json", is_flag=True)
def rollback(device: str, release: str | None, registry_path: Path | None, as_json: bool) -> None:
    """Point the device's `current` back at an earlier release and health-check it."""
    from redux_edge.deploy.devices import load_registry
    from redux_edge.deploy.flash import rollback as roll_back

    target = load_registry(registry_path).resolve(device, None)[0]
    with _progress(f"rolling back {target.name}"):
        report = roll_back(target, release)
    if as_json:
        _emit_json(report)
    else:
        out.print(f"{report['device']}: {report['from']} -> {report['to']} (health check passed)")


class _DefaultCommandGroup(click.Group):
    """A group whose first argument, when it is not a subcommand, goes to the default subcommand:
    ``profile BUNDLE --device X`` and ``profile compare A B`` both read naturally."""

    default_command = "run"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


@cli.group(cls=_DefaultCommandGroup)
def profile() -> None:
    """On-device latency: run a flashed bundle there, keep the record, compare runs, plot them.

    \b
    Examples:
      redux-edge profile build/orin --device orin-1 --duration 30
      redux-edge profile list
      redux-edge profile compare 20261129-101500-orin-1 20261129-102200-orin-1
      redux-edge profile plot RUN_A RUN_B -o latency.png
    """


_STORE_OPTION = click.option(
    "--store",
    type=click.Path(path_type=Path),
    help="Profile store directory [$REDUX_EDGE_PROFILES or ~/.local/share/redux-edge/profiles].",
)


@profile.command("run")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--device", required=True, help="Registered device (the bundle must be flashed there).")
@click.option("--warmup", default=10, show_default=True)
@click.option("--iterations", default=100, show_default=True)
@click.option("--duration", type=float, help="Measure for this many seconds instead of --iterations.")
@click.option("--layer-runs", default=10, show_default=True, help="Runs of the per-layer profile (0: none).")
@click.option("--threads", type=int, help="intra-op threads (default: as recorded in the bundle).")
@click.option("--plot", "plot_file", type=click.Path(path_type=Path), help="Also write a latency PNG.")
@_DEVICES_OPTION
@_STORE_OPTION
@click.option("--json", "as_json", is_flag=True)
def profile_run(
    bundle: Path,
    device: str,
    warmup: int,
    iterations: int,
    duration: float | None,
    layer_runs: int,
    threads: int | None,
    plot_file: Path | None,
    registry_path: Path | None,
    store: Path | None,
    as_json: bool,
) -> None:
    """Profile BUNDLE on a device with its own runner; the record goes into the profile store."""
    from redux_edge.deploy.devices import load_registry
    from redux_edge.profile.device import profile_on_device
    from redux_edge.profile.plot import plot_latencies
    from redux_edge.profile.store import ProfileStore

    target = load_registry(registry_path).resolve(device, None)[0]
    runs = f"{duration:g} s" if duration else f"{iterations} runs"
    with _progress(f"profiling {bundle} on {target.name} ({warmup} warm-up + {runs})"):
        record = profile_on_device(bundle, target, warmup, iterations, duration, layer_runs, threads)
    record = ProfileStore(store).add(record)
    if plot_file:
        plot_latencies([record], plot_file)
    if as_json:
        _emit_json(record)
        return
    stats = record["stats"]
    table = Table(title=f"{record['run']}: {record['model']} on {record['device']} ({record['backend']})")
    for column in ("p50 ms", "p90 ms", "p99 ms", "mean ms", "std ms", "throughput /s", "peak RSS MB"):
        table.add_column(column, justify="right")
    table.add_row(
        *(f"{stats[key]:.3f}" for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms")),
        f"{stats['throughput_per_s']:.1f}",
        f"{stats['peak_rss_mb']:.0f}",
    )
    out.print(table)
    if record["layers"]:
        layers = record["layers"]
        out.print(f"  slowest layers ({layers['source']}, {layers['runs']} runs):")
        for layer in layers["layers"][:5]:
            out.print(f"    {layer['ms']:8.3f} ms  {layer['op']:<16} {layer['name']}")
    if record["tegrastats"]:
        power = record["tegrastats"]["power_mw"] or {}
        out.print(f"  power    {power.get('mean', 0):.0f} mW mean ({record['tegrastats']['power_rail']})")


@profile.command("list")
@_STORE_OPTION
@click.option("--json", "as_json", is_flag=True)
def profile_list(store: Path | None, as_json: bool) -> None:
    """List stored runs, oldest first."""
    from redux_edge.profile.store import ProfileStore

    records = ProfileStore(store).runs()
    if as_json:
        _emit_json([{k: v for k, v in record.items() if k != "latencies_ms"} for record in records])
        return
    table = Table("run", "device", "model", "backend", "bundle", "p50 ms", "throughput /s")
    for record in records:
        stats = record["stats"]
        table.add_row(
            record["run"],
            record["device"],
            record["model"],
            record["backend"],
            record["bundle"],
            f"{stats['p50_ms']:.3f}",
            f"{stats['throughput_per_s']:.1f}",
        )
    out.print(table)


@profile.command("compare")
@click.argument("run_a")
@click.argument("run_b")
@_STORE_OPTION
@click.option("--json", "as_json", is_flag=True)
def profile_compare(run_a: str, run_b: str, store: Path | None, as_json: bool) -> None:
    """Ratios RUN_B / RUN_A for latency, throughput and peak memory (ids or unique prefixes)."""
    from redux_edge.profile.store import ProfileStore, compare

    profiles = ProfileStore(store)
    a, b = profiles.get(run_a), profiles.get(run_b)
    rows = compare(a, b)
    if as_json:
        _emit_json({"a": a["run"], "b": b["run"], "metrics": rows})
        return
    table = Table("metric", "A", "B", "B / A", title=f"A = {a['run']}, B = {b['run']}")
    for row in rows:
        colour = "green" if row["better"] else "red"
        table.add_row(
            row["metric"], f"{row['a']:.4g}", f"{row['b']:.4g}", f"[{colour}]{row['ratio']:.3f}x[/]"
        )
    out.print(table)


@profile.command("plot")
@click.argument("runs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="PNG file.")
@_STORE_OPTION
def profile_plot(runs: tuple[str, ...], output: Path, store: Path | None) -> None:
    """Plot the latency distributions of RUNS into one PNG."""
    from redux_edge.profile.plot import plot_latencies
    from redux_edge.profile.store import ProfileStore

    profiles = ProfileStore(store)
    out.print(str(plot_latencies([profiles.get(run) for run in runs], output)))


def _human_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{count} B"
        count /= 1024
    raise AssertionError("unreachable")


def _print_report(path: Path, manifest: dict, problems: list[str]) -> None:
    model, target, backend = manifest["model"], manifest["target"], manifest["backend"]
    original, compiled = manifest["metrics"]["original"], manifest["metrics"]["compiled"]
    out.print(f"[bold]bundle[/] {path}  [dim](created {manifest['created']})[/]")
    out.print(f"  model    {model['name']} — {model.get('description') or model.get('onnx')}")
    out.print(
        f"  target   {target['name']} ({target['arch']}, cpu {target['cpu']})   backend {backend['name']} "
        f"{backend['version']}, threads {backend['session']['threads'] or 'all cores'}"
    )
    out.print(
        f"  recipe   {manifest['recipe']['name']}: "
        + " → ".join(f"{p['pass']}{'' if p['modified'] else ' (no change)'}" for p in manifest["passes"])
    )
    if backend.get("fusions"):
        out.print("  fusions  " + ", ".join(f"{name} x{count}" for name, count in backend["fusions"].items()))
    table = Table("metric", "original", "compiled", title=f"cost at {manifest['metrics']['at_shapes']}")
    table.add_row("parameters", f"{original['params']:,}", f"{compiled['params']:,}")
    table.add_row(
        "weight bytes", _human_bytes(original["weight_bytes"]), _human_bytes(compiled["weight_bytes"])
    )
    table.add_row("MACs", f"{original['macs']:,}", f"{compiled['macs']:,}")
    out.print(table)
    if "structure" in manifest["metrics"]:
        structure = manifest["metrics"]["structure"]
        out.print(
            f"  layers   {structure['layers']}   heads per layer {_per_layer(structure['heads_per_layer'])}"
        )
        out.print(f"  feed-forward width per layer {_per_layer(structure['ffn_width_per_layer'])}")
    if "compression" in manifest:
        _print_compression(manifest["compression"], backend["name"])
    if manifest.get("adapters"):
        _print_adapters(manifest["adapters"])
    if "protection" in manifest:
        _print_protection(manifest["protection"])
    verify = manifest["verify"]
    checks = Table(
        "checked",
        "output",
        "max abs diff",
        "min cosine",
        title=f"verification vs {verify['reference']} on {verify['samples']} samples",
    )
    labels = {
        "ir": "model.onnx",
        "artifact": backend["artifact"],
        "artifact_vs_onnxruntime": f"{backend['artifact']} vs ONNX Runtime on model.onnx",
    }
    for stage, label in labels.items():
        for name, numbers in verify.get(stage, {}).items():
            checks.add_row(label, name, f"{numbers['max_abs']:.3g}", f"{numbers['min_cosine']:.7f}")
    out.print(checks)
    if "artifact_run" in verify:
        out.print(f"  artifact {verify['artifact_run']}")
    files = manifest["files"]
    out.print(
        f"  files    {len(files)}, {_human_bytes(sum(f['bytes'] for f in files.values()))}, sha256 "
        + ("[green]all match[/]" if not problems else f"[red]{len(problems)} differ: {problems[0]}[/]")
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        # Without standalone mode click returns the code of click.exceptions.Exit instead of exiting.
        code = cli.main(args=argv, prog_name="redux-edge", standalone_mode=False)
    except UserError as exc:
        if debug:
            err.print_exception()
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()} (see redux-edge --help)", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as exc:
        if debug:
            err.print_exception()
        click.echo(
            f"internal error: {type(exc).__name__}: {exc} (rerun with --debug and report it)", err=True
        )
        return 1
    return code if isinstance(code, int) else 0


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
