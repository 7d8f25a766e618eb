"""The runner shipped in every bundle (``runner/run.py``); it needs numpy and the backend's runtime only."""
