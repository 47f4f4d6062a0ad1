"""whatif drift predictor (experiments/whatif/drift.py): the unchanged run's post-escape drift of
the norm, on constructed traces where the answer is known, and ρ / h/edge / regime the default's."""

import numpy as np
import pytest
import xarray as xr

from experiments import store
from experiments.whatif import delta, drift
from experiments.whatif.predict import changes_from, nqm_predictor, whatif
from tests.test_whatif import tiny_run  # noqa: F401 (a fixture)

W = 100


def constructed(log_norm, lam, layers=2, seed=0, noise=0.02, probe_every=W):
    """A trace before k = len(log_norm): per-step ‖g_l‖ = exp(log_norm(t)) × (1 + lognormal noise),
    the update ratio log10 = −3 + the same drift / ln 10, probes every ``probe_every`` steps with
    λ_max ``lam``."""
    rng = np.random.default_rng(seed)
    T = len(log_norm)
    g = np.exp(np.asarray(log_norm)[:, None] + noise * rng.standard_normal((T, layers)))
    ratio = -3 + np.asarray(log_norm)[:, None] / np.log(10) + noise * rng.standard_normal((T, layers))
    probes = np.arange(len(lam)) * probe_every
    return xr.Dataset({"grad_norm": (("step", "layer"), g), "update_ratio": (("step", "layer"), ratio),
                       "grad_cos": (("step", "layer"), rng.uniform(-0.5, 0.5, (T, layers))),
                       "lr": ("step", np.full(T, 0.01)),
                       "sharpness_global": ("probe_step", np.asarray(lam, float)),
                       "sharpness": (("probe_step", "layer"), np.tile(np.asarray(lam, float)[:, None], (1, layers)))},
                      coords={"step": np.arange(T), "layer": [f"l{i}" for i in range(layers)],
                              "probe_step": probes})


def plan_of(lr, T):
    return {"lr": np.full(T, lr), "momentum": np.full(T, 0.9), "method": np.array(["hb"] * T, object)}


def flat_model(trace, config, at, plans, windows):
    dims = ("change", "window", "layer")
    shape = (len(plans), len(windows), trace.sizes["layer"])
    return xr.Dataset({k: (dims, np.full(shape, 0.5)) for k in ("grad_corr", "grad_sq", "update_sq")},
                      coords={"change": np.arange(len(plans)), "window": np.arange(len(windows)),
                              "layer": trace["layer"].values})


def predict(trace, at, clock="steps", plans=None, **kw):
    windows = [(at - W, at), (at, at + W), (at + W, at + 2 * W)]
    plans = [plan_of(0.01, at + 2 * W)] if plans is None else plans
    config = {"opt": "hb", "momentum": 0.9, "lr": 0.01}
    return drift.drift_predictor(trace, config, at, plans, windows, clock=clock, inner=flat_model, **kw)


def test_a_known_drift_after_the_escape_is_recovered_in_both_clocks():
    # escape at the probe at 200 (λ 0.2 → 10); from there log|g| rises 0.004 per step; at k = 600
    # the fit uses [300, 600); the flat model moves nothing, so the prediction is window 0 × e^{s Δt}
    at, s = 600, 0.004
    t = np.arange(at)
    trace = constructed(np.where(t >= 200, s * (t - 200), 0.0), [0.2, 0.2, 10, 10, 10, 10, 10])
    out = predict(trace, at)
    np.testing.assert_allclose(out["drift_norm"], s, rtol=0.05)  # noise 2 %/step: SE of the slope ~1e-5
    w0 = np.sqrt((trace["grad_norm"].values[at - W:at] ** 2).mean(0))
    np.testing.assert_allclose(out["anchored_grad_norm"].isel(change=0).values,
                               w0 * np.exp(s * np.array([0, W, 2 * W]))[:, None], rtol=0.02)
    np.testing.assert_allclose(out["drift_ratio"], s / np.log(10), rtol=0.05)
    # flow clock: the same drift per unit of τ = 0.1 / step (lr 0.01, β 0.9); lr ×2 runs it twice as fast
    plans = [plan_of(0.01, at + 2 * W), {**plan_of(0.01, at + 2 * W), "lr": np.r_[np.full(at, 0.01),
                                                                                   np.full(2 * W, 0.02)]}]
    fl = predict(trace, at, "flow", plans)
    np.testing.assert_allclose(fl["drift_norm"], s / 0.1, rtol=0.05)
    g = fl["anchored_grad_norm"].isel(window=2).values
    dtau = delta.window_clock(plans[1], [(at + W, at + 2 * W)]) - delta.window_clock(plans[0], [(at + W, at + 2 * W)])
    np.testing.assert_allclose(np.log(g[1] / g[0]), np.full(2, s / 0.1 * dtau[0]), rtol=0.05)  # 14.95 units of τ
    st = predict(trace, at, "steps", plans)["anchored_grad_norm"].isel(window=2).values
    np.testing.assert_allclose(st[1], st[0])  # steps: the same pace whatever the change


