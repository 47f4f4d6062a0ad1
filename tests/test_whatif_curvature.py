"""The curvature forecast of the what-if predictions: the conditional (stochastic-edge) cap on
constructed traces, the sharpening rate in flow time and its rescaling by the lr, the edge
cap (the predictor with the forecast off: tests/test_whatif.py)."""

import numpy as np
import pytest
import xarray as xr

from dynamics.quadratic import stability_edge
from experiments.whatif.curvature import (CurvatureForecast, at_stochastic_edge, below_edge, flow_time,
                                          forecast_factor, held_by_lr, sharpening_rate)
from experiments.whatif.predict import Change, nqm_predictor, plan

CFG = {"lr": 0.05, "momentum": 0.9, "opt": "hb", "schedule": "constant", "steps": 400}
EDGE = float(stability_edge("hb", 0.9))


def test_a_sharpening_in_flow_time_is_recovered_and_rescaled_by_the_lr():
    # λ = 2 e^{r τ}, τ = Σ α/(1−β), with log-noise sd 0.02; the lr decays ×0.1 at step 500
    # (per step τ advances 0.5, then 0.05). Probes every 100 steps up to 1000. The slope of a
    # least-squares line through 11 points has standard error 0.02 / sqrt(Σ(τ − τ̄)²): 5 se.
    r, steps = 0.01, np.arange(0, 1100, 100)
    lr = np.r_[np.full(500, 0.05), np.full(600, 0.005)]
    tau_all = flow_time(lr, 0.9)
    tau = tau_all[steps]
    assert tau[5] == pytest.approx(250.0) and tau[-1] == pytest.approx(275.0)
    lam = 2 * np.exp(r * tau) * np.exp(np.random.default_rng(0).normal(0, 0.02, steps.size))
    se = 0.02 / np.sqrt(((tau - tau.mean()) ** 2).sum())
    est = sharpening_rate(tau, lam, np.ones(steps.size, bool))
    assert est == pytest.approx(r, abs=5 * se)
    # the same probes against the step: the per-step slope mixes the two lrs (not r·0.5 nor r·0.05)
    per_step = np.polyfit(steps, np.log(lam), 1)[0]
    assert abs(per_step / 0.5 - r) > 10 * se and abs(per_step / 0.05 - r) > 10 * se
    # only probes that qualify count; a falling λ is not sharpening (clipped at 0); fewer than two: 0
    assert sharpening_rate(tau, lam, steps <= 500) == pytest.approx(r, abs=5 * 0.02 / np.sqrt(
        ((tau[:6] - tau[:6].mean()) ** 2).sum()))
    assert sharpening_rate(tau, lam[::-1], np.ones(steps.size, bool)) == 0.0
    assert sharpening_rate(tau, lam, steps == 0) == 0.0
    # continued after the change in the new flow time: ×0.1 on the lr, a tenth of the rise per step
    fc = CurvatureForecast(cap=False, sharpening=True)
    for f in (1.0, 0.1):
        k = fc.factor(3.0, r, 200, plan(CFG, 200, Change("x", lr_factor=f), 400))
        np.testing.assert_allclose(k[:200], 1.0)
        np.testing.assert_allclose(k[200:], np.exp(r * 0.05 * f / 0.1 * np.arange(200)), rtol=1e-12)
    with pytest.raises(ValueError, match="momentum=.* is outside the valid range"):
        flow_time([0.1], 1.0)


def test_forecast_factor_climbs_to_the_cap_and_holds():
    r = 2e-3
    caps = np.r_[np.full(200, 3.3), np.full(200, 33.0)]  # a decay at 200 lifts the cap
    lam_f = 3.0 * forecast_factor(3.0, r, 100, caps)
    assert lam_f[199] == pytest.approx(3.3) and lam_f[200] == pytest.approx(3.3 * np.exp(r))
    assert np.all(np.diff(lam_f[100:]) >= 0) and np.all(lam_f <= caps + 1e-12)
    with pytest.raises(ValueError, match="lam_at=nan is outside the valid range"):
        forecast_factor(np.nan, r, 100, caps)
    with pytest.raises(ValueError, match="last=-1 is outside the valid range"):
        CurvatureForecast(last=-1)
    with pytest.raises(ValueError, match="level='x' is unknown"):
        CurvatureForecast(level="x")


def test_the_stochastic_edge_decides_the_cap():
    lam_at = 0.3 * EDGE / 0.05  # λ_max at h/edge 0.3
    x2 = plan(CFG, 200, Change("x2", lr_factor=2.0), 400)
    gated = CurvatureForecast(level="stochastic")
    # at its stochastic edge (α b / edge ≈ 1 at the last probes): the run's level holds, lr ×2 halves λ_max
    assert at_stochastic_edge([0.97, 1.02, 0.99]) and not at_stochastic_edge([0.2, 0.3, np.nan])
    assert not at_stochastic_edge([np.nan, np.nan])  # no batch sharpness: not shown to be at the edge
    at = gated.factor(lam_at, 0.0, 200, x2, h_run=0.3, at_edge=True)
    np.testing.assert_allclose(at[200:] * lam_at * 0.1 / EDGE, 0.3)
    # far from it: only the method's edge caps, which lr ×2 (h/edge 0.6) does not reach
    np.testing.assert_array_equal(gated.factor(lam_at, 0.0, 200, x2, h_run=0.3, at_edge=False), 1.0)
    # ... unless the new lr passes the edge itself: held at (1 − margin) of it
    x5 = gated.factor(lam_at, 0.0, 200, plan(CFG, 200, Change("x5", lr_factor=5.0), 400), h_run=0.3)
    np.testing.assert_allclose(x5[200:] * lam_at * 0.25 / EDGE, 0.95)
    # the ungated run level (the earlier model) caps either way; below_edge per probe
    np.testing.assert_allclose(CurvatureForecast(level="run").factor(lam_at, 0.0, 200, x2, h_run=0.3)[200:], 0.5)
    np.testing.assert_array_equal(below_edge([0.2, 0.99, 0.99, np.nan], [np.nan, 0.5, 0.97, np.nan]),
                                  [True, True, False, False])


