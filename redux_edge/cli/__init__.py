"""The command line, one module per command group; ``main`` and ``entry_point`` in ``cli/main.py``."""

from __future__ import annotations

from redux_edge.cli.main import cli, entry_point, main

__all__ = ["cli", "entry_point", "main"]
