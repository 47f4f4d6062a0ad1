"""whatif delta predictor: forecast of the unchanged run ∘ the model's effect of the change, on
constructed traces where the answer is known, and plugged into whatif on a tiny run."""

import numpy as np
import pytest
import xarray as xr

from experiments import store
from experiments.runs.config import RunConfig
from experiments.whatif import delta
from experiments.whatif.predict import Change, changes_from, plan, whatif
from tests.test_whatif import TINY, tiny_run  # noqa: F401 (tiny_run: a fixture)


def constant_plan(lr, momentum, steps):
    return {"lr": np.full(steps, lr), "momentum": np.full(steps, momentum), "method": np.array(["hb"] * steps, object)}


def test_a_known_log_linear_drift_and_a_known_effect_are_both_recovered():
    # the unchanged run: log|g| = a + s·τ per layer, ρ = c + d·τ; windows of 10 steps at lr 0.01, β 0.9
    # (τ per step 0.1); the change doubles the lr at k = 30, so its windows after k run at τ 0.2 / step
    at, layers = 30, 3
    a, s = np.array([0.0, 1.0, -2.0]), np.array([0.5, -0.3, 0.0])
    c, d = np.array([0.1, -0.2, 0.3]), np.array([0.05, 0.0, -0.1])
    ref = constant_plan(0.01, 0.9, 50)
    changed = {**ref, "lr": np.r_[np.full(at, 0.01), np.full(20, 0.02)]}
    past = [(0, 10), (10, 20), (20, 30)]
    after = [(30, 40), (40, 50)]
    tau_p = delta.window_clock(ref, past)
    np.testing.assert_allclose(np.diff(tau_p), 1.0)  # 10 steps × 0.1
    tau_c = delta.window_clock(changed, after)
    np.testing.assert_allclose(tau_c - tau_p[-1], [0.55 + 0.9, 0.55 + 0.9 + 2.0])  # to k, then twice as fast
    lognorm = a + s * tau_p[:, None]
    corr = c + d * tau_p[:, None]
    base_norm = np.exp(delta.base_forecast(tau_p, lognorm, tau_c, "trend"))
    base_corr = delta.base_forecast(tau_p, corr, tau_c, "trend")
    np.testing.assert_allclose(base_norm, np.exp(a + s * tau_c[:, None]), rtol=1e-12)
    np.testing.assert_allclose(base_corr, c + d * tau_c[:, None], atol=1e-12)
    # the model's effect: E|g|² ×4 (|g| ×2), ρ −0.3, E|Δθ|² ×100 (ratio +1 decade), whatever its level
    level = np.array([[7.0, 0.3, 11.0], [5.0, 0.2, 13.0]])
    ref_m = {"grad_corr": level * 0 + 0.4, "grad_sq": level, "update_sq": level}
    mod_m = {"grad_corr": level * 0 + 0.1, "grad_sq": 4 * level, "update_sq": 100 * level}
    cor, nor, rat = delta.combine(base_corr, base_norm, np.zeros((2, layers)), mod_m, ref_m)
    np.testing.assert_allclose(nor, 2 * np.exp(a + s * tau_c[:, None]), rtol=1e-12)
    np.testing.assert_allclose(cor, c + d * tau_c[:, None] - 0.3, atol=1e-12)
    np.testing.assert_allclose(rat, 1.0, atol=1e-12)


