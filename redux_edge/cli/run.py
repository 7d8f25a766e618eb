"""``run``, ``bench`` and ``inspect``: a bundle on this machine."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
from rich.table import Table

from redux_edge.cli.common import AT_LEAST_ONE, NON_NEGATIVE, THREADS, emit_json, out, progress
from redux_edge.cli.report import print_report
from redux_edge.errors import UserError
from redux_edge.files import save_arrays, write_atomically
from redux_edge.manifest import Manifest

__all__ = ["bench", "inspect", "run"]


@click.command()
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

    if output_file is not None and output_file.is_dir():
        raise UserError(
            f"--output {output_file} is a directory", f"give a file: {output_file / 'outputs.npz'}"
        )
    if output_file is not None and output_file.resolve().is_relative_to(bundle.resolve()):
        # A bundle holds only what its manifest lists; a file written into it would make it refused.
        raise UserError(
            f"--output {output_file} is inside the bundle {bundle}", "write the outputs outside the bundle"
        )
    outputs, manifest = api.run(bundle, inputs_file, adapter)
    if output_file is not None:
        write_atomically(output_file, lambda partial: save_arrays(partial, outputs))
    if as_json:
        emit_json(outputs)
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
            for index, row in enumerate(
                value.reshape(value.shape[0], -1) if value.ndim else value.reshape(1, 1)
            ):
                shown = ", ".join(f"{x:+.4f}" for x in row[:6])
                out.print(f"  sample {index}: [{shown}, ...] norm={float(np.linalg.norm(row)):.4f}")


def _task_labels(manifest: Manifest, adapter: str | None) -> list[str]:
    """The class names of the adapter pack in use, if the bundle has adapters."""
    adapters = manifest.get("adapters") or {}
    task = adapter or adapters.get("default")
    return next((pack["labels"] for pack in adapters.get("packs", []) if pack["task"] == task), [])


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--inputs", "inputs_file", type=click.Path(path_type=Path), help="Inputs (default: the sample)."
)
@click.option("--warmup", type=NON_NEGATIVE, default=10, show_default=True)
@click.option("--iterations", type=AT_LEAST_ONE, default=100, show_default=True)
@click.option("--threads", type=THREADS, help="intra-op threads (default: as recorded in the bundle).")
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

    with progress(f"benchmarking {bundle} ({warmup} warm-up + {iterations} runs)"):
        stats = api.bench(bundle, inputs_file, warmup, iterations, threads)
    if as_json:
        emit_json(stats)
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


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def inspect(bundle: Path, as_json: bool) -> None:
    """Show BUNDLE's manifest summary and check every file's sha256. A file that differs, is missing or is
    not listed is a damaged bundle: the report, then exit code 2."""
    from redux_edge import api

    manifest, problems = api.inspect(bundle)
    if as_json:
        emit_json({**manifest, "file_problems": problems})
    else:
        try:
            print_report(bundle, manifest, problems)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            # The schema pins what a bundle needs to run; the report also reads the optional sections.
            raise UserError(
                f"{bundle}/manifest.json has a section of the wrong shape for the report "
                f"({type(exc).__name__}: {exc})",
                "recompile the bundle, or read it with inspect --json",
            ) from exc
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"bundle {bundle} is damaged: {problems[0]}{more}", "recompile or re-copy the bundle")
