"""Figure 8 (global vs per-layer clipping): tiny-mode smoke test, and the summary's
per-layer measures on constructed traces with known answers."""

import numpy as np
import pytest
import xarray as xr

from experiments.runs import RunConfig
from paper_figures import clipping, style
from paper_figures.registry import Context


def test_tiny_figure_is_written_with_expected_axes_and_lines(tmp_path):
    ctx = Context(mode="tiny", out=tmp_path / "fig", store=tmp_path / "store")
    data = clipping.FIGURE.data(ctx)
    assert set(data) == set(clipping.MODES)
    fig = clipping.FIGURE.plot(data, ctx)
    # loss, norm, clip factor: one line per mode; update ratio: + the DL4J −3 guide
    assert [len(ax.lines) for ax in fig.axes] == [3, 3, 3, 4]
    assert all(len(line.get_xdata()) == 7 for line in fig.axes[3].lines[:3])  # 7 layers
    paths = style.save(fig, ctx.out, "clipping")
    assert all(p.stat().st_size > 1000 for p in paths)


def _run(mode, factor, ratio):
    n = 100
    config = RunConfig(model="seed-cnn", data="mnist1d", opt="gd", clip=mode, steps=n)
    grad = np.tile([[1.0, 4.0]], (n, 1))
    trace = xr.Dataset(
        {"grad_norm": (("step", "layer"), grad), "clip_factor": (("step", "layer"), factor),
         "update_ratio": (("step", "layer"), ratio), "loss": ("step", np.linspace(2.0, 1.0, n))},
        coords={"step": np.arange(n), "layer": ["a", "b"]},
        attrs={"summary": {"final_loss": 1.0, "test_accuracy": 0.5}})
    return config, trace


def test_summary_on_constructed_traces():
    n = 100
    ones = np.ones((n, 2))
    ratio = np.tile([[-3.0, -2.0]], (n, 1))
    ratio[50] = -np.inf  # a zero update: excluded from the median, not −inf
    half = np.where(np.arange(n)[:, None] % 2 == 0, 0.5, 1.0) * np.array([[1.0, 1.0]])
    data = {"none": _run("none", ones, ratio), "global": _run("global", half, ratio),
            "layer": _run("layer", np.tile([[1.0, 0.25]], (n, 1)), ratio)}
    table, meta = clipping.summarize(data)
    row = lambda mode, layer: table[(table["clip"] == mode) & (table.layer == layer)].iloc[0]  # noqa: E731
    assert row("none", "b").frac_clipped == 0.0 and row("none", "b").median_applied_norm == 4.0
    assert row("global", "a").frac_clipped == pytest.approx(0.5)
    assert row("global", "a").mean_clip_factor == pytest.approx(0.75)
    assert row("layer", "b").median_applied_norm == pytest.approx(1.0)
    assert row("layer", "a").median_update_ratio == -3.0 and np.isfinite(table.median_update_ratio).all()
    assert meta["runs"]["global"]["mean_loss_last_10pct"] == pytest.approx(np.linspace(2, 1, n)[-10:].mean())
