"""Training curves from a run's metrics.jsonl."""

from __future__ import annotations

import json
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: str) -> list[dict]:
    """The records of a JSON-lines metrics file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def metric_keys(records: list[dict], prefix: str) -> list[str]:
    """Sorted names of the metrics that start with `prefix`."""
    return sorted({k for r in records for k in r if k.startswith(prefix)})


def plot_metrics(metrics_path: str, out_png: str, *, keys: Sequence[str] = ("loss", "eval_loss"),
                 ylabel: str = "loss (nats/token)", title: str = "", logy: bool = False) -> None:
    """Each metric in `keys` against step (records that have it), written to `out_png`."""
    records = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key in keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            steps, values = zip(*points)
            style = "-" if len(points) > 20 else "o-"
            ax.plot(steps, values, style, label=key.replace("_", " "), markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
