"""whatif 'top held, bulk sharpening' (experiments/whatif/bulk.py): ρ, h/edge and the regime are
the inner predictor's, the norm and update ratio the flow-time sharpening model's (as the level,
or as its effect over the reference plan on the inner's reference level)."""

import functools

import numpy as np
import pytest
import xarray as xr

from experiments import store
from experiments.whatif import bulk
from experiments.whatif.predict import changes_from, nqm_predictor, whatif
from tests.test_whatif import tiny_run  # noqa: F401 (a fixture)

CHANGES = changes_from([0.5, 2.0], [0.1], [0.5], ["nag"])


def _sharpening_trace(tiny_run):  # noqa: F811
    """The tiny run with λ_max (all probes, and each layer's top with it) rising ×1.5 per probe:
    a progressive sharpening for the flow-time forecast to continue."""
    trace = store.load_run(tiny_run)
    lam = trace["sharpness_global"].values[0] * 1.5 ** np.arange(trace.sizes["probe_step"])
    grow = xr.DataArray(lam / trace["sharpness_global"].values, dims="probe_step")
    return trace.assign(sharpness_global=("probe_step", lam), sharpness=trace["sharpness"] * grow,
                        hessian_trace=trace["hessian_trace"] * grow)


def test_level_takes_rho_from_the_default_and_the_norm_from_the_sharpening_model(tiny_run):  # noqa: F811
    trace = _sharpening_trace(tiny_run)
    sharp = functools.partial(nqm_predictor, curvature=bulk.SHARPENING)
    x = whatif(trace, 40, CHANGES, window=10, predictor=bulk.predictor("level"))
    top = whatif(trace, 40, CHANGES, window=10, predictor=bulk.TOP)
    norms = whatif(trace, 40, CHANGES, window=10, predictor=sharp)
    for v in ("pred_grad_corr", "pred_h_edge", "pred_regime", "pred_h_edge_layer", "pred_regime_layer"):
        xr.testing.assert_allclose(x[v], top[v]) if x[v].dtype.kind == "f" else xr.testing.assert_equal(x[v], top[v])
    xr.testing.assert_allclose(x.pred_grad_norm, norms.pred_grad_norm, rtol=1e-12)
    xr.testing.assert_allclose(x.pred_update_ratio, norms.pred_update_ratio, rtol=1e-12)
    assert not np.allclose(norms.pred_grad_norm, top.pred_grad_norm)  # the test can tell the two apart
    # a slower flow (lr × 0.5, decay × 0.1) sharpens the bulk less: the norm ends below the unchanged run's
    lab = list(x.label.values)
    after = x.pred_grad_norm.isel(window=-1)
    for slower in ("lr×0.5", "decay×0.1"):
        assert np.all(after.isel(change=lab.index(slower)) < after.isel(change=lab.index("scheduled")))


def test_effect_puts_the_sharpening_effect_on_the_inner_reference_level(tiny_run):  # noqa: F811
    trace = _sharpening_trace(tiny_run)
    before = trace.isel(step=slice(0, 40)).sel(probe_step=trace.probe_step.values[trace.probe_step.values <= 40])
    config = trace.attrs["config"]
    from experiments.whatif.predict import plan, window_bounds

    windows = window_bounds(40, 10, 2)
    plans = [plan(config, 40, ch, windows[-1][1]) for ch in CHANGES]
    lvl = bulk.bulk_predictor(before, config, 40, plans, windows, combine="level")
    eff = bulk.bulk_predictor(before, config, 40, plans, windows, combine="effect")
    kappa = lvl.bulk_curvature_factor.values  # over the last probe's λ_max, at each window's first step
    assert np.all(kappa[:, 2] > kappa[:, 1])  # the bulk sharpens after k, under every plan
    # constant schedule: the scheduled plan is the reference, so it keeps the inner's level...
    top = bulk.TOP(before, config, 40, plans, windows)
    xr.testing.assert_allclose(eff.anchored_grad_norm.isel(change=0), top.anchored_grad_norm.isel(change=0),
                               rtol=1e-12)
    xr.testing.assert_allclose(eff.anchored_update_ratio.isel(change=0), top.anchored_update_ratio.isel(change=0),
                               rtol=1e-12)
    # ... and every change's ratio to it is the sharpening model's (the level variant's ratio)
    for c in range(1, len(plans)):
        np.testing.assert_allclose(eff.anchored_grad_norm.isel(change=c) / eff.anchored_grad_norm.isel(change=0),
                                   lvl.anchored_grad_norm.isel(change=c) / lvl.anchored_grad_norm.isel(change=0),
                                   rtol=1e-10)
    xr.testing.assert_allclose(eff.anchored_grad_corr, lvl.anchored_grad_corr)


