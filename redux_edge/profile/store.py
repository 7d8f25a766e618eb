"""The local profile store: one JSON file per on-device run, and comparisons between runs.

A record holds the device, the bundle's release id, model, target and backend, start and end times, the
runner's statistics (p50/p90/p99/mean/std, throughput, peak RSS), every run's latency, per-layer times
and, on Jetson, the tegrastats summary. The store is a directory (``$REDUX_EDGE_PROFILES`` or
``~/.local/share/redux-edge/profiles``); records are written atomically and never rewritten.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

from redux_edge.errors import UserError
from redux_edge.files import write_atomically

__all__ = ["COMPARED", "ProfileStore", "compare", "default_store_path"]

# Metrics compared between runs, and whether a larger value is better.
COMPARED = {
    "p50_ms": False,
    "p90_ms": False,
    "p99_ms": False,
    "mean_ms": False,
    "std_ms": False,
    "throughput_per_s": True,
    "peak_rss_mb": False,
}


def default_store_path() -> Path:
    return Path(os.environ.get("REDUX_EDGE_PROFILES", "~/.local/share/redux-edge/profiles")).expanduser()


class ProfileStore:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_store_path()

    def add(self, record: dict) -> dict:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(record["started"]))
        record = {"run": f"{stamp}-{record['device']}-{secrets.token_hex(2)}", **record}
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path / f"{record['run']}.json", lambda p: p.write_text(json.dumps(record)))
        except OSError as exc:
            raise UserError(
                f"cannot write the profile store {self.path}: {exc.strerror or exc}",
                "free disk space or pass --store DIR",
            ) from exc
        return record

    def runs(self) -> list[dict]:
        if not self.path.is_dir():
            return []
        records = [json.loads(path.read_text()) for path in self.path.glob("*.json")]
        return sorted(records, key=lambda record: record["started"])

    def get(self, reference: str) -> dict:
        """A run by its id or a unique prefix of it."""
        exact = self.path / f"{Path(reference).name}.json"
        if exact.is_file():
            return json.loads(exact.read_text())
        matches = [record for record in self.runs() if record["run"].startswith(reference)]
        if len(matches) != 1:
            what = "no run" if not matches else f"{len(matches)} runs"
            raise UserError(f"{what} in {self.path} match '{reference}'", "see redux-edge profile list")
        return matches[0]


def compare(baseline: dict, candidate: dict) -> list[dict]:
    """Per metric: both values, candidate/baseline, and whether the candidate is better."""
    rows = []
    for metric, larger_is_better in COMPARED.items():
        a, b = baseline["stats"].get(metric), candidate["stats"].get(metric)
        if a is None or b is None:
            continue
        ratio = b / a if a else float("inf")
        rows.append(
            {
                "metric": metric,
                "a": a,
                "b": b,
                "ratio": ratio,
                "better": ratio > 1 if larger_is_better else ratio < 1,
            }
        )
    return rows
