"""Training curves from a run's metrics.jsonl."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: str) -> list[dict]:
    """The records of a JSON-lines metrics file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(metrics_path: str, out_png: str, *, title: str = "") -> None:
    """Train loss and eval loss against step, written to `out_png`."""
    records = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, style, label=key.replace("_", " "), markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