def test_a_drift_before_the_escape_is_ignored():
    at = 600
    t = np.arange(at)
    rising = 0.004 * t  # drifts all along
    # escape at the probe at 500: one escaped window before k -> no drift
    late = predict(constructed(rising, [0.2, 0.2, 0.2, 0.2, 0.2, 10, 10]), at)
    np.testing.assert_array_equal(late["drift_norm"], 0.0)
    # escape at 400, flat after it: the rise over 0-400 is not continued
    flat_after = predict(constructed(np.where(t < 400, 0.004 * t, 1.6), [0.2, 0.2, 0.2, 0.2, 10, 10, 10]), at)
    np.testing.assert_array_equal(flat_after["drift_norm"], 0.0)
    # no plateau left at all (λ never doubles): no drift however steady the rise
    lazy = predict(constructed(rising, [0.2] * 7), at)
    np.testing.assert_array_equal(lazy["drift_norm"], 0.0)
    xr.testing.assert_identical(lazy["anchored_grad_norm"].isel(window=0), late["anchored_grad_norm"].isel(window=0))


def test_a_noisy_flat_trace_gives_no_drift_and_the_standard_error_is_calibrated():
    # 400 flat layers of 30 % per-step noise, escaped long before k: the slope's SE (sampling, batch
    # means; two windows, so no residual term) matches the spread of the fitted slopes, and only the
    # ~5 % a |t| >= 2 test lets through by chance are kept
    at, L = 600, 400
    trace = constructed(np.zeros(at), [0.2, 10, 10, 10, 10, 10, 10], layers=L, noise=0.3, seed=1)
    past = [(400, 500), (500, 600)]
    st = drift.window_stats(trace, past)
    kept, raw, se = drift.fit_drift(np.array([449.5, 549.5]), st["log_norm"], st["log_norm_se"])
    ratio = np.std(raw) / np.sqrt(np.mean(se**2))
    assert 0.85 < ratio < 1.2, ratio  # SE of a std over 400 layers ~4 %; batch-means SE with 10 batches ~ 8 %
    assert np.mean(kept != 0) < 0.1
    out = predict(trace, at, n_fit=2)
    assert np.mean(out["drift_norm"].values != 0) < 0.1
    # three windows: the residual term can only widen the SE
    st3 = drift.window_stats(trace, [(300, 400), *past])
    _, _, se3 = drift.fit_drift(np.array([349.5, 449.5, 549.5]), st3["log_norm"], st3["log_norm_se"])
    d = np.array([-100.0, 0.0, 100.0])
    se_sampling = np.sqrt((d**2) @ st3["log_norm_se"] ** 2) / (d @ d)
    assert np.all(se3 >= se_sampling * (1 - 1e-12)) and np.any(se3 > se_sampling * 1.01)
    with pytest.raises(ValueError, match="clock='wall' is unknown"):
        drift.predictor("wall")


def test_escaped_windows_counts_the_unbroken_run_ending_at_window_0():
    probes = np.arange(7) * W
    past = [(a, a + W) for a in range(0, 600, W)]
    assert drift.escaped_windows(probes, [0.2, 0.2, 10, 10, 10, 10, 10], past) == 4
    assert drift.escaped_windows(probes, [0.2, 0.2, 10, 0.3, 10, 10, 10], past) == 2  # a catapult back
    assert drift.escaped_windows(probes, [0.2, 10, 10, 10, 10, 10, 0.2], past) == 5  # the probe at k is no window's
    assert drift.escaped_windows(probes, [np.nan] * 7, past) == 0