def test_with_no_drift_the_trend_is_persistence_times_the_model_ratio():
    tau_p, tau_new = np.array([1.0, 2.0, 3.0]), np.array([4.0, 7.0])
    y = np.tile([[0.2, -1.0]], (3, 1))  # flat
    for base in delta.BASES:
        np.testing.assert_allclose(delta.base_forecast(tau_p, y, tau_new, base), [[0.2, -1.0]] * 2)
    drifting = y + np.array([[0.0], [0.1], [0.2]])
    np.testing.assert_allclose(delta.base_forecast(tau_p, drifting, tau_new, "persistence"), [[0.4, -0.8]] * 2)
    np.testing.assert_allclose(delta.base_forecast(tau_p[-1:], drifting[-1:], tau_new, "trend"), [[0.4, -0.8]] * 2)
    ref = {"grad_corr": np.full((2, 2), 0.5), "grad_sq": np.full((2, 2), 2.0), "update_sq": np.ones((2, 2))}
    mod = {**ref, "grad_sq": np.full((2, 2), 0.5)}
    _, norm, _ = delta.combine(0.0, np.exp(delta.base_forecast(tau_p, y, tau_new, "trend")), 0.0, mod, ref)
    np.testing.assert_allclose(norm, np.exp([[0.2, -1.0]] * 2) * 0.5)
    with pytest.raises(ValueError, match="base='level' is unknown"):
        delta.base_forecast(tau_p, y, tau_new, "level")


def test_the_reference_plan_holds_the_step_before_the_change():
    cfg = RunConfig(**{**TINY, "schedule": "step", "step_every": 40, "step_gamma": 0.1}).to_dict()
    p = plan(cfg, 40, Change("x", lr_factor=0.5, method="nag"), 60)  # the scheduled decay at 40, then ×0.5
    r = delta.reference_plan(p, 40)
    np.testing.assert_allclose(r["lr"], 0.05)
    assert set(r["method"]) == {"hb"} and np.all(r["momentum"] == 0.9)
    assert p["lr"][45] == pytest.approx(0.0025) and p["method"][45] == "nag"  # the plan itself untouched


def constant_model(trace, config, at, plans, windows):
    dims = ("change", "window", "layer")
    shape = (len(plans), len(windows), trace.sizes["layer"])
    return xr.Dataset({k: (dims, np.full(shape, 0.5)) for k in ("grad_corr", "grad_sq", "update_sq")},
                      coords={"layer": trace["layer"].values})


@pytest.mark.slow
def test_the_delta_predictor_in_whatif(tiny_run):
    trace = store.load_run(tiny_run)
    changes = changes_from([0.5, 2.0], methods=["nag"])
    # a model that sees no change: persistence for the persistence base
    flat = whatif(trace, 40, changes, window=10, predictor=delta.predictor("persistence", inner=constant_model))
    for v in ("grad_corr", "grad_norm", "update_ratio"):
        xr.testing.assert_allclose(flat[f"pred_{v}"], flat[f"persist_{v}"])
    # the NQM: the unchanged run (constant schedule = the reference) is the base forecast; the
    # others are it times the model's ratio, which the default's effect shares
    default = whatif(trace, 40, changes, window=10)
    dp = whatif(trace, 40, changes, window=10, predictor=delta.predictor("persistence"))
    dt = whatif(trace, 40, changes, window=10, predictor=delta.predictor("trend"))
    after = dict(window=slice(1, None))
    xr.testing.assert_allclose(dp.pred_grad_norm.isel(change=0, **after),
                               dp.persist_grad_norm.isel(change=0, **after))
    eff = lambda ds: (ds.pred_grad_norm / ds.pred_grad_norm.isel(change=0)).isel(**after)  # noqa: E731
    xr.testing.assert_allclose(eff(dp), eff(default), rtol=1e-9)
    # the trend's clock: a method switch keeps the flow time, so the unchanged run's trend; an lr change does not
    xr.testing.assert_allclose(eff(dt).isel(change=3), eff(dp).isel(change=3), rtol=1e-9)
    assert not np.allclose(eff(dt).isel(change=1), eff(dp).isel(change=1), rtol=1e-6)
    assert not np.allclose(dt.pred_grad_norm.isel(change=0, **after), dp.pred_grad_norm.isel(change=0, **after))
    xr.testing.assert_allclose(dp.pred_grad_norm.isel(window=0), dp.persist_grad_norm.isel(window=0))
