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
