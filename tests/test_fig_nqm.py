"""Smoke test of the ``nqm`` figure in tiny mode: it builds, saves, and has the panels and
curves it promises; the simulated markers sit near the predicted lines."""

import numpy as np
from matplotlib.lines import Line2D

from paper_figures import nqm, style
from paper_figures.registry import Context, figures


def test_nqm_figure_tiny(tmp_path):
    assert "nqm" in figures()
    ctx = Context(mode="tiny", out=tmp_path, store=tmp_path / "store")
    d = nqm.data(ctx)
    fig = nqm.plot(d, ctx)
    axes = fig.axes
    assert len(axes) == 9
    n_lines = [sum(isinstance(a, Line2D) for a in ax.get_children()) for ax in axes]
    # Rows 1-2, per momentum: line + markers + edge; row 1 adds the zero line.
    # Row 3: 2 noise models x (line + markers); 3 lines; 2 lines + markers + zero line.
    assert n_lines == [4, 7, 7, 3, 6, 6, 4, 3, 4]
    paths = style.save(fig, tmp_path, "nqm")
    assert all(p.stat().st_size > 1000 for p in paths)
    # Even in tiny mode (60 chains x 200 steps) the simulated correlation is within 0.1 of
    # the closed form: its standard error there is below ~0.03 (see test_stochastic).
    for (m, b), c in d["stationary"].items():
        pred = np.interp(c["h_sim"], c["h"], c["corr"])
        assert np.all(np.abs(c["corr_sim"] - pred) < 0.1), (m, b)
    lay = d["layer"]
    T = lay["step"].size
    # The fixed-spectrum norm falls at a decay; with rising sharpness and Σ ∝ H it grows.
    for key in ("additive", "curvature"):
        assert lay[key]["grad_sq"][T // 3:].max() <= lay[key]["grad_sq"][T // 3 - 1] * (1 + 1e-9)
    assert lay["rising"]["grad_sq"][-1] > 2 * lay["rising"]["grad_sq"][T // 3 - 1]