def test_since_escape_windows_counts_from_the_escape_or_after_the_first_window():
    probes = np.arange(7) * W
    past = [(a, a + W) for a in range(0, 600, W)]
    assert drift.since_escape_windows(probes, [0.2, 0.2, 10, 10, 10, 10, 10], past, W) == 4  # as escaped_windows
    assert drift.since_escape_windows(probes, [0.2, 0.2, 10, 0.3, 10, 10, 10], past, W) == 4  # a fall does not end it
    assert drift.since_escape_windows(probes, [0.6, 2.0, 0.5, 0.3, 0.2, 0.2, 0.2], past, W) == 5  # a bump, then a fall
    assert drift.since_escape_windows(probes, [0.2] * 7, past, W) == 5  # never escaped: all but the first window
    assert drift.since_escape_windows(probes, [np.nan] * 7, past, W) == 0


def test_the_since_escape_gate_keeps_a_drift_the_escaped_gate_drops_and_none_on_a_rising_plateau():
    # a fitted network: λ has a bump at 100 and falls below λ_0, the norm falls 0.005 per step all along
    at, s = 400, -0.005
    t = np.arange(at)
    bump = constructed(s * t, [0.6, 2.0, 0.4, 0.3, 0.3])
    assert np.all(predict(bump, at)["drift_norm"].values == 0)  # the sixth round's gate: λ < 2 λ_0 at k
    out = predict(bump, at, gate="since_escape")  # windows 100-400
    np.testing.assert_allclose(out["drift_norm"], s, rtol=0.05)
    # the same norms on a plateau that is rising at k (the escape forecast's motion): no drift
    plateau = constructed(s * t, [0.2, 0.21, 0.23, 0.26, 0.3])
    assert np.all(predict(plateau, at, gate="since_escape")["drift_norm"].values == 0)
    with pytest.raises(ValueError, match="gate='x' is unknown"):
        predict(bump, at, gate="x")
    with pytest.raises(ValueError, match="fit='x' is unknown"):
        predict(bump, at, fit="x")


def test_the_batch_fit_recovers_a_drift_from_one_window_and_keeps_none_on_a_flat_one():
    # k = 2W: one window after the first; the window fit needs two, the batch fit (10 batch means) one
    at, s = 2 * W, -0.01
    t = np.arange(at)
    trace = constructed(s * t, [1.0, 1.5, 0.8])
    assert np.all(predict(trace, at, gate="since_escape")["drift_norm"].values == 0)
    out = predict(trace, at, gate="since_escape", fit="batches")
    np.testing.assert_allclose(out["drift_norm"], s, rtol=0.05)  # noise 2 %/step: SE of the slope ~3e-4
    # window 1 is window 0 × e^{ŝ W} (the flat model moves nothing; centre to centre)
    np.testing.assert_allclose(out["anchored_grad_norm"].isel(change=0, window=1),
                               out["anchored_grad_norm"].isel(change=0, window=0) * np.exp(out["drift_norm"] * W),
                               rtol=1e-12)
    # a flat, noisy window: about the 5 % a |t| >= 2 test lets through (the batch means are independent here)
    flat = constructed(np.zeros(at), [1.0, 1.5, 0.8], layers=400, noise=0.3, seed=2)
    kept = predict(flat, at, gate="since_escape", fit="batches")["drift_norm"].values
    assert np.mean(kept != 0) < 0.12  # 5 % ± 1 % (binomial, 400 layers); the t(8) tail at 2 is 8 %


def test_rho_h_edge_and_regime_are_the_defaults_and_the_norm_drifts(tiny_run):
    # the tiny run, with a drift put into its per-layer norms after a constructed escape (λ_max at
    # the first probe divided by 10): the NQM's ρ, h/edge and regime are the default's exactly
    trace = store.load_run(tiny_run)
    lam = trace["sharpness_global"].values.copy()
    lam[0] = lam[1:].min() / 10
    s = 0.1  # per step, well above the tiny run's own drift
    g = trace["grad_norm"] * np.exp(s * trace["step"])
    trace = trace.assign(sharpness_global=("probe_step", lam), grad_norm=g)
    changes = changes_from([0.5, 2.0], methods=["nag"])
    default = whatif(trace, 40, changes, window=10, predictor=nqm_predictor)  # the fixed curvature
    for clock in drift.CLOCKS:
        x = whatif(trace, 40, changes, window=10, predictor=drift.predictor(clock))
        for v in ("pred_grad_corr", "pred_h_edge", "pred_regime", "pred_h_edge_layer", "pred_regime_layer"):
            xr.testing.assert_identical(x[v], default[v])
        xr.testing.assert_identical(x.pred_grad_norm.isel(window=0), default.pred_grad_norm.isel(window=0))
        up = (x.pred_grad_norm / default.pred_grad_norm).isel(window=slice(1, None))
        if clock == "steps":  # the slope fitted on windows [10, 40), continued 10 and 20 steps past window 0
            st = drift.window_stats(trace, [(10, 20), (20, 30), (30, 40)])
            kept = drift.fit_drift(np.array([14.5, 24.5, 34.5]), st["log_norm"], st["log_norm_se"])[0]
            np.testing.assert_allclose(kept, s, rtol=0.3)
            order = [list(trace.layer.values).index(v) for v in up.layer.values]
            np.testing.assert_allclose(up.values, np.exp(kept[order][None, None, :] * 10 * np.array([1, 2])[
                None, :, None]) * np.ones(up.shape), rtol=1e-9)
        else:
            assert np.all(up.values > 1)


