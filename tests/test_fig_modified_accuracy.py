"""Smoke test of the ``modified_accuracy`` figure in tiny mode: it builds, saves, has the
panels and curves it promises, and its fitted orders are the theoretical ones."""

import numpy as np
from matplotlib.lines import Line2D

from dynamics.modified import order
from paper_figures import modified_accuracy as fig_module
from paper_figures import style
from paper_figures.registry import Context, figures


def test_modified_accuracy_figure_tiny(tmp_path):
    assert "modified_accuracy" in figures()
    ctx = Context(mode="tiny", out=tmp_path, store=tmp_path / "store")
    d = fig_module.data(ctx)
    fig = fig_module.plot(d, ctx)
    assert len(fig.axes) == 6
    n_lines = [sum(isinstance(c, Line2D) for c in ax.get_children()) for ax in fig.axes]
    # Order panels: five curves; breakdown panels: three curves and the h = h_c line.
    assert n_lines == [5, 5, 4, 5, 5, 4]
    paths = style.save(fig, tmp_path, "modified_accuracy")
    assert all(p.stat().st_size > 1000 for p in paths)
    # Tiny mode uses h up to 0.3 h_c (h/(1-β)^2 <= 0.08) over a factor 3: the next-order
    # term bends the fit by up to ~0.15; 0.25 still separates order 1 from order 2.
    for (problem, method), res in d["orders"].items():
        for kind, start in fig_module.CURVES:
            slope = np.polyfit(np.log(res["lrs"]), np.log(res[kind, start]), 1)[0]
            assert abs(slope - order(kind, start, method)) < 0.25, (problem, method, kind, start, slope)
    # Breakdown: far below h_c the modified loss beats the first-order flow 100-fold; past h_c
    # both first-order flows are off by more than 5% of |x0| (they cannot ripple).
    for m, res in d["breakdown"].items():
        err = res["errors"]
        assert err["modified_loss"][0] < 0.01 * err["first_order"][0]
        past = res["ratio"] > 1.0
        assert np.all(err["first_order"][past] > 0.05) and np.all(err["modified_loss"][past] > 0.05)
