"""Figure 6 (the link scored): tiny-mode smoke test."""

import numpy as np

from paper_figures import link_scores, style
from paper_figures.registry import Context


def test_tiny_figure_is_written_with_expected_axes_and_lines(tmp_path):
    ctx = Context(mode="tiny", out=tmp_path / "fig", store=tmp_path / "store")
    data = link_scores.FIGURE.data(ctx)
    ds = data["default"]
    assert ds.sizes["run"] == 2 and sorted(ds["opt"].values) == ["hb", "nag"]
    assert ds.sizes["layer"] == 7  # seed CNN: conv1..conv5, fc1, fc2
    assert np.isfinite(ds["meas_grad_corr"]).any() and np.isfinite(ds["pred_grad_corr"]).any()
    fig = link_scores.FIGURE.plot(data, ctx)
    # correlation panels: diagonal + two zero lines; norm panel: diagonal
    assert [len(ax.lines) for ax in fig.axes] == [3, 3, 1]
    # one scatter per method per panel, each with a point per (run of that method, probe, layer)
    assert [len(ax.collections) for ax in fig.axes] == [2, 2, 2]
    assert "Spearman" in fig.axes[1].texts[0].get_text()
    paths = style.save(fig, ctx.out, "link_scores")
    assert all(p.stat().st_size > 1000 for p in paths)
