"""The plateau-escape forecast of the what-if predictions (experiments/whatif/escape.py) on
constructed traces: an escape due within the horizon is forecast (exponential excess in flow
time, up to the method's edge), one that is not due is not, and without a rise (or after the
run has escaped) the prediction is the fixed-curvature model's exactly."""

import numpy as np
import pytest
import xarray as xr

from dynamics.quadratic import stability_edge
from experiments.linking.predict import EDGE_MARGIN
from experiments.whatif.curvature import flow_time
from experiments.whatif.escape import NONE, EscapeForecast, escape_path, fit_escape
from experiments.whatif.predict import Change, nqm_predictor, plan

CFG = {"lr": 0.05, "momentum": 0.9, "opt": "hb", "schedule": "constant", "steps": 500}
AT, LAM0 = 300, 0.2
CAP = (1 - EDGE_MARGIN) * float(stability_edge("hb", 0.9)) / 0.05  # 72.2: h/edge 0.95 at lr 0.05
WINDOWS = [(200, 300), (300, 400), (400, 500)]


def _lams(rate, excess_100=0.01, lam0=LAM0, probes=(0, 100, 200, 300)):
    """λ_max at the probes: the plateau λ0 at 0, then λ0 + e e^{r (τ − τ_100)} (τ = 0.5 per step)."""
    tau = 0.5 * np.asarray(probes, float)
    return np.r_[lam0, lam0 + excess_100 * np.exp(rate * (tau[1:] - tau[1]))]


def _trace(lam, lr=0.05, every=100):
    """One layer whose block is the network's top mode, λ_max = ``lam`` per probe."""
    lam = np.asarray(lam, float)
    probes = np.arange(lam.size) * every
    steps = int(probes[-1])
    pv = lambda v: (("probe_step", "layer"), np.asarray(v, float)[:, None])  # noqa: E731
    return xr.Dataset({"lr": ("step", np.full(steps, lr)), "sharpness": pv(lam), "hessian_trace": pv(lam * 20),
                       "grad_noise": pv(np.ones(lam.size)), "grad_signal": pv(np.full(lam.size, 0.01)),
                       "n_params": ("layer", [100]), "sharpness_global": ("probe_step", lam)},
                      coords={"step": np.arange(steps), "probe_step": probes, "layer": ["fc"]})


def _tau(n=4):
    return flow_time(np.full(300, 0.05), 0.9)[np.arange(n) * 100]


def test_the_escape_rate_is_recovered_in_flow_time():
    r = np.log(100) / 100  # the excess ×100 over 200 steps (100 units of flow time): λ_k = 1.2
    esc = fit_escape(_tau(), _lams(r))
    assert esc.rate == pytest.approx(r, rel=1e-9) and esc.excess == pytest.approx(1.0)
    assert esc.lam0 == LAM0 and esc.lam_k == pytest.approx(1.2) and esc.rising
    # noisy probes on a flat plateau: excess ≤ 0 at k, or fewer than two positive: no escape
    assert fit_escape(_tau(), [0.2, 0.21, 0.19, 0.18]) is NONE
    assert fit_escape(_tau(), [0.2, 0.19, 0.18, 0.21]) is NONE
    # a falling excess: rate clipped at 0, not rising
    assert not fit_escape(_tau(), [0.2, 0.3, 0.25, 0.21]).rising
    # a run already off its plateau before k (a probe before k at ≥ 2 λ0) has escaped
    assert fit_escape(_tau(), [0.2, 5.0, 20.0, 30.0]) is NONE
    with pytest.raises(ValueError, match="n_fit=1 is outside the valid range"):
        fit_escape(_tau(), _lams(r), n_fit=1)
    with pytest.raises(ValueError, match="n_fit=0 is outside the valid range"):
        EscapeForecast(n_fit=0)


