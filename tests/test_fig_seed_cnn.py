"""Figure 4 (seed CNN norm growth + line search): tiny-mode smoke test, and the summary's
measures checked on a constructed trace whose answers are known in closed form."""

import numpy as np
import pytest
import xarray as xr

from experiments.runs import RunConfig
from paper_figures import seed_cnn, style
from paper_figures.registry import Context


def test_tiny_figure_is_written_with_expected_axes_and_lines(tmp_path):
    ctx = Context(mode="tiny", out=tmp_path / "fig", store=tmp_path / "store")
    data = seed_cnn.FIGURE.data(ctx)
    assert set(data) == {False, True}
    n_layers = data[False][1].sizes["layer"]
    assert n_layers == 7  # 5 conv + 2 FC
    fig = seed_cnn.FIGURE.plot(data, ctx)
    # norm panels: one line per layer; variation: (trend, fluctuation) x with/without; sharpness: per layer;
    # h_l: per layer + the edge; loss: with/without
    assert [len(ax.lines) for ax in fig.axes] == [n_layers, n_layers, 4, n_layers, n_layers + 1, 2]
    assert fig.axes[0].get_yscale() == "log"
    paths = style.save(fig, ctx.out, "seed_cnn")
    assert all(p.stat().st_size > 1000 for p in paths)


def _fake_run(grad, lr, sharpness, probes, line_search):
    config = RunConfig(model="seed-cnn", data="mnist1d", opt="hb", momentum=0.9, steps=grad.shape[0],
                       schedule="step", step_every=grad.shape[0] // 2, line_search=line_search)
    trace = xr.Dataset(
        {"grad_norm": (("step", "layer"), grad), "lr": ("step", lr), "loss": ("step", np.ones(len(lr))),
         "sharpness": (("probe_step", "layer"), sharpness)},
        coords={"step": np.arange(grad.shape[0]), "layer": ["in", "out"], "probe_step": probes})
    return config, trace


def test_summary_measures_match_closed_forms():
    n = 200
    k = np.arange(n)
    # layer "in": norm 1 until step 100, then 4 (growth 4, rise within phase 1 = 1);
    # layer "out": alternates 10^±0.5 from step 0 (sd of log10 = 0.5, growth 1)
    grad = np.stack([np.where(k < 100, 1.0, 4.0), 10.0 ** (0.5 * (-1.0) ** k)], axis=1)
    lr = np.where(k < 100, 0.1, 0.01)
    probes = np.array([0, 50, 150])
    sharp = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    runs = {False: _fake_run(grad, lr, sharp, probes, False), True: _fake_run(grad, lr, sharp, probes, True)}
    table, meta = seed_cnn.summarize(runs)
    row = table[(table.layer == "in") & ~table.line_search].iloc[0]
    assert row.growth_late_over_early == pytest.approx(4.0)
    assert row.phase0_rise == pytest.approx(1.0) and row.phase1_rise == pytest.approx(1.0)
    # a step function is its own rolling median: trend = the whole jump, no fluctuation
    assert row.trend_range_decades == pytest.approx(np.log10(4.0)) and row.fluct_sd_log10 == pytest.approx(0.0)
    # first probe past 10 % of steps is step 50 (lr 0.1, λ 3); last is step 150 (lr 0.01, λ 5)
    assert row.sharpness_first == 3.0 and row.sharpness_last == 5.0
    assert row.h_over_edge_first == pytest.approx(0.1 * 3.0 / 3.8)
    assert row.h_over_edge_last == pytest.approx(0.01 * 5.0 / 3.8)
    out = table[(table.layer == "out") & table.line_search].iloc[0]
    assert out.sd_log10_grad_norm == pytest.approx(0.5)
    assert out.growth_late_over_early == pytest.approx(1.0)
    assert set(meta["runs"]) == set(seed_cnn.LABELS.values())
