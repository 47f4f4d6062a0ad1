"""The sharpening after an lr decrease (experiments/whatif/sharpen.py) on constructed traces: it
acts on a plan with an lr decrease (a decay at k, a scheduled decay inside the horizon) and on
no other (there the prediction is the escape forecast's, the predictor in use's model, to the
bit), its rate is the run's flow-time sharpening rate, continued in the new flow time, and it
stops at the cap (the new edge, or the run's own level)."""

import numpy as np
import pytest

from dynamics.quadratic import stability_edge
from experiments.linking.predict import EDGE_MARGIN
from experiments.whatif import drift, escape, sharpen
from experiments.whatif.core import ANCHORED
from experiments.whatif.curvature import flow_time
from experiments.whatif.predict import Change, nqm_predictor, plan
from tests.test_whatif_escape import _trace

CFG = {"lr": 0.05, "momentum": 0.9, "opt": "hb", "schedule": "constant", "steps": 500}
AT, R = 300, 0.01  # the sharpening: λ_max = 2 e^{R τ}, τ = 0.5 per step (lr 0.05, β 0.9)
WINDOWS = [(200, 300), (300, 400), (400, 500)]
TAU = flow_time(np.full(AT, 0.05), 0.9)[np.arange(4) * 100]
LAM = 2.0 * np.exp(R * TAU)  # 2, 3.30, 5.44, 8.96: h/edge ≤ 0.12 (below the edge); escaped (≥ 2 λ_0 before k)
CHANGES = [Change("scheduled"), Change("lr×2", lr_factor=2.0), Change("momentum=0.6", momentum=0.6),
           Change("method=nag", method="nag"), Change("decay×0.1", lr_factor=0.1), Change("lr×0.5", lr_factor=0.5)]


def _plans(config=CFG, changes=CHANGES, horizon=AT + 200):
    return [plan(config, AT, ch, horizon) for ch in changes]


def test_first_decrease_finds_a_decay_at_k_or_scheduled_inside_the_horizon_and_nothing_else():
    assert [sharpen.first_decrease(p, AT) for p in _plans()] == [None, None, None, None, AT, AT]
    step = {**CFG, "schedule": "step", "step_every": 350, "step_gamma": 0.1}
    assert sharpen.first_decrease(plan(step, AT, Change("scheduled"), AT + 200), AT) == 350
    assert sharpen.first_decrease(plan(step, AT, Change("scheduled"), 350), AT) is None  # past the horizon
    assert sharpen.first_decrease(plan(step, AT, Change("x", lr_factor=20.0), AT + 200), AT) is None  # ×20 then ×0.1: above
    assert sharpen.first_decrease(_plans()[4], 0) is None
    with pytest.raises(ValueError, match="level='stochastic' is unknown"):
        sharpen.DecaySharpening(level="stochastic")
    with pytest.raises(ValueError, match="margin=1.0 is outside the valid range"):
        sharpen.DecaySharpening(margin=1.0)


def test_the_rate_is_recovered_in_flow_time_and_continued_in_the_new_flow_time():
    esc, r, lam0 = sharpen.DecaySharpening().rate(TAU, LAM, np.ones(4, bool))
    assert lam0 == LAM[0]
    assert r == pytest.approx(R, rel=1e-9) and esc is escape.NONE  # escaped: the escape forecast is silent
    d = nqm_predictor(_trace(LAM), CFG, AT, _plans(), WINDOWS, curvature=sharpen.DecaySharpening())
    lam_bar, lam_k = LAM[1:].mean(), LAM[-1]
    k = d.curvature_factor.values  # λ'/λ_k at the windows' first steps (300, 400)
    # decay ×0.1: 100 steps of flow time 0.05 each; lr ×0.5: 100 × 0.25
    assert k[4, 1] == pytest.approx(lam_bar / lam_k) and k[4, 2] == pytest.approx(lam_bar * np.exp(R * 5) / lam_k)
    assert k[5, 2] == pytest.approx(lam_bar * np.exp(R * 25) / lam_k)
    # a fall of λ_max below the edge is not sharpening: rate 0, nothing moves
    assert sharpen.DecaySharpening().rate(TAU, LAM[::-1], np.ones(4, bool))[1] == 0.0
    flat = nqm_predictor(_trace(LAM[::-1]), CFG, AT, _plans(), WINDOWS, curvature=sharpen.DecaySharpening())
    np.testing.assert_array_equal(flat.curvature_factor.values, 1.0)