def _trace(h_batch, lam=20.0, lr=0.05, n_probes=5, every=100, lam_first=None):
    """A constructed trace: one layer whose block is the network's top mode, λ_max = ``lam`` at
    every probe (``lam_first`` at the first, if given), the batch sharpness b with
    α b/edge = ``h_batch`` (None: not recorded)."""
    steps = n_probes * every
    probes = np.arange(0, steps + 1, every)
    first = lam if lam_first is None else lam_first
    pv = lambda v: (("probe_step", "layer"), np.r_[v * first / lam, np.full(probes.size - 1, v)][:, None])  # noqa: E731
    ds = xr.Dataset({"lr": ("step", np.full(steps, lr)),
                     "sharpness": pv(lam), "hessian_trace": pv(lam * 20), "grad_noise": pv(1.0),
                     "grad_signal": pv(0.01), "n_params": ("layer", [100]),
                     "sharpness_global": ("probe_step", np.r_[first, np.full(probes.size - 1, lam)])},
                    coords={"step": np.arange(steps), "probe_step": probes, "layer": ["fc"]})
    if h_batch is not None:
        ds["batch_sharpness_global"] = ("probe_step", np.full(probes.size, h_batch * EDGE / lr))
    return ds


@pytest.mark.parametrize("h_batch, binds", [(1.0, True), (0.1, False), (None, False)])
def test_the_predictor_caps_at_the_run_level_only_at_the_stochastic_edge(h_batch, binds):
    # λ_max = 20 at lr 0.05: h/edge = 0.26. lr ×2: at the stochastic edge the run level holds
    # h/edge at 0.26 (λ_max halved); far from it (or unknown) λ_max stays (h/edge 0.53 < 0.95)
    trace, at = _trace(h_batch), 500
    plans = [plan(CFG, at, Change("x2", lr_factor=2.0), at + 200)]
    ds = nqm_predictor(trace, CFG, at, plans, [(400, 500), (500, 600), (600, 700)],
                       curvature=CurvatureForecast(level="stochastic"))
    kappa = ds.curvature_factor.isel(change=0).values
    np.testing.assert_allclose(kappa[1:], 0.5 if binds else 1.0, rtol=1e-12)
    assert kappa[0] == 1.0


@pytest.mark.parametrize("level, lam, lam_first, binds", [
    ("sharpened", 20.0, 0.2, True),  # λ_max rose ×100 from the first probe: the lr holds it
    ("sharpened", 20.0, 12.0, False),  # ×1.7 < 2: still at its initial curvature
    ("relaxed", 20.0, None, True),  # α λ/(1 − β) = 10 per step ≥ 1/W = 0.01
    ("relaxed", 0.01, None, False),  # 0.005 < 0.01: the top mode does not move within a window
])
def test_the_gated_run_level_caps_where_the_lr_can_hold_the_curvature(level, lam, lam_first, binds):
    # lr ×2 at 500: where the gate holds, the run's level h̄ is kept and λ_max halves; elsewhere
    # the method's edge caps only, which h/edge ≤ 0.53 does not reach (λ_max stays)
    trace, at = _trace(None, lam=lam, lam_first=lam_first), 500
    plans = [plan(CFG, at, Change("x2", lr_factor=2.0), at + 200)]
    ds = nqm_predictor(trace, CFG, at, plans, [(400, 500), (500, 600), (600, 700)],
                       curvature=CurvatureForecast(level=level))
    np.testing.assert_allclose(ds.curvature_factor.isel(change=0).values[1:], 0.5 if binds else 1.0, rtol=1e-12)
    assert held_by_lr(level, lam_first=lam_first if lam_first else lam, lam_now=lam, lr=0.05, momentum=0.9,
                      window=100) == binds
    with pytest.raises(ValueError, match=r"level='stochastik' is unknown; valid: stochastic, edge, run"):
        held_by_lr("stochastik")  # a typo used to read as "never held"
    assert held_by_lr("run") and not held_by_lr("edge") and not held_by_lr("sharpened", lam_first=np.nan, lam_now=1)


def test_the_sharpening_rate_is_clipped_at_zero_unless_asked_not_to():
    from experiments.whatif.curvature import sharpening_rate

    tau = np.array([0.0, 1.0, 2.0, 3.0])
    lam = 5.0 * np.exp(-0.7 * tau)
    keep = np.ones(4, bool)
    assert sharpening_rate(tau, lam, keep) == 0.0
    assert sharpening_rate(tau, lam, keep, clip=False) == pytest.approx(-0.7, rel=1e-12)
    assert sharpening_rate(tau, lam * np.exp(1.4 * tau), keep, last=2) == pytest.approx(0.7, rel=1e-12)
