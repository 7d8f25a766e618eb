"""``targets``, ``models`` and ``passes``: what this version can compile, from and with what."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.table import Table

from redux_edge.cli.common import emit_json, out
from redux_edge.passes import PASSES
from redux_edge.passes.contract import parameter_help

__all__ = ["models", "passes", "targets"]


@click.command()
@click.option("--json", "as_json", is_flag=True)
def targets(as_json: bool) -> None:
    """List deployment targets and, per backend, its precisions and whether it can build and run here."""
    from redux_edge import api

    rows = api.target_status()
    if as_json:
        emit_json(rows)
        return
    table = Table("target", "arch / cpu", "gpu", "backend", "precisions", "builds here", "runs here")
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
                " ".join(backend["precisions"]) or "-",
                "yes" if backend["builds_here"] else f"no: {backend['build_note']}",
                "yes" if backend["runs_here"] else f"no: {backend['run_note']}",
            )
    out.print(table)
    for row in rows:
        if row["members"]:
            out.print(f"family {row['name']}: one bundle for {', '.join(row['members'])}")


@click.command()
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
        emit_json(rows)
        return
    table = Table("model", "task", "weights package", "description")
    for row in rows:
        table.add_row(row["name"], row["task"], row["package"], row["description"])
    out.print(table)


@click.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--markdown", is_flag=True, help="One parameter table per pass, as docs/PASSES.md holds them.")
def passes(as_json: bool, markdown: bool) -> None:
    """List the passes a recipe can name, with their parameters and the flags that stand for them."""

    rows: list[dict[str, Any]] = [
        {
            "pass": name,
            "summary": cls.summary,
            "parameters": {row["name"]: row["default"] for row in parameter_help(cls)},
            "help": {row["name"]: f"{row['type']}: {row['help']}" for row in parameter_help(cls)},
            "flags": [flag.option for flag in cls.flags],
        }
        for name, cls in PASSES.items()
    ]
    if as_json:
        emit_json(rows)
        return
    if markdown:
        click.echo(passes_markdown(rows), nl=False)
        return
    table = Table("pass", "parameters (defaults)", "what it does")
    for row in rows:
        table.add_row(
            row["pass"], ", ".join(f"{k}={v}" for k, v in row["parameters"].items()), row["summary"]
        )
    out.print(table)


def passes_markdown(rows: list[dict[str, Any]]) -> str:
    """Per pass: a heading, its summary, its flags and a table of its parameters, from the same
    ``parameter(help=...)`` texts as ``--help``, so the documentation cannot drift from the code."""
    parts = []
    for row in rows:
        flags = f" Flags: {', '.join(f'`{flag}`' for flag in row['flags'])}." if row["flags"] else ""
        summary = row["summary"][:1].upper() + row["summary"][1:]
        lines = [f"### `{row['pass']}`", "", f"{summary}.{flags}", ""]
        if row["parameters"]:
            lines += ["| parameter | type | default | meaning |", "|---|---|---|---|"]
            for name, default in row["parameters"].items():
                kind, meaning = row["help"][name].split(": ", 1)
                shown = json.dumps(default) if not isinstance(default, str) else f'"{default}"'
                lines.append(f"| `{name}` | {kind} | `{shown}` | {meaning.replace('|', '/')} |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)