def test_cli_base_drift(tiny_run, capsys):  # noqa: F811 (the fixture)
    from experiments.cli import main

    args = ["whatif", str(tiny_run), "--at", "40", "--lr-factor", "2", "--window", "10", "--windows", "1"]
    assert main(args) == 0
    assert "lr×2: steps 40-49" in capsys.readouterr().out
    for base in ("drift-steps", "drift-flow"):
        assert main(args + ["--base", base]) == 0
        out = capsys.readouterr().out
        assert "lr×2: steps 40-49; network top mode h/edge" in out
    with pytest.raises(SystemExit):
        main(args + ["--base", "drift"])
    assert "invalid choice: 'drift'" in capsys.readouterr().err


def test_the_predictor_in_use_is_the_sixteenth_rounds_choice_and_its_top_the_seventh_rounds(tiny_run):  # noqa: F811
    from analyses.whatif_forecast_choice import candidates
    from analyses.whatif_scores import CANDIDATES, IN_USE
    from experiments.whatif import bulk
    from experiments.whatif.predict import BASES, PREDICTOR

    assert IN_USE == "bulk_mix_power_held" and IN_USE in candidates()

    trace = store.load_run(tiny_run)
    lam = trace["sharpness_global"].values.copy()
    lam[0] = lam[1:].min() / 10  # escaped: the drift acts
    trace = trace.assign(sharpness_global=("probe_step", lam))
    changes = changes_from([0.5, 2.0], methods=["nag"])
    a = whatif(trace, 40, changes, window=10)
    b = whatif(trace, 40, changes, window=10, predictor=candidates()[IN_USE])
    xr.testing.assert_identical(a, b)
    assert PREDICTOR.__name__ == "default_predictor"
    # the fifteenth round's predictor is --base bulk-trend-blend
    xr.testing.assert_identical(whatif(trace, 40, changes, window=10, predictor=CANDIDATES["bulk_trend_blend_small_loss"]),
                                whatif(trace, 40, changes, window=10, predictor=BASES["bulk-trend-blend"]))
    # the top (rho, h/edge) is the seventh round's predictor, which --base sharpen-decay also names
    top = whatif(trace, 40, changes, window=10, predictor=CANDIDATES["sharpen_decay_run"])
    xr.testing.assert_identical(top, whatif(trace, 40, changes, window=10, predictor=BASES["sharpen-decay"]))
    for v in ("pred_grad_corr", "pred_h_edge", "pred_regime"):
        xr.testing.assert_identical(a[v], top[v])
    assert BASES["sharpen-decay"] is bulk.TOP
    # outside the small-loss regime (the tiny run's loss is far above 0.2 nats) the fifteenth round's
    # predictor is the eleventh round's bulk_sharpening to the bit (--base bulk-sharpening), and the
    # fourteenth's; the sixteenth's mix moves only the norm and the update ratio
    fifteenth = whatif(trace, 40, changes, window=10, predictor=BASES["bulk-trend-blend"])
    xr.testing.assert_identical(fifteenth, whatif(trace, 40, changes, window=10, predictor=BASES["bulk-sharpening"]))
    xr.testing.assert_identical(fifteenth, whatif(trace, 40, changes, window=10, predictor=BASES["bulk-loss-level"]))
    moved = [v for v in a.data_vars if not a[v].identical(fifteenth[v])]
    assert sorted(moved) == ["pred_grad_norm", "pred_update_ratio"]


def test_cli_base_choices_are_the_named_predictors():
    """``optdyn whatif --base`` offers exactly :data:`experiments.whatif.predict.BASES`' names
    (the parser lists them without importing the what-if package)."""
    import argparse

    from experiments.cli import build_parser
    from experiments.whatif.predict import BASES

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    base = next(a for a in sub.choices["whatif"]._actions if a.dest == "base")
    assert tuple(base.choices) == tuple(BASES)


