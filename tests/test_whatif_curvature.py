"""The curvature forecast of the what-if predictions: the sharpening rate from constructed
probes, its extrapolation and the edge cap (the predictor with the forecast off:
tests/test_whatif.py)."""

import numpy as np
import pytest

from dynamics.quadratic import stability_edge
from experiments.whatif.curvature import CurvatureForecast, forecast_factor, sharpening_rate
from experiments.whatif.predict import Change, plan


def test_a_known_sharpening_rate_is_recovered_and_extrapolated():
    # λ = 2 e^{r t} with multiplicative noise; probes every 100 steps, h/edge below 0.5 up to
    # step 600, at the edge after. The slope of a least-squares line through 7 points with
    # log-noise sd 0.02 has standard error 0.02 / sqrt(Σ(t - t̄)²) = 0.02 / 529 ≈ 3.8e-5: 5 se.
    r, steps = 2e-3, np.arange(0, 1100, 100)
    lam = 2 * np.exp(r * steps) * np.exp(np.random.default_rng(0).normal(0, 0.02, steps.size))
    h = np.where(steps <= 600, 0.3, 0.95)
    lam_late = np.where(steps <= 600, lam, 50.0)  # at the edge: the edge holds λ, not sharpening
    est = sharpening_rate(steps, lam_late, h, at=1000, below=0.5)
    assert est == pytest.approx(r, abs=5 * 0.02 / np.sqrt(((steps[:7] - 300.0) ** 2).sum()))
    assert sharpening_rate(steps, lam_late, h, at=1000, below=0.5, last=3) == pytest.approx(r, abs=2e-4)
    assert sharpening_rate(steps, lam, np.full(steps.size, 0.9), at=1000, below=0.5) == 0.0  # none qualifies
    # extrapolated without a cap: κ_t = e^{r (t - at)} from at on, 1 before
    k = forecast_factor(3.0, r, 100, np.full(400, np.inf))
    np.testing.assert_allclose(k[:100], 1.0)
    np.testing.assert_allclose(k[100:], np.exp(r * np.arange(300)), rtol=1e-12)
    # a cap that rises at step 200 (a decay): λ' climbs to the first cap, holds, then climbs again
    caps = np.r_[np.full(200, 3.3), np.full(200, 33.0)]
    k = forecast_factor(3.0, r, 100, caps)
    lam_f = 3.0 * k
    assert lam_f[199] == pytest.approx(3.3) and lam_f[200] == pytest.approx(3.3 * np.exp(r))
    assert np.all(np.diff(lam_f[100:]) >= 0) and np.all(lam_f <= caps + 1e-12)
    with pytest.raises(ValueError, match="lam_at=nan is outside the valid range"):
        forecast_factor(np.nan, r, 100, caps)
    with pytest.raises(ValueError, match="below=0 is outside the valid range"):
        CurvatureForecast(below=0)


def test_the_cap_binds_after_an_lr_increase_and_a_decay_lets_the_sharpness_rise():
    cfg = {"lr": 0.05, "momentum": 0.9, "opt": "hb", "schedule": "constant", "steps": 400}
    edge = float(stability_edge("hb", 0.9))
    lam_at = 0.7 * edge / 0.05  # h/edge 0.7 before the change
    fc = CurvatureForecast(level="edge", margin=0.05)
    up = fc.factor(lam_at, 1e-3, 200, plan(cfg, 200, Change("x2", lr_factor=2.0), 400))
    assert up[:200].tolist() == [1.0] * 200
    np.testing.assert_allclose(up[200:] * lam_at * 0.1 / edge, 0.95)  # held at the new edge (less the margin)
    nag = fc.factor(lam_at, 0.0, 200, plan(cfg, 200, Change("nag", method="nag"), 400))
    np.testing.assert_allclose(nag[200:] * lam_at * 0.05 / float(stability_edge("nag", 0.9)), 0.95)
    down = fc.factor(lam_at, 1e-3, 200, plan(cfg, 200, Change("d", lr_factor=0.1), 400))
    np.testing.assert_allclose(down[200:], np.exp(1e-3 * np.arange(200)), rtol=1e-12)
    # at the run's own level h̄ = 0.3: doubling the lr halves λ_max; a decay leaves it (no sharpening)
    run = CurvatureForecast(level="run")
    np.testing.assert_allclose(run.factor(lam_at, 1e-3, 200, plan(cfg, 200, Change("x2", lr_factor=2.0), 400),
                                          h_run=0.3)[200:] * lam_at * 0.1 / edge, 0.3)
    np.testing.assert_array_equal(run.factor(lam_at, run.rate([0, 100], [1.0, 2.0], [0.1, 0.1], 100), 200,
                                             plan(cfg, 200, Change("d", lr_factor=0.1), 400), h_run=0.7), 1.0)
    with pytest.raises(ValueError, match="level='x' is unknown"):
        CurvatureForecast(level="x")
    off = CurvatureForecast(cap=False, sharpening=False)
    assert off.rate([0, 100], [1.0, 2.0], [0.1, 0.1], 100) == 0.0
    np.testing.assert_array_equal(off.factor(lam_at, 0.0, 200, plan(cfg, 200, Change("x2", lr_factor=2.0), 400)), 1.0)