def test_bulk_rejects_an_unknown_combine():
    with pytest.raises(ValueError, match="combine='sum' is unknown; valid: level, effect"):
        bulk.predictor("sum")


def test_the_bulk_rate_is_the_traces_current_flow_time_slope_and_may_be_negative(tiny_run):  # noqa: F811
    trace = store.load_run(tiny_run)
    momentum = trace.attrs["config"]["momentum"]
    from experiments.whatif.curvature import flow_time

    probes = trace["probe_step"].values
    tau = flow_time(trace["lr"].values, momentum)[probes]
    for r in (3.0, -2.0):  # the summed trace ∝ e^{r τ} at the last three probes; the earlier ones jump
        scale = np.where(probes >= probes[-3], np.exp(r * tau), 50.0)
        tr = trace["hessian_trace"] / trace["hessian_trace"].sum("layer") * xr.DataArray(scale, dims="probe_step")
        x = trace.assign(hessian_trace=tr)
        assert bulk.bulk_rate(x, int(probes[-1]), momentum) == pytest.approx(r, rel=1e-9)
        # at an earlier k only the probes up to it count: the jump from 50 makes another slope
        assert bulk.bulk_rate(x, int(probes[-2]), momentum) != pytest.approx(r, rel=1e-3)
    assert bulk.bulk_rate(trace, int(probes[0]), momentum) == 0.0  # one probe: no rate


def test_a_shrinking_bulk_shrinks_faster_under_a_faster_flow(tiny_run):  # noqa: F811
    # the summed trace falls e^{-3 τ} over the probes: the norms of the unchanged run fall after k,
    # lr × 2 (twice the flow) faster, lr × 0.5 slower; rho stays the top's
    trace = store.load_run(tiny_run)
    momentum = trace.attrs["config"]["momentum"]
    from experiments.whatif.curvature import flow_time

    tau = flow_time(trace["lr"].values, momentum)[trace["probe_step"].values]
    scale = xr.DataArray(np.exp(-3.0 * tau), dims="probe_step")
    trace = trace.assign(hessian_trace=trace["hessian_trace"] * scale)
    ch = changes_from([0.5, 2.0])
    x = whatif(trace, 40, ch, window=10, predictor=bulk.predictor("level", rate="trace"))
    top = whatif(trace, 40, ch, window=10, predictor=bulk.TOP)
    xr.testing.assert_allclose(x.pred_grad_corr, top.pred_grad_corr)
    grow = (x.pred_grad_norm.isel(window=2) / x.pred_grad_norm.isel(window=0)).mean("layer")
    lab = list(x.label.values)
    assert grow[lab.index("scheduled")] < 1
    assert grow[lab.index("lr×2")] < grow[lab.index("scheduled")] < grow[lab.index("lr×0.5")]


def test_bulk_rejects_an_unknown_rate():
    with pytest.raises(ValueError, match="rate='speed' is unknown; valid: " + ", ".join(bulk.RATES)):
        bulk.predictor(rate="speed")


