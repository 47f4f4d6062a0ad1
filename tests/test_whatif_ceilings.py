"""The what-if scores' noise ceilings (analyses/whatif_ceilings.py), the replicate check with
another data order, and the choice rule (analyses/whatif_forecast_choice.py)."""

import numpy as np
import pytest

from analyses.whatif_ceilings import sign_repeat
from analyses.whatif_forecast_choice import GROUPS, candidates, choose, rule_score
from experiments import store
from experiments.runs.config import RunConfig, run_id
from experiments.runs.loop import run
from experiments.whatif.check import check
from experiments.whatif.predict import changes_from


@pytest.mark.parametrize("p", [0.8, 0.95])
def test_sign_repeat_recovers_the_probability_of_the_expected_sign(p):
    # expected moves ±30 %; each replicate shows the expected sign with probability p, independently:
    # agreement q = p² + (1 − p)², and the ceiling (1 + √(2q − 1))/2 = p. n = 4000: the standard error
    # of q is √(q(1 − q)/n) ≤ 0.008, of p ≤ 0.008/(2√(2q − 1)) ≤ 0.007; 4 se.
    rng = np.random.default_rng(1)
    n = 4000
    sign = rng.choice([-1.0, 1.0], n)
    a = 1 + 0.3 * sign * np.where(rng.random(n) < p, 1, -1)
    b = 1 + 0.3 * sign * np.where(rng.random(n) < p, 1, -1)
    out = sign_repeat(a, b)
    assert out["n"] == 2 * n
    assert out["repeat"] == pytest.approx(p**2 + (1 - p) ** 2, abs=4 * 0.008)
    assert out["ceiling"] == pytest.approx(p, abs=4 * 0.007)
    # moves below the threshold do not count; none moved: no score
    assert sign_repeat(np.full(5, 1.05), np.full(5, 0.95))["n"] == 0
    small = sign_repeat(np.r_[1.5, 1.05], np.r_[1.4, 0.95])  # only the first pair moved (twice)
    assert small["n"] == 2 and small["repeat"] == 1.0 and small["ceiling"] == 1.0


@pytest.mark.slow
def test_a_replicate_check_forks_every_change_with_another_data_order(tmp_path):
    cfg = RunConfig(model="seed-cnn", data="digits", model_args={"channels": 4, "hidden": 16}, steps=60,
                    batch_size=64, threads=1, seed=1, lr=0.05, momentum=0.9, probe_every=10, probe_batch_size=128,
                    hutchinson_samples=2, noise_microbatches=4)
    run(cfg, tmp_path / run_id(cfg))
    changes = changes_from([0.5])
    a = check(tmp_path / run_id(cfg), 30, changes, window=10, n_windows=2)
    b = check(tmp_path / run_id(cfg), 30, changes, window=10, n_windows=2, data_seed=1)
    assert a.attrs["fork_dirs"][0] == str(tmp_path / run_id(cfg))  # scheduled: the run itself
    assert b.attrs["fork_dirs"][0] != a.attrs["fork_dirs"][0] and len(set(b.attrs["fork_dirs"])) == 2
    assert store.load_run(b.attrs["fork_dirs"][0]).attrs["config"]["fork_data_seed"] == 1
    np.testing.assert_array_equal(a.meas_grad_norm.isel(window=0), b.meas_grad_norm.isel(window=0))  # before k
    assert not np.allclose(a.meas_grad_norm.isel(window=1), b.meas_grad_norm.isel(window=1))  # other batches
    np.testing.assert_array_equal(a.pred_grad_norm, b.pred_grad_norm)  # the prediction sees only the past