def test_base_since_escape_is_the_eighth_rounds_best(tiny_run):  # noqa: F811 (the fixture)
    from analyses.whatif_scores import CANDIDATES
    from experiments.whatif.predict import BASES

    trace = store.load_run(tiny_run)
    ch = changes_from(lr_factors=[0.5])
    a = whatif(trace, 40, ch, window=10, predictor=BASES["since-escape"])
    b = whatif(trace, 40, ch, window=10, predictor=CANDIDATES["since_escape_batches"])
    xr.testing.assert_identical(a, b)


def test_the_trend_baseline_recovers_a_drift_after_the_first_window_only_and_none_without_one():
    # log|g| jumps in the first window (the initialization's transient, left out), then falls
    # 0.002 per step; at k = 5W the fit uses the last three windows [200, 500)
    at, s = 5 * W, -0.002
    t = np.arange(at)
    trace = constructed(np.where(t < W, 3.0 - 0.03 * t, s * t), [1.0] * 5)
    s_norm, s_ratio = drift.trend_slopes(trace, at, W)
    np.testing.assert_allclose(s_norm, s, rtol=0.05)  # noise 2 %/step over 300 steps: SE ~2e-5
    np.testing.assert_allclose(s_ratio, s / np.log(10), rtol=0.05)  # the ratio's log10 drifts with it
    # the first window's fall of 0.03 per step would dominate a fit that took it in
    assert np.all(np.abs(drift.trend_slopes(trace, at, W, n_fit=5)[0] - s) < 0.1 * abs(s))
    assert np.all(drift.trend_slopes(trace, W, W)[0] == 0)  # k = W: only the first window, no trend
    flat = constructed(np.zeros(at), [1.0] * 5, layers=400, noise=0.3, seed=3)
    assert np.mean(drift.trend_slopes(flat, at, W)[0] != 0) < 0.12  # the |t| >= 2 test: ~5 % (as the drift's)


def test_the_trend_baseline_is_the_same_for_every_change_and_scored_beside_persistence(tiny_run):  # noqa: F811
    from experiments.whatif.check import format_scores, scores

    trace = store.load_run(tiny_run)
    s = 0.05  # a drift put into the per-layer norms, well above the tiny run's own
    trace = trace.assign(grad_norm=trace["grad_norm"] * np.exp(s * trace["step"]))
    ds = whatif(trace, 40, changes_from([0.5, 2.0], methods=["nag"]), window=10, predictor=nqm_predictor)
    xr.testing.assert_equal(ds.trend_grad_corr, ds.persist_grad_corr)
    xr.testing.assert_allclose(ds.trend_grad_norm.isel(window=0), ds.persist_grad_norm.isel(window=0), rtol=0, atol=0)
    for c in range(1, ds.sizes["change"]):  # no theory of the change: every change gets the same forecast
        np.testing.assert_array_equal(ds.trend_grad_norm.isel(change=c), ds.trend_grad_norm.isel(change=0))
    kept = drift.trend_slopes(trace.isel(step=slice(0, 40)), 40, 10)[0]
    np.testing.assert_allclose(kept, s, rtol=0.3)
    order = [list(trace.layer.values).index(v) for v in ds.layer.values]
    up = (ds.trend_grad_norm / ds.persist_grad_norm).isel(change=0).values  # window j: e^{ŝ j W}
    np.testing.assert_allclose(up, np.exp(kept[order][None, :] * 10 * np.arange(3)[:, None]), rtol=1e-12)
    # scored: the measurement follows the trend, so the trend baseline gets every moved sign and
    # persistence none; neither predicts an effect of the change
    ds["meas_grad_norm"] = ds.trend_grad_norm * (1 + 0.0 * ds.change)
    for v in ("grad_corr", "update_ratio"):
        ds[f"meas_{v}"] = ds[f"persist_{v}"]
    ds["meas_h_edge"] = ds.pred_h_edge
    ds["meas_regime"] = ds.pred_regime
    ds["meas_h_edge_layer"] = ds.pred_h_edge_layer
    ds["meas_regime_layer"] = ds.pred_regime_layer
    sc = scores(ds)
    assert sc["trend"]["norm_n_moved"] > 0 and sc["trend"]["norm_sign"] == 1.0
    assert sc["persistence"]["norm_sign"] == 0.0
    assert "trend" in format_scores(sc).splitlines()[0]