def test_the_power_exponent_is_the_log_log_slope_after_the_first_probe_and_clipped():
    tau = np.array([0.0, 1.0, 2.0, 4.0, 8.0])
    lam = 3.0 * np.maximum(tau, 1e-3) ** 0.4
    lam[0] = 1e6  # the probe at τ = 0 has no log τ: not used
    assert bulk.power_exponent(tau, lam, np.ones(5, bool)) == pytest.approx(0.4, rel=1e-12)
    keep = np.array([True, True, True, False, False])  # only two probes qualify: still a slope
    assert bulk.power_exponent(tau, lam, keep) == pytest.approx(0.4, rel=1e-12)
    assert bulk.power_exponent(tau, 1.0 / lam, np.ones(5, bool)) == 0.0  # falling: clipped
    assert bulk.power_exponent(tau[:2], lam[:2], np.ones(2, bool)) == 0.0  # one probe after the first


def test_the_power_clock_grows_lambda_as_a_power_of_each_plans_own_flow_time():
    # constant lr 0.1, momentum 0.5: τ_t = 0.2 t; from k = 10, λ'_t/λ_k = (t/10)^b, uncapped
    b, T, at = 0.5, 40, 10
    plan = {"lr": np.full(T, 0.1), "momentum": np.full(T, 0.5), "method": ["hb"] * T}
    k = bulk.PowerForecast(cap=False).factor(2.0, b, at, plan)
    t = np.arange(T)
    np.testing.assert_allclose(k[at:], (t[at:] / at) ** b, rtol=1e-12)
    np.testing.assert_array_equal(k[:at], 1.0)
    # a decay × 0.1 at k: τ_t − τ_k ten times slower, so the growth is (1 + (t − k)/(10 k))^b
    slow = {**plan, "lr": np.where(t < at, 0.1, 0.01)}
    k_slow = bulk.PowerForecast(cap=False).factor(2.0, b, at, slow)
    np.testing.assert_allclose(k_slow[at:], (1 + (t[at:] - at) / (10 * at)) ** b, rtol=1e-12)
    # capped at the method's edge over the lr, as the flow-time forecast is: HB 0.5 at lr 0.1 has
    # edge/α = 30, so λ_k = 20 growing ×1.97 meets the cap (1 − m) 30
    from dynamics.quadratic import stability_edge

    capped = bulk.PowerForecast().factor(20.0, b, at, plan)
    cap = (1 - bulk.PowerForecast().margin) * float(stability_edge("hb", 0.5)) / 0.1
    np.testing.assert_allclose(capped, np.minimum(k, cap / 20.0), rtol=1e-12)
    assert capped.max() < k.max()


def test_released_takes_the_free_rate_on_a_plan_that_lowers_the_lr_and_the_power_elsewhere():
    from experiments.whatif.curvature import CurvatureForecast

    T, at = 40, 10
    t = np.arange(T)
    held = {"lr": np.full(T, 0.1), "momentum": np.full(T, 0.5), "method": ["hb"] * T}
    lowered = {**held, "lr": np.where(t < at, 0.1, 0.05)}
    raised = {**held, "lr": np.where(t < at, 0.1, 0.2)}
    f = bulk.PowerForecast(cap=False, released=True)
    rates = (0.5, 0.3)  # (b, the free rate r)
    flow = CurvatureForecast(cap=False, sharpening=True)
    power = bulk.PowerForecast(cap=False)
    np.testing.assert_array_equal(f.factor(2.0, rates, at, lowered), flow.factor(2.0, 0.3, at, lowered))
    for p in (held, raised):
        np.testing.assert_array_equal(f.factor(2.0, rates, at, p), power.factor(2.0, 0.5, at, p))
    tau = np.array([0.0, 1.0, 2.0, 4.0])
    lam = np.array([1.0, 2.0, 2.0 * 2 ** 0.5, 4.0])  # λ ∝ τ^0.5 after the first probe
    b, r = f.rate(tau, lam, np.ones(4, bool))
    assert b == pytest.approx(0.5) and r > 0


