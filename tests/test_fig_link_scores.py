"""Figure 6 (the link scored on families of runs): tiny-mode smoke test."""

import numpy as np

from paper_figures import link_scores, style
from paper_figures.registry import Context


def test_tiny_figure_is_written_with_expected_axes_and_lines(tmp_path):
    ctx = Context(mode="tiny", out=tmp_path / "fig", store=tmp_path / "store")
    data = link_scores.FIGURE.data(ctx)
    fams = data["families"]
    assert {role for role, _ in fams.values()} == {"development", "evaluation"}
    ds = fams["link_dev_seed_cnn"][1]
    assert ds.sizes["layer"] == 7  # seed CNN: conv1..conv5, fc1, fc2
    assert ds.attrs["prediction_used"] == "response"  # the probe recorded the response model's inputs
    for _, ds in fams.values():
        assert np.isfinite(ds["meas_grad_corr"]).any() and np.isfinite(ds["pred_grad_corr"]).any()
        assert np.isfinite(ds["base_persist_corr"]).any()
    fig = link_scores.FIGURE.plot(data, ctx)
    assert len(fig.axes) == 4
    # scatter panels: diagonal + two zero lines; the bar panel: the dev | eval divider
    assert [len(ax.lines) for ax in fig.axes] == [3, 3, 3, 1]
    assert [len(ax.collections) for ax in fig.axes[:3]] == [1, 1, 2]  # one scatter per family shown
    assert len(fig.axes[3].patches) == 4 * len(fams)  # link, theory alone, persistence, one mode per family
    ceiling = fig.axes[3].collections  # the noise ceiling: one tick per family
    assert len(ceiling) == 1 and len(ceiling[0].get_segments()) == len(fams)
    assert "persistence" in fig.axes[0].texts[0].get_text()
    paths = style.save(fig, ctx.out, "link_scores")
    assert all(p.stat().st_size > 1000 for p in paths)
