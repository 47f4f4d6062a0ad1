"""Figure 7 (sharpness vs the edge of stability): tiny-mode smoke test and the edge."""

import numpy as np
import pytest

from paper_figures import sharpness_eos, style
from paper_figures.registry import Context


def test_edge_sharpness_is_the_method_edge_over_lr():
    lr = np.array([0.1, 0.01])
    np.testing.assert_allclose(sharpness_eos.edge_sharpness("hb", 0.9, lr), 2 * 1.9 / lr)
    np.testing.assert_allclose(sharpness_eos.edge_sharpness("nag", 0.9, lr), 2 * 1.9 / 2.8 / lr)
    assert sharpness_eos.edge_sharpness("gd", 0.0, 0.5) == pytest.approx(4.0)


def test_tiny_figure_is_written_with_expected_axes_and_lines(tmp_path):
    ctx = Context(mode="tiny", out=tmp_path / "fig", store=tmp_path / "store")
    data = sharpness_eos.FIGURE.data(ctx)
    assert [c["opt"] for c, _ in data] == ["hb", "nag"]
    fig = sharpness_eos.FIGURE.plot(data, ctx)
    # per panel: one line per layer (7), the network's sharpness, the edge
    assert [len(ax.lines) for ax in fig.axes] == [9, 9]
    edge = fig.axes[1].lines[-1].get_ydata()
    lr = data[1][1].lr.values
    np.testing.assert_allclose(edge, 2 * 1.9 / 2.8 / lr)  # NAG, beta 0.9
    paths = style.save(fig, ctx.out, "sharpness_eos")
    assert all(p.stat().st_size > 1000 for p in paths)