def test_the_power_rates_predict_less_growth_than_the_rate_since_the_first_probe(tiny_run):  # noqa: F811
    trace = _sharpening_trace(tiny_run)  # λ_max ×1.5 per probe since the first: exponential in τ
    grow = {}
    for rate in ("lambda", "power", "power_trace"):
        x = whatif(trace, 40, CHANGES, window=10, predictor=bulk.predictor("level", rate=rate))
        grow[rate] = float((x.pred_grad_norm.isel(window=-1) / x.pred_grad_norm.isel(window=0)).mean())
        top = whatif(trace, 40, CHANGES, window=10, predictor=bulk.TOP)
        xr.testing.assert_allclose(x.pred_grad_corr, top.pred_grad_corr)  # ρ stays the top's
    assert grow["power"] < grow["lambda"] and grow["power_trace"] < grow["lambda"]


def _with_loss(trace, loss):
    return trace.assign(loss=("step", np.asarray(loss, dtype=float)))


def test_the_loss_exponent_is_the_log_log_slope_of_the_windows_batch_means(tiny_run):  # noqa: F811
    from experiments.whatif.curvature import flow_time

    trace = store.load_run(tiny_run)
    momentum = trace.attrs["config"]["momentum"]
    tau = flow_time(trace["lr"].values, momentum)[: trace.sizes["step"]]
    # L ∝ τ^-1.5 exactly (constant lr: τ ∝ t)
    x = _with_loss(trace, 0.05 * (np.maximum(tau, tau[1]) / tau[40]) ** -1.5)
    b, loss_k = bulk.loss_exponent(x, 40, momentum, 20)
    # the batch means of a power are not a power of the mean τ: the slope is -1.5 to O((Δτ/τ)²)
    assert b == pytest.approx(-1.5, rel=2e-3)
    assert loss_k == pytest.approx(np.mean(x["loss"].values[20:40]))
    noisy = _with_loss(trace, 0.05 * np.exp(np.random.default_rng(0).normal(0, 0.5, trace.sizes["step"])))
    assert bulk.loss_exponent(noisy, 40, momentum, 20)[0] == 0.0  # no trend beyond the noise: not kept
    assert bulk.loss_exponent(x, 10, momentum, 20) == (0.0, pytest.approx(float("nan"), nan_ok=True))


def test_the_small_loss_regime_needs_cross_entropy_a_small_loss_and_a_fall(tiny_run):  # noqa: F811
    from experiments.whatif.curvature import flow_time

    trace = store.load_run(tiny_run)
    momentum = trace.attrs["config"]["momentum"]
    tau = flow_time(trace["lr"].values, momentum)[: trace.sizes["step"]]
    falling = _with_loss(trace, 0.05 * (np.maximum(tau, tau[1]) / tau[40]) ** -1.5)
    assert bulk.small_loss_exponent(falling, 40, momentum, 20, "mnist1d") == pytest.approx(-1.5, rel=2e-3)
    assert bulk.small_loss_exponent(falling, 40, momentum, 20, "linreg") is None  # a squared loss
    big = _with_loss(trace, 20 * falling["loss"].values)  # above 0.2 nats
    assert bulk.small_loss_exponent(big, 40, momentum, 20, "mnist1d") is None
    rising = _with_loss(trace, 0.05 * (np.maximum(tau, tau[1]) / tau[40]) ** 0.5)
    assert bulk.small_loss_exponent(rising, 40, momentum, 20, "mnist1d") is None


