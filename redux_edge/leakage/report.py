"""Attack and t-test reports: JSON beside PNG plots (matplotlib, headless), each file written to a
temporary name and renamed, so that an interrupted run never leaves a truncated report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from redux_edge.files import write_atomically

__all__ = ["disclosure", "write_attack_report", "write_tvla_report"]


def disclosure(checkpoints: list[dict]) -> list[int | None]:
    """Per weight, the fewest traces from which its true class stays first at every later checkpoint."""
    ranks = np.array([entry["rank"] for entry in checkpoints])  # [checkpoints, weights]
    traces = [entry["traces"] for entry in checkpoints]
    result: list[int | None] = []
    for column in ranks.T:
        stays = np.flatnonzero(np.cumprod((column == 1)[::-1])[::-1])
        result.append(traces[stays[0]] if len(stays) else None)
    return result


def write_attack_report(report: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "attack.json"]
    write_atomically(paths[0], lambda path: path.write_text(json.dumps(report, indent=1)))
    checkpoints = report["checkpoints"]
    if checkpoints and "rank" in checkpoints[0]:
        traces = [entry["traces"] for entry in checkpoints]
        ranks = np.array([entry["rank"] for entry in checkpoints])
        figure, (left, right) = pyplot.subplots(1, 2, figsize=(11, 4))
        left.plot(traces, ranks, color="tab:blue", alpha=0.15, linewidth=0.8)
        left.plot(traces, np.median(ranks, axis=1), color="black", label="median")
        left.set(xscale="log", yscale="log", xlabel="traces", ylabel="rank of the true weight class")
        left.legend()
        right.plot(traces, [entry["success_rate"] for entry in checkpoints], marker="o")
        right.set(xscale="log", xlabel="traces", ylabel="weights recovered (fraction)", ylim=(0, 1.02))
        figure.suptitle(report.get("title", "CPA on first-layer weights"))
        figure.tight_layout()
        paths.append(folder / "rank_vs_traces.png")
        write_atomically(paths[-1], lambda path: figure.savefig(path, dpi=110, format="png"))
        pyplot.close(figure)
    return paths


def write_tvla_report(report: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "tvla.json", folder / "t_vs_sample.png"]
    write_atomically(paths[0], lambda path: path.write_text(json.dumps(report, indent=1)))
    figure, axes = pyplot.subplots(figsize=(10, 3.5))
    axes.plot(report["t"], linewidth=0.8)
    axes.axhline(report["threshold"], color="red", linestyle="--", label=f"|t| = {report['threshold']}")
    axes.set(xlabel="sample", ylabel="|t| (Welch, fixed vs random)")
    axes.legend()
    figure.tight_layout()
    write_atomically(paths[1], lambda path: figure.savefig(path, dpi=110, format="png"))
    pyplot.close(figure)
    return paths