def test_the_rule_score_and_the_round_s_sets():
    groups = {g: {"corr_spearman": 0.6, "norm_sign": 0.4, "effect_sign": 0.2, "norm_factor_1p5": 0.2}
              for g in GROUPS}
    assert rule_score(groups, 1.0) == pytest.approx((19 * 0.35 + 1.0) / 20)  # nineteen fork groups and the seed term
    groups["evaluation_8"]["effect_sign"] = float("nan")  # a group without an effect case: the three defined
    assert rule_score(groups, 1.0) == pytest.approx((18 * 0.35 + 0.4 + 1.0) / 20)
    assert set(candidates()) == {"bulk_trend_blend_small_loss", "bulk_mix_held", "bulk_mix_power",
                                 "bulk_mix_power_held"}
    from analyses.whatif_scores import HELD_OUT

    assert not set(HELD_OUT) & set(GROUPS)  # the held-out families are not development
    assert "evaluation_19" in HELD_OUT and "seed_decay_growth_eval19" in HELD_OUT  # this round's held out
    assert {"evaluation_13", "evaluation_18"} <= set(GROUPS)  # scored once in earlier rounds, seen since
    from analyses.whatif_forecast_choice import SEED_DECAY_SPECS

    assert "whatif_eval18_decay" in SEED_DECAY_SPECS and "whatif_eval19_decay" not in SEED_DECAY_SPECS
    import analyses.whatif_forecast_choice as choice

    assert choice.__doc__.split("The rule. ")[1].split("Writes")[0].strip()  # main() writes it to the json


def test_drift_share_counts_the_moves_the_unchanged_run_made_too():
    import xarray as xr

    from analyses.whatif_ceilings import drift_share, growth_and_effect

    # window 0 norm 1; the unchanged run moves +30 % in layer a, 0 in b; the change moves +50 % in a
    # (with the drift), −40 % in b (its own): one of two scored cases is drift
    g = np.array([[[1.0, 1.0], [1.3, 1.0]], [[1.0, 1.0], [1.5, 0.6]]])
    ds = xr.Dataset({"meas_grad_norm": (("change", "window", "layer"), g)},
                    coords={"label": ("change", ["scheduled", "lr×2"])})
    assert drift_share(ds) == (2, 1, 0, 0)
    # predicted: +20 % in a (right, a drift case), +10 % in b (wrong, its own case)
    ds["pred_grad_norm"] = (("change", "window", "layer"), np.array([[[1.0, 1.0]] * 2, [[1.0, 1.0], [1.2, 1.1]]]))
    assert drift_share(ds) == (2, 1, 1, 0)
    grow, effect = growth_and_effect(ds)
    np.testing.assert_allclose(effect[0, 0], [1.5 / 1.3, 0.6])


def test_the_confirmation_compares_the_held_out_terms_of_the_default_and_the_challenger():
    from analyses.whatif_forecast_choice import CHALLENGER, confirm

    fork = {"model": {"corr_spearman": 0.6, "norm_sign": 0.6, "effect_sign": 0.6},
            CHALLENGER: {"corr_spearman": 0.6, "norm_sign": 0.9, "effect_sign": float("nan")}}
    seed = {"lr=0.04": {"model": {"right": 0.5}, CHALLENGER: {"right": 0.25}},
            "lr=0.06": {"model": {"right": 0.5}, CHALLENGER: {"right": 0.25}}}
    h0, h1, switch = confirm({"evaluation_9": {"pooled": fork}, "seed_decay_growth_eval9": seed})
    assert (h0, h1, switch) == (pytest.approx(0.55), pytest.approx(0.5), False)  # (0.6+0.5)/2; (0.75+0.25)/2
    seed["lr=0.06"][CHALLENGER]["right"] = 0.75
    assert confirm({"evaluation_9": {"pooled": fork}, "seed_decay_growth_eval9": seed})[2]