def test_the_loss_rates_are_the_default_outside_the_regime_and_follow_the_loss_inside(tiny_run):  # noqa: F811
    from experiments.whatif.curvature import flow_time

    trace = store.load_run(tiny_run)
    momentum = trace.attrs["config"]["momentum"]
    ch = changes_from([0.5, 2.0], [0.1])
    default = whatif(trace, 40, ch, window=10, predictor=bulk.predictor("level"))
    for rate in ("loss", "loss_level"):  # the tiny run's loss is far above 0.2 nats: the default to the bit
        assert float(trace["loss"].values[30:40].mean()) > bulk.SMALL_LOSS
        xr.testing.assert_identical(whatif(trace, 40, ch, window=10, predictor=bulk.predictor(rate=rate)), default)
    tau = flow_time(trace["lr"].values, momentum)[: trace.sizes["step"]]
    small = _with_loss(trace, 0.05 * (np.maximum(tau, tau[1]) / tau[40]) ** -1.5)
    loss = whatif(small, 40, ch, window=10, predictor=bulk.predictor(rate="loss"))
    level = whatif(small, 40, ch, window=10, predictor=bulk.predictor(rate="loss_level"))
    lam = whatif(small, 40, ch, window=10, predictor=bulk.predictor("level"))
    lab = list(loss.label.values)
    grow = lambda x, c: float((x.pred_grad_norm.isel(window=-1) / x.pred_grad_norm.isel(window=0))  # noqa: E731
                              .isel(change=lab.index(c)).mean())
    # the bulk follows the falling loss: the unchanged run's norm falls, faster under a faster flow
    assert grow(loss, "scheduled") < 1 and grow(loss, "lr×2") < grow(loss, "scheduled") < grow(loss, "lr×0.5")
    # loss_level: the loss model's unchanged run, each change's effect over it the λ rate's
    assert grow(level, "scheduled") == pytest.approx(grow(loss, "scheduled"), rel=1e-9)
    # per layer and window (constant lr: the scheduled plan is the reference)
    for c in ("lr×0.5", "lr×2", "decay×0.1"):
        eff = lambda x: x.pred_grad_norm.isel(change=lab.index(c)) / x.pred_grad_norm.isel(change=0)  # noqa: E731
        xr.testing.assert_allclose(eff(level), eff(lam), rtol=1e-9)
    xr.testing.assert_allclose(level.pred_grad_corr, lam.pred_grad_corr)  # ρ stays the top's


def _small_loss(trace):
    from experiments.whatif.curvature import flow_time

    tau = flow_time(trace["lr"].values, trace.attrs["config"]["momentum"])[: trace.sizes["step"]]
    return _with_loss(trace, 0.05 * (np.maximum(tau, tau[1]) / tau[40]) ** -1.5)


def _effect(x, c):
    lab = list(x.label.values)
    return x.pred_grad_norm.isel(change=lab.index(c)) / x.pred_grad_norm.isel(change=lab.index("scheduled"))


def test_the_trend_levels_put_the_default_effect_on_the_runs_own_trend(tiny_run):  # noqa: F811
    ch = changes_from([0.5, 2.0], [0.1])
    for trace in (store.load_run(tiny_run), _small_loss(store.load_run(tiny_run))):
        default = whatif(trace, 40, ch, window=10, predictor=bulk.predictor(rate="loss_level"))
        blend = whatif(trace, 40, ch, window=10, predictor=bulk.predictor(rate="loss_level", level="blend"))
        trend = whatif(trace, 40, ch, window=10, predictor=bulk.predictor(rate="loss_level", level="trend_small_loss"))
        half = whatif(trace, 40, ch, window=10, predictor=bulk.predictor(rate="loss_level", level="blend_small_loss"))
        ref = dict(change=list(default.label.values).index("scheduled"))  # constant lr: the reference plan
        assert not np.allclose(default.trend_grad_norm.isel(ref), default.pred_grad_norm.isel(ref))
        # blend: the geometric mean of the default's unchanged run and the trend baseline's (equal weights)
        xr.testing.assert_allclose(blend.pred_grad_norm.isel(ref),
                                   np.sqrt(default.pred_grad_norm.isel(ref) * default.trend_grad_norm.isel(ref)))
        xr.testing.assert_allclose(blend.pred_update_ratio.isel(ref),
                                   (default.pred_update_ratio.isel(ref) + default.trend_update_ratio.isel(ref)) / 2)
        small = float(trace["loss"].values[30:40].mean()) < bulk.SMALL_LOSS
        if small:  # in the small-loss regime the unchanged run is the trend's, or the blend's
            xr.testing.assert_allclose(trend.pred_grad_norm.isel(ref), default.trend_grad_norm.isel(ref))
            xr.testing.assert_allclose(half.pred_grad_norm, blend.pred_grad_norm)
        else:  # elsewhere the default to the bit
            xr.testing.assert_identical(trend, default)
            xr.testing.assert_identical(half, default)
        for c in ("lr×0.5", "lr×2", "decay×0.1"):  # each change's effect stays the default's
            xr.testing.assert_allclose(_effect(blend, c), _effect(default, c), rtol=1e-9)
            xr.testing.assert_allclose(_effect(trend, c), _effect(default, c), rtol=1e-9)
        xr.testing.assert_allclose(blend.pred_grad_corr, default.pred_grad_corr)  # ρ stays the top's


