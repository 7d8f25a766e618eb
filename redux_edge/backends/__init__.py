"""Backends lower the IR for a target into an artifact, and load and run that artifact."""

from __future__ import annotations

from redux_edge.backends.base import Backend, select_backend

__all__ = ["Backend", "select_backend"]
