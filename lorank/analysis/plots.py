"""Matplotlib figure helpers on the Agg canvas.

Figures are built as `matplotlib.figure.Figure` objects drawn by the Agg canvas,
never through pyplot's global state, so they work headless and never switch the
backend of an interactive session.
"""

from __future__ import annotations

import pathlib

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def figure(nrows: int = 1, ncols: int = 1, *, panel_size: tuple[float, float] = (4.0, 3.2)):
    """A new Agg figure with a grid of axes.

    Args:
      nrows, ncols: grid of panels.
      panel_size: (width, height) of one panel in inches.

    Returns:
      (fig, axes) where axes is a flat list of nrows * ncols Axes.
    """
    if nrows < 1 or ncols < 1:
        raise ValueError(f"need at least one panel, got nrows={nrows}, ncols={ncols}")
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, list(axes.ravel())


def save(fig: Figure, path: str | pathlib.Path, *, dpi: int = 100) -> pathlib.Path:
    """Writes `fig` as PNG (parents created) and returns the path."""
    path = pathlib.Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"figures are saved as PNG; got path {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def plot_band(ax, t: np.ndarray, values: np.ndarray, *, label: str | None = None,
              color: str | None = None, logy: bool = False) -> None:
    """Median over runs as a line with the min-max range shaded.

    Args:
      ax: matplotlib Axes.
      t: [T] x values.
      values: [R, T] one row per run (seed / initial condition), or [T].
      label, color: line label and color.
      logy: log-scale the y axis.
    """
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    t = np.asarray(t)
    if values.shape[1] != t.shape[0]:
        raise ValueError(f"values {values.shape} do not match t {t.shape}")
    (line,) = ax.plot(t, np.median(values, axis=0), label=label, color=color, lw=1.6)
    if values.shape[0] > 1:
        ax.fill_between(t, values.min(axis=0), values.max(axis=0), color=line.get_color(),
                        alpha=0.2, lw=0)
    if logy:
        ax.set_yscale("log")


def plot_spectrum(ax, eigvals: np.ndarray, *, label: str | None = None, top: int | None = None,
                  color: str | None = None) -> None:
    """Eigenvalues sorted in decreasing order against their index (linear y axis).

    Args:
      ax: matplotlib Axes.
      eigvals: [n] eigenvalues.
      label, color: series label and color.
      top: show only the largest `top` eigenvalues.
    """
    vals = np.sort(np.asarray(eigvals, dtype=np.float64))[::-1]
    if top is not None:
        vals = vals[:top]
    ax.plot(np.arange(1, len(vals) + 1), vals, "o-", ms=3, lw=1, label=label, color=color)
    ax.axhline(0.0, color="0.6", lw=0.6)
    ax.set_xlabel("index")
    ax.set_ylabel("eigenvalue")
