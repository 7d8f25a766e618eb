"""Analyses that choose and judge compression: unit importance, exact references, task quality."""