def test_it_acts_on_a_decrease_only_and_is_the_escape_forecast_to_the_bit_elsewhere():
    tr = _trace(LAM)
    base = nqm_predictor(tr, CFG, AT, _plans(), WINDOWS, curvature=escape.EscapeForecast())
    new = nqm_predictor(tr, CFG, AT, _plans(), WINDOWS, curvature=sharpen.DecaySharpening())
    for v in ("grad_corr", "grad_sq", "update_sq", "curvature_factor"):
        np.testing.assert_array_equal(new[v].isel(change=slice(0, 4)).values, base[v].isel(change=slice(0, 4)).values)
        np.testing.assert_array_equal(new[v].isel(window=0).values, base[v].isel(window=0).values)
    # the decreases: the curvature (and the noise with it) rises, so does E‖g‖² over the fixed curvature's
    for c in (4, 5):
        assert float(new.grad_sq.isel(change=c, window=2, layer=0)) > float(base.grad_sq.isel(change=c, window=2, layer=0))
    # composed under the predictor in use's drift: the other plans are the predictor in use's to the bit
    plans, rng = _plans(), np.random.default_rng(0)
    tr = tr.assign(grad_norm=(("step", "layer"), np.exp(0.02 * rng.standard_normal((AT, 1)))),
                   update_ratio=(("step", "layer"), -3 + 0.02 * rng.standard_normal((AT, 1))),
                   grad_cos=(("step", "layer"), rng.uniform(-0.5, 0.5, (AT, 1))))
    a = drift.drift_predictor(tr, CFG, AT, plans, WINDOWS, clock="flow", inner=escape.predictor())
    b = drift.drift_predictor(tr, CFG, AT, plans, WINDOWS, clock="flow", inner=sharpen.predictor())
    for v in ("grad_corr", "grad_sq", "update_sq", *ANCHORED):
        np.testing.assert_array_equal(a[v].isel(change=slice(0, 4)).values, b[v].isel(change=slice(0, 4)).values)
    assert np.all(b["anchored_grad_norm"].isel(change=4, window=2).values > a["anchored_grad_norm"].isel(
        change=4, window=2).values)


def test_a_run_on_its_plateau_keeps_the_escape_forecast_on_a_decay_too():
    lam = np.r_[0.2, 0.2 + 0.01 * np.exp(np.log(100) / 100 * (TAU[1:] - TAU[1]))]  # escaping at k
    f = sharpen.DecaySharpening()
    rates = f.rate(TAU, lam, np.ones(4, bool))
    assert rates[0] is not escape.NONE and rates[1] > 0
    for p in _plans():
        expect = escape.EscapeForecast().factor(0.6, rates[0], AT, p)
        got = f.factor(0.6, rates, AT, p)
        if expect is not None:
            np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize("level", ["edge", "run"])
def test_the_rise_stops_at_the_cap(level):
    f = sharpen.DecaySharpening(level=level)
    p = _plans(changes=[Change("decay×0.1", lr_factor=0.1)])[0]
    h_run = 0.1
    edge = (1 - EDGE_MARGIN) if level == "edge" else h_run
    cap = edge * float(stability_edge("hb", 0.9)) / 0.005  # edge: 722; the run's level h̄ = 0.1: 76
    kappa = f.factor(5.0, (escape.NONE, 1.0, 1.0), AT, p, h_run=h_run)  # a fast rate: e^{0.05} per step
    np.testing.assert_array_equal(kappa[:AT], 1.0)
    lam = 5.0 * kappa[AT:]
    assert lam.max() == pytest.approx(cap) and np.all(lam <= cap * (1 + 1e-12))
    n = int(np.ceil(np.log(cap / 5.0) / 0.05))  # steps to the cap
    assert lam[n - 1] < cap and lam[n] == pytest.approx(cap)
    np.testing.assert_allclose(lam[:n], 5.0 * np.exp(0.05 * np.arange(n)), rtol=1e-10)
    # a scheduled decay inside the horizon: nothing before it, the rise from it on
    step = {**CFG, "schedule": "step", "step_every": 350, "step_gamma": 0.1}
    kappa = f.factor(5.0, (escape.NONE, 1.0, 1.0), AT, plan(step, AT, Change("scheduled"), AT + 200), h_run=h_run)
    np.testing.assert_array_equal(kappa[:350], 1.0)
    assert kappa[351] == pytest.approx(np.exp(0.05))