def test_bulk_rejects_an_unknown_level():
    with pytest.raises(ValueError, match="level='mean' is unknown; valid: model, trend_small_loss, blend_small_loss, blend"):
        bulk.predictor(level="mean")


def test_the_mix_is_the_geometric_mean_of_the_members_norms_with_the_level_set_on_it(tiny_run):  # noqa: F811
    ch = changes_from([0.5, 2.0], [0.1])
    for trace in (_sharpening_trace(tiny_run), _small_loss(_sharpening_trace(tiny_run))):
        one = {r: whatif(trace, 40, ch, window=10, predictor=bulk.predictor(rate=r)) for r in ("lambda", "power_trace")}
        held = whatif(trace, 40, ch, window=10, predictor=nqm_predictor)  # the fixed curvature
        two = whatif(trace, 40, ch, window=10, predictor=bulk.predictor(mix=("power_trace",)))
        three = whatif(trace, 40, ch, window=10, predictor=bulk.predictor(mix=("power_trace", "held")))
        assert not np.allclose(one["lambda"].pred_grad_norm, held.pred_grad_norm)  # the members differ
        xr.testing.assert_allclose(two.pred_grad_norm,
                                   np.sqrt(one["lambda"].pred_grad_norm * one["power_trace"].pred_grad_norm))
        xr.testing.assert_allclose(three.pred_grad_norm, (one["lambda"].pred_grad_norm * one["power_trace"].pred_grad_norm
                                                          * held.pred_grad_norm) ** (1 / 3))
        xr.testing.assert_allclose(three.pred_update_ratio, (one["lambda"].pred_update_ratio
                                                             + one["power_trace"].pred_update_ratio
                                                             + held.pred_update_ratio) / 3)
        xr.testing.assert_allclose(three.pred_grad_corr, one["lambda"].pred_grad_corr)  # ρ stays the top's
        # the reference level is set on the mix: in the small-loss regime the in-use level, each change's mixed effect
        in_use = dict(rate="loss_level", level="blend_small_loss")
        default = whatif(trace, 40, ch, window=10, predictor=bulk.predictor(**in_use))
        mixed = whatif(trace, 40, ch, window=10, predictor=bulk.predictor(**in_use, mix=("power_trace", "held")))
        if float(trace["loss"].values[30:40].mean()) < bulk.SMALL_LOSS:
            ref = dict(change=list(default.label.values).index("scheduled"))
            xr.testing.assert_allclose(mixed.pred_grad_norm.isel(ref), default.pred_grad_norm.isel(ref))
            for c in ("lr×0.5", "lr×2", "decay×0.1"):
                xr.testing.assert_allclose(_effect(mixed, c), _effect(three, c), rtol=1e-9)
        else:
            xr.testing.assert_allclose(mixed.pred_grad_norm, three.pred_grad_norm)
    assert_identical = xr.testing.assert_identical
    assert_identical(whatif(trace, 40, ch, window=10, predictor=bulk.predictor(mix=())), one["lambda"])


def test_bulk_rejects_an_unknown_mix():
    with pytest.raises(ValueError, match="mix=.*each entry must be one of lambda, trace, power, power_trace, "
                                         "power_released, held"):
        bulk.predictor(mix=("loss",))
    with pytest.raises(ValueError, match="mix='held'"):
        bulk.predictor(mix="held")