def test_the_misses_tally_splits_moved_cases_into_rises_and_falls_with_their_effect():
    import collections

    import xarray as xr

    from analyses.whatif_misses import kind, tally

    assert (kind("lr×2"), kind("momentum=0.6"), kind("method=nag")) == ("lr×2", "momentum", "method")
    # window 0 norm 1 (persistence); the unchanged run falls to 0.8; lr×2 falls to 0.6 (predicted
    # 1.3: wrong; effect measured 0.75, predicted 1.3) in layer a and stays in layer b (not moved)
    meas = np.array([[[1.0, 1.0], [0.8, 1.0]], [[1.0, 1.0], [0.6, 1.05]]])
    pred = np.array([[[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.3, 1.0]]])
    dims = ("change", "window", "layer")
    ds = xr.Dataset({"meas_grad_norm": (dims, meas), "pred_grad_norm": (dims, pred),
                     "persist_grad_norm": (dims, np.ones_like(meas))},
                    coords={"label": ("change", ["scheduled", "lr×2"])})
    out = collections.defaultdict(lambda: {"rise": [], "fall": [], "fall_effect": [], "effect": []})
    tally(ds, out)
    assert list(out) == ["lr×2"] and out["lr×2"]["rise"] == [] and out["lr×2"]["fall"] == [False]
    np.testing.assert_allclose(out["lr×2"]["fall_effect"], [(0.75, 1.3)])
    np.testing.assert_allclose(out["lr×2"]["effect"], [(0.75, 1.3)])  # b's effect, 1.05, did not move


def test_a_held_out_group_runs_only_when_named(monkeypatch):
    import analyses.whatif_scores as scores

    seen = []
    held_groups = [g for g in scores.HELD_OUT if g in scores.GROUPS]
    held_seeds = [g for g in scores.HELD_OUT if g in scores.SEED_SPECS]
    assert held_groups and held_seeds and set(held_groups + held_seeds) == set(scores.HELD_OUT)
    monkeypatch.setattr(scores, "setting_checks", lambda spec, steps: seen.append(spec) or {})
    assert set(scores.checks()) == set(scores.GROUPS) - set(scores.HELD_OUT)
    assert not {scores.GROUPS[g][0] for g in held_groups} & set(seen)
    assert set(scores.checks(held_groups)) == set(held_groups)  # named: it runs
    # the command without names: neither the held-out groups nor the held-out seed runs
    ran = []
    monkeypatch.setattr(scores, "score_setting", lambda spec, steps: ran.append(spec) or ({}, {}))
    monkeypatch.setattr(scores, "seed_entry", lambda name: ran.append(name) or {})
    monkeypatch.setattr(scores, "atomic_write_json", lambda path, obj: None)
    assert scores.main([]) == 0
    assert not {scores.GROUPS[g][0] for g in held_groups} & set(ran) and not set(held_seeds) & set(ran)
    assert set(scores.default_seed_entries()) <= set(ran)
    ran.clear()
    assert scores.main(held_seeds) == 0 and ran == held_seeds  # named: it runs


def test_the_family_test_is_paired_over_the_development_groups():
    from analyses.whatif_forecast_choice import family_test

    keys = ("corr_spearman", "norm_sign", "effect_sign", "norm_factor_1p5")
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.8, size=(2, len(GROUPS)))  # the default's four-term level per order and group

    def row(score, terms):
        return {"S": [score, score], "score": score,
                "groups": {o: {g: dict.fromkeys(keys, t) for g, t in zip(GROUPS, terms[o])} for o in (0, 1)}}

    d, a, b = "bulk_trend_blend_small_loss", "bulk_mix_held", "bulk_mix_power"
    up = np.tile([0.02, 0.04], (2, len(GROUPS)))[:, :len(GROUPS)]  # +0.03 on average, consistent
    swing = np.tile([0.40, -0.30], (2, len(GROUPS)))[:, :len(GROUPS)]  # +0.05 on average, against its spread
    rows = {d: row(0.70, base), a: row(0.70, base + up), b: row(0.70, base + swing)}
    out = family_test(rows)
    diff = up.mean(axis=0)
    assert out[a] == (pytest.approx(diff.mean()), pytest.approx(diff.std(ddof=1) / np.sqrt(len(GROUPS))), True)
    assert out[b][0] > out[a][0] and out[b][2] is False  # larger on average, but not against its spread
    assert choose(rows) == a
    rows[a]["score"] = 0.69  # it passes the paired test but loses on S: not chosen
    assert family_test(rows)[a][2] is False and choose(rows) == d
    rows[a]["score"], rows["bulk_mix_power_held"] = 0.70, row(0.70, base + up)  # a tie in d: fewer parts
    assert choose(rows) == a
