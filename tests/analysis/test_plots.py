"""Figure helpers: Agg canvas, PNG output, plotted values, bad input."""

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from lorank.analysis import plots


def test_figure_grid_and_png(tmp_path):
    fig, axes = plots.figure(2, 3)
    assert len(axes) == 6
    assert isinstance(fig.canvas, FigureCanvasAgg)
    path = plots.save(fig, tmp_path / "sub" / "f.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 1000 < len(data) < 200_000


def test_band_draws_the_median_and_spectrum_sorts():
    fig, (ax1, ax2) = plots.figure(1, 2)
    values = np.array([[1.0, 2.0, 3.0], [3.0, 4.0, 9.0], [2.0, 0.0, 6.0]])
    plots.plot_band(ax1, np.arange(3), values, label="runs", logy=True)
    np.testing.assert_allclose(ax1.lines[0].get_ydata(), [2.0, 2.0, 6.0])
    assert ax1.get_yscale() == "log"
    plots.plot_spectrum(ax2, np.array([0.5, 3.0, -1.0, 2.0]), top=3)
    np.testing.assert_allclose(ax2.lines[0].get_ydata(), [3.0, 2.0, 0.5])


def test_bad_input(tmp_path):
    fig, (ax,) = plots.figure()
    with pytest.raises(ValueError, match="do not match"):
        plots.plot_band(ax, np.arange(4), np.ones((2, 3)))
    with pytest.raises(ValueError, match="PNG"):
        plots.save(fig, tmp_path / "f.pdf")
    with pytest.raises(ValueError, match="at least one panel"):
        plots.figure(0, 1)