def test_the_held_level_after_a_change_that_lowers_it():
    tr, plans = _trace(LAM), _plans()
    held = sharpen.DecaySharpening(level="run", increase="held")
    base = nqm_predictor(tr, CFG, AT, plans, WINDOWS, curvature=sharpen.DecaySharpening(level="run"))
    new = nqm_predictor(tr, CFG, AT, plans, WINDOWS, curvature=held)
    lam_bar, lam_k = LAM[1:].mean(), LAM[-1]  # h̄ = 0.05 λ̄ / edge: the held λ at lr 0.1 is λ̄ / 2
    k = new.curvature_factor.values
    np.testing.assert_allclose(k[1, 1:], lam_bar / 2 / lam_k, rtol=1e-12)  # lr ×2
    for c, (m, b) in ((2, ("hb", 0.6)), (3, ("nag", 0.9))):  # a lower edge at the same lr
        ratio = float(stability_edge(m, b)) / float(stability_edge("hb", 0.9))
        np.testing.assert_allclose(k[c, 1:], lam_bar * min(ratio, 1.0) / lam_k, rtol=1e-12)
    # it lowers E‖g‖² after lr ×2 (curvature and noise fall), and leaves the unchanged run and the
    # decreases (the sharpening's) to the bit
    assert float(new.grad_sq.isel(change=1, window=2, layer=0)) < float(base.grad_sq.isel(change=1, window=2, layer=0))
    for v in ("grad_corr", "grad_sq", "update_sq", "curvature_factor"):
        for c in (0, 4, 5):
            np.testing.assert_array_equal(new[v].isel(change=c).values, base[v].isel(change=c).values)
    # a run still in its lazy phase (λ̄ < 2 λ_0): nothing moves
    lazy = 2.0 * np.exp(0.1 * R * TAU)
    a = nqm_predictor(_trace(lazy), CFG, AT, plans, WINDOWS, curvature=held)
    b = nqm_predictor(_trace(lazy), CFG, AT, plans, WINDOWS, curvature=sharpen.DecaySharpening(level="run"))
    for v in ("grad_sq", "curvature_factor"):
        np.testing.assert_array_equal(a[v].values, b[v].values)
    with pytest.raises(ValueError, match="increase='up' is unknown"):
        sharpen.DecaySharpening(increase="up")


def test_only_the_part_above_the_initial_curvature_follows_the_held_level():
    plans = _plans()
    part = sharpen.DecaySharpening(level="run", increase="partial")
    held = sharpen.DecaySharpening(level="run", increase="held")
    lam_bar, lam0 = LAM[1:].mean(), LAM[0]
    h_run = 0.05 * lam_bar / float(stability_edge("hb", 0.9))  # the run's level: its cap at lr 0.05 is λ̄
    for c, p in enumerate(plans[:4]):
        k_part = part.held(lam_bar, lam0, AT, p, h_run=h_run)
        k_held = held.held(lam_bar, lam0, AT, p, h_run=h_run)
        if c == 0:  # the unchanged run: the cap is λ̄ itself, nothing moves under either
            assert k_held is None and k_part is None
            continue
        # λ' = λ_0 + (λ̄ − λ_0) × (the held level's factor)
        np.testing.assert_allclose(lam_bar * k_part, lam0 + (lam_bar - lam0) * k_held, rtol=1e-12)
        np.testing.assert_array_equal(k_part[:AT], 1.0)
        assert np.all(k_part[AT:] > k_held[AT:]) and np.all(k_part[AT:] < 1)
    # lr × 2: the held level halves λ̄; the partial level keeps λ_0 and halves the rest
    k = part.held(lam_bar, lam0, AT, plans[1], h_run=h_run)
    np.testing.assert_allclose(k[AT:], (lam0 + (lam_bar - lam0) / 2) / lam_bar, rtol=1e-12)
    # no gate: a run that barely sharpened (λ̄ = 1.1 λ_0) keeps 1/1.1 of λ̄ and halves the rest;
    # one at its initial curvature, or below it, moves nothing
    k_small = part.held(1.1 * lam0, lam0, AT, plans[1], h_run=h_run * 1.1 * lam0 / lam_bar)
    np.testing.assert_allclose(k_small[AT:], (1 + 0.05) / 1.1, rtol=1e-12)
    assert part.held(lam0, lam0, AT, plans[1], h_run=h_run) is None
    assert part.held(0.9 * lam0, lam0, AT, plans[1], h_run=h_run) is None
    # in the predictor: the decreases (the sharpening's) and the unchanged run are left to the bit
    tr = _trace(LAM)
    base = nqm_predictor(tr, CFG, AT, plans, WINDOWS, curvature=sharpen.DecaySharpening(level="run"))
    new = nqm_predictor(tr, CFG, AT, plans, WINDOWS, curvature=part)
    for v in ("grad_corr", "grad_sq", "update_sq", "curvature_factor"):
        for c in (0, 4, 5):
            np.testing.assert_array_equal(new[v].isel(change=c).values, base[v].isel(change=c).values)
    assert float(new.grad_sq.isel(change=1, window=2, layer=0)) < float(base.grad_sq.isel(change=1, window=2, layer=0))
