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
    with pytest.raises(ValueError, match="rate='loss' is unknown; valid: lambda, trace"):
        bulk.predictor(rate="loss")
