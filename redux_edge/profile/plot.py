"""Latency distributions of stored runs as one PNG (matplotlib, headless): a violin per run with its
p50/p99 marked, and the runs' latency over time, which shows warm-up tails and thermal throttling."""

from __future__ import annotations

from pathlib import Path

from redux_edge.files import write_atomically

__all__ = ["plot_latencies"]


def plot_latencies(records: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    labels = [f"{record['run']}\n{record['device']} · {record['model']}" for record in records]
    latencies = [record["latencies_ms"] for record in records]
    figure, (violins, series) = pyplot.subplots(1, 2, figsize=(12, 4.5))
    violins.violinplot(latencies, showmedians=True, quantiles=[[0.99]] * len(latencies))
    violins.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
    violins.set(ylabel="latency per run (ms)", title="distribution (median, p99)")
    for label, values in zip(labels, latencies, strict=True):
        series.plot(values, linewidth=0.7, label=label.replace("\n", " "))
    series.set(xlabel="run", ylabel="ms", title="in order of execution")
    series.legend(fontsize=7)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, lambda path: figure.savefig(path, dpi=110, format="png"))
    pyplot.close(figure)
    return out