@pytest.mark.parametrize("factor, due", [(1.0, True), (2.0, True), (0.1, False), (0.5, False)])
def test_an_escape_due_within_the_horizon_is_forecast_and_one_not_due_is_not(factor, due):
    # λ_k = 1.2 with the excess e = 1 growing ×e^{r δτ}, r = ln 100 / 100. Under lr × f the cap is
    # CAP/f and each step advances τ by 0.5 f: the path meets the cap after
    # n* = ln((CAP/f − λ0)/e) / (r · 0.5 f) steps; due iff n* < 200 (the horizon). f = 1: 186;
    # 2: 79; 0.5: 442; 0.1: 2950 steps.
    r = np.log(100) / 100
    esc = fit_escape(_tau(), _lams(r))
    n_star = np.log((CAP / factor - LAM0) / 1.0) / (r * 0.5 * factor)
    assert (n_star < 200) == due
    p = plan(CFG, AT, Change("x", lr_factor=factor), AT + 200)
    growth, cap, is_due = escape_path(esc, AT, p)
    assert is_due == due
    t = np.arange(200)
    np.testing.assert_allclose(growth[AT:] * esc.lam_k, LAM0 + np.exp(r * 0.5 * factor * t), rtol=1e-10)
    np.testing.assert_allclose(cap[AT:], CAP / factor)
    kappa = EscapeForecast().factor(0.6, esc, AT, p)  # λ̄ = 0.6 (a trailing mean below λ_k)
    if due:
        np.testing.assert_array_equal(kappa[:AT], 1.0)  # from the probe at k: the excess' growth, then held at the cap from n* on
        np.testing.assert_allclose(0.6 * kappa[AT:], np.minimum(1.2 * growth[AT:], CAP / factor), rtol=1e-12)
        assert 0.6 * kappa[AT] == pytest.approx(1.2)
        assert 0.6 * kappa[AT + int(np.ceil(n_star))] == pytest.approx(CAP / factor)
        assert 0.6 * kappa[AT + int(np.floor(n_star))] < CAP / factor
    else:  # nothing moves: the predictor keeps the fixed curvature
        assert kappa is None


def test_the_predictor_forecasts_the_escape_and_reduces_to_the_fixed_curvature_without_one():
    plans = [plan(CFG, AT, Change("scheduled"), AT + 200), plan(CFG, AT, Change("d", lr_factor=0.1), AT + 200)]
    fixed = lambda lam: nqm_predictor(_trace(lam), CFG, AT, plans, WINDOWS)  # noqa: E731
    esc = lambda lam: nqm_predictor(_trace(lam), CFG, AT, plans, WINDOWS, curvature=EscapeForecast())  # noqa: E731
    rising = _lams(np.log(100) / 100)
    d, f = esc(rising), fixed(rising)
    # the unchanged plan: due (186 steps); the curvature climbs to the edge, the norm with it
    k = d.curvature_factor.isel(change=0).values
    # (at each window's first step, over the last probe: 1.2 at 300, 0.2 + e^{r 50} = 10.2 at 400)
    assert k[0] == 1.0 and k[1] == pytest.approx(1.0) and k[2] * 1.2 == pytest.approx(0.2 + 10.0)
    assert float(d.grad_sq.isel(change=0, window=2, layer=0)) > 10 * float(f.grad_sq.isel(change=0, window=2, layer=0))
    rho_d, rho_f = (float(x.grad_corr.isel(change=0, window=2, layer=0)) for x in (d, f))
    assert rho_d < rho_f - 0.1  # nearer the edge: the gradients oscillate
    # the decay ×0.1: not due; identical to the fixed curvature, as is window 0 of both plans
    for v in ("grad_corr", "grad_sq", "update_sq"):
        np.testing.assert_array_equal(d[v].isel(change=1).values, f[v].isel(change=1).values)
        np.testing.assert_array_equal(d[v].isel(window=0).values, f[v].isel(window=0).values)
    # no rise (a flat plateau), a slow one (not due), an escaped run: the fixed curvature exactly
    for lam in ([0.2, 0.2, 0.2, 0.2], _lams(np.log(4) / 100), [0.2, 11.0, 14.0, 25.0]):
        d, f = esc(lam), fixed(lam)
        for v in ("grad_corr", "grad_sq", "update_sq", "curvature_factor"):
            np.testing.assert_array_equal(d[v].values, f[v].values)
