"""Figure 5 (gradient oscillation per layer): tiny-mode smoke test, and the summary's
per-layer means and checks on constructed cosines with known answers."""

import numpy as np
import pytest
import xarray as xr

from experiments.runs import RunConfig
from paper_figures import oscillation, style
from paper_figures.registry import Context


def test_tiny_figure_is_written_with_expected_axes_and_lines(tmp_path):
    ctx = Context(mode="tiny", out=tmp_path / "fig", store=tmp_path / "store")
    data = oscillation.FIGURE.data(ctx)
    assert list(data) == ["seed-cnn", "mlp"]
    assert all(len(runs) == 2 and runs[0][0].lr > runs[1][0].lr for runs in data.values())
    fig = oscillation.FIGURE.plot(data, ctx)
    expected = []
    for n_layers in (7, 5):  # seed CNN, 5-layer MLP
        # two time panels: a line per layer + zero; summary: 2 lrs x (all, last quarter) + zero
        expected += [n_layers + 1, n_layers + 1, 5]
    assert [len(ax.lines) for ax in fig.axes] == expected
    paths = style.save(fig, ctx.out, "oscillation")
    assert all(p.stat().st_size > 1000 for p in paths)


def _run(lr, cos):
    config = RunConfig(model="mlp", data="mnist1d", opt="gd", lr=lr, steps=cos.shape[0])
    n = cos.shape[0]
    trace = xr.Dataset(
        {"grad_cos": (("step", "layer"), cos), "lr": ("step", np.full(n, lr)), "loss": ("step", np.ones(n)),
         "sharpness": (("probe_step", "layer"), np.array([[0.0, 0.0, 0.0], [10.0, 20.0, 30.0]]))},
        coords={"step": np.arange(n), "layer": ["fc1", "fc2", "fc3"], "probe_step": [0, n // 2]})
    return config, trace


def test_summary_means_and_checks_on_constructed_cosines():
    n = 100
    k = np.arange(n)[:, None]
    # large lr: every layer −0.5 after step 0 (NaN at step 0, as the tracer writes it)
    large = np.where(k == 0, np.nan, -0.5) * np.ones((1, 3))
    # small lr: input layer −0.6, middle −0.3, output 0 over the last quarter; +0.2 before
    small = np.where(k >= 75, np.array([-0.6, -0.3, 0.0]), 0.2) * np.ones((1, 3))
    table, meta = oscillation.summarize({"mlp": [_run(0.5, large), _run(0.05, small)]})
    big = table[table.lr_size == "large"]
    assert np.allclose(big.mean_grad_cos, -0.5) and np.allclose(big.frac_negative, 1.0)
    assert np.allclose(big.median_h, 0.5 * np.array([10.0, 20.0, 30.0]))
    low = table[table.lr_size == "small"]
    # steps 10..99: 65 steps at +0.2, 25 at the layer's value
    assert np.allclose(low.mean_grad_cos, (65 * 0.2 + 25 * np.array([-0.6, -0.3, 0.0])) / 90)
    assert np.allclose(low.mean_grad_cos_last_quarter, [-0.6, -0.3, 0.0])
    checks = meta["checks"]["mlp"]
    assert checks["large_lr_max_mean_cos"] == pytest.approx(-0.5)
    assert checks["small_lr_input_minus_output_last_quarter"] == pytest.approx(-0.6)
    assert checks["small_lr_spearman_depth_vs_cos_last_quarter"] == pytest.approx(1.0)
