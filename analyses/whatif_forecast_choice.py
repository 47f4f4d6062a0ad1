"""The choice of the what-if predictor (:mod:`experiments.whatif.predict`), fifteenth round
(docs/findings/whatif.md, "Fifteenth round"): the fourteenth round's two-part rule on a larger
development set.

Candidates of this round (written here, with the development set and the rules below, before the
run of this file): the predictor in use since the fourteenth round (``bulk_loss_level``:
:func:`experiments.whatif.predict.default_predictor`; the default) and three that keep each
change's effect over the reference plan (the run's lr, momentum and method at k − 1 held on) and
change only the level of that reference plan, the unchanged run's forecast
(:mod:`experiments.whatif.bulk`, ``level=``): ``bulk_trend_small_loss`` (in the small-loss regime
the level is the trend baseline's, window 0 carried along the run's own log-linear trend, no
theory), ``bulk_trend_blend_small_loss`` (there the geometric mean of the default's level and the
trend's, equal weights) and ``bulk_trend_blend`` (that mean everywhere). Outside the regime the
first two are the default to the bit (tests/test_whatif_bulk_sharpening.py). Why: on the two
families of the regime's kind held out in the thirteenth and fourteenth rounds the trend got the
norm sign and the size more often than every model on eval17 (0.92 / 0.82 against 0.84 / 0.48),
and the default's misses on eval13–eval17 are mostly of its level: where the fork's norm fell
after an lr × 2 the default got the sign on 0.21 of the cases, predicting the unchanged run's rise
(``python -m analyses whatif_misses evaluation_13 ... evaluation_17``). Equal weights: the
combination of two forecasts whose errors are not perfectly correlated has a smaller error than
either on average, and estimated weights seldom beat equal ones out of sample (Bates & Granger
1969, "The combination of forecasts"; Smith & Wallis 2009, "A simple explanation of the forecast
combination puzzle"); no weight is fitted. Looked at before this file was written, in the first
data order only (scratch runs, not kept), the four-term group mean, default / trend / blend in the
regime / blend everywhere: eval17 0.634 / 0.683 / 0.751 / 0.751, eval8 0.425 / 0.452 / 0.550 /
0.550; outside the regime the blend everywhere was below the default on five of the first six
development groups (development 0.668 against 0.614). ``experiments/specs/whatif_eval18.toml`` (a
GRU classifier on digits, a kind not among the development families) and
``whatif_eval18_decay.toml`` (the seed setting, seed 18) were committed before the candidates
(their runs and eval18's forks were made, not looked at, while the candidates were written) and are
held out, not read here.

Development: the fourteenth round's thirteen fork groups (the forks of ``whatif_seed_cnn.toml`` at
step 400, ``whatif_eval.toml``, ``whatif_eval2.toml`` and ``whatif_eval4.toml`` at 300 and 500,
``whatif_eval3.toml`` and ``whatif_eval5.toml`` to ``whatif_eval12.toml`` at 200 and 400) and the
five families held out in the eleventh to fourteenth rounds, each scored once there and seen since
(``whatif_eval13.toml`` to ``whatif_eval17.toml``, at 200 and 400): eighteen fork groups; and the
seed setting's growth after its step-1000 decay on its eighteen runs (``seed_cnn.toml``'s lr 0.03,
momentum 0.9, seed 0, and the runs of ``whatif_eval3_decay.toml``, ``whatif_eval4_decay.toml``,
``whatif_eval8_decay.toml``, ``whatif_eval9_decay.toml``, ``whatif_eval11_decay.toml`` and
``whatif_eval14_decay.toml`` to ``whatif_eval17_decay.toml``). Each fork check is scored twice: on
the forks of the scores and on replicate forks that differ from them only in the data order
(``RunConfig.fork_data_seed`` = 1).

The rule. Two parts, the fourteenth round's. (1) The twelfth round's S: per candidate and data
order, the mean of nineteen terms (for each of the eighteen development fork groups the mean of its
pooled correlation Spearman, norm-change sign, effect sign and share of norm growths within ×1.5,
those defined; and the seed setting's fraction of layers right, the mean over its eighteen runs);
the score is S averaged over the two data orders. (2) The regime test, paired: the regime groups
are eval8, eval12, eval16 and eval17 (every check of theirs is in the small-loss regime). For each
regime group and data order (eight units), d = the candidate's mean of the four terms minus the
default's. A candidate passes if the mean of d exceeds twice its standard error (sd(d)/√8, sd with
one degree of freedom less) and its score (1) is not below the default's. The passing candidate
with the largest mean d replaces the default (ties go to fewer parts, ``bulk_loss_level`` <
``bulk_trend_small_loss`` < ``bulk_trend_blend_small_loss`` < ``bulk_trend_blend``); if none
passes, the twelfth round's rule on (1) decides (a candidate replaces the default only if its score
beats the default's by more than twice the default's data-order standard error). The held-out
families (eval18, the two seed-18 runs) are then scored once, with every candidate and both
no-theory baselines beside the one chosen, for the record; no second test on them is made.
Writes ``results/whatif_forecast_choice.json`` (the candidates are scored in ``--workers``
processes, default 2, one candidate each at a time):

    .venv/bin/python -m analyses whatif_forecast_choice     # ~25 min on two cores

Result (run after this file was committed; ``results/whatif_forecast_choice.json``): S, the default
0.682 / 0.701 (mean 0.691), ``bulk_trend_small_loss`` 0.683 / 0.700 (0.691),
``bulk_trend_blend_small_loss`` 0.691 / 0.709 (0.700), ``bulk_trend_blend`` 0.662 / 0.677 (0.670); the
seed term 0.61 for the first three, 0.11 for the blend everywhere. The regime test:
``bulk_trend_small_loss`` mean d −0.000 (SE 0.013), does not pass; ``bulk_trend_blend_small_loss``
+0.041 (SE 0.018), passes; ``bulk_trend_blend`` +0.062 (SE 0.019), does not pass (its S is below the
default's). **``bulk_trend_blend_small_loss`` replaces the default** (the twelfth round's margin,
0.019, it would not have beaten: +0.009).
"""

from pathlib import Path

import numpy as np

from analyses.whatif_scores import CANDIDATES, IN_USE, KEYS, _weighted, checks, seed_config, seed_decay_growth
from experiments.store import atomic_write_json
from experiments.sweeps import SPECS_DIR, expand, load_spec
from experiments.whatif.check import check
from experiments.whatif.core import nqm_predictor

OUT = Path(__file__).resolve().parents[1] / "results" / "whatif_forecast_choice.json"
GROUPS = ("development", "evaluation_seen_during_development", "evaluation_new", "evaluation_3", "evaluation_4",
          "evaluation_5", "evaluation_6", "evaluation_7", "evaluation_8", "evaluation_9", "evaluation_10",
          "evaluation_11", "evaluation_12", "evaluation_13", "evaluation_14", "evaluation_15", "evaluation_16",
          "evaluation_17")
DATA_SEEDS = (0, 1)  # 0: the forks of the scores; 1: the replicate forks (another data order)
DEFAULT = "bulk_loss_level"  # the predictor in use when this round ran (since then: bulk_trend_blend_small_loss)
RECORD_ONLY = ()  # record-only rows (never chosen); none this round
PARTS = {"bulk_loss_level": 5, "bulk_trend_small_loss": 5.5, "bulk_trend_blend_small_loss": 6, "bulk_trend_blend": 6.5}
REGIME_GROUPS = ("evaluation_8", "evaluation_12", "evaluation_16", "evaluation_17")  # the small-loss regime (part 2)
SCORED = ("corr_spearman", "norm_sign", "effect_sign")  # the eighth round's terms (its confirmation)
RULE_TERMS = (*SCORED, "norm_factor_1p5")  # per fork group, the mean of those defined (twelfth round on)


def candidates():
    """name -> predictor: the candidates of the module docstring (from
    :data:`analyses.whatif_scores.CANDIDATES`)."""
    return {name: CANDIDATES[name] for name in PARTS}


def parts_on(name):
    return PARTS[name]


def seed_configs():
    """The seed setting's runs seen so far: seed_cnn.toml's (seed 0) and those of
    whatif_eval{3,4,8,9,11,14,15,16,17}_decay.toml."""
    return [seed_config(), *(c for name in ("whatif_eval3_decay", "whatif_eval4_decay", "whatif_eval8_decay",
                                            "whatif_eval9_decay", "whatif_eval11_decay", "whatif_eval14_decay",
                                            "whatif_eval15_decay", "whatif_eval16_decay", "whatif_eval17_decay")
                             for c in expand(load_spec(SPECS_DIR / f"{name}.toml")))]


def rule_score(groups, seed_right):
    """S of the module docstring from {group: pooled scores} and the seed setting's ``right``."""
    terms = [float(np.nanmean([groups[g][k] for k in RULE_TERMS])) for g in GROUPS] + [seed_right]
    return float(np.mean(terms))


def choose(rows, default=DEFAULT):
    """The rule of the module docstring over {name: {"score": mean S, "S": [S per data order]}}:
    (chosen name, the margin a candidate had to beat)."""
    s0, s1 = rows[default]["S"]
    margin = 2 * abs(s0 - s1) / 2
    ok = [n for n in rows if n not in RECORD_ONLY]
    best = max(ok, key=lambda n: (rows[n]["score"], -parts_on(n)))
    return (best if rows[best]["score"] - rows[default]["score"] > margin else default), margin


def regime_test(rows, default=DEFAULT):
    """Part (2) of the rule over {name: {"regime": {order: {group: pooled scores}}, "score": mean S}}:
    {name: (mean d, its standard error, passes)} for every candidate but the default."""
    def term(r, order, group):
        return float(np.nanmean([r["regime"][order][group][k] for k in RULE_TERMS]))

    out = {}
    for name, r in rows.items():
        if name == default:
            continue
        d = np.array([term(r, o, g) - term(rows[default], o, g) for o in r["regime"] for g in REGIME_GROUPS])
        se = float(np.std(d, ddof=1) / np.sqrt(d.size))
        mean = float(np.mean(d))
        out[name] = (mean, se, bool(mean > 2 * se and r["score"] >= rows[default]["score"]))
    return out


def choose_with_regime(rows, default=DEFAULT):
    """The fourteenth round's rule, kept in the fifteenth (module docstring): (chosen name, by which part: "regime", or
    "margin" for the twelfth round's rule, :func:`choose`)."""
    passed = {n: v for n, v in regime_test(rows, default).items() if v[2] and n not in RECORD_ONLY}
    if passed:
        return max(passed, key=lambda n: (passed[n][0], -parts_on(n))), "regime"
    return choose(rows, default)[0], "margin"


CHALLENGER = "since_escape_batches"  # the eighth round's best, put to its held-out families


def confirm(scores, challenger=CHALLENGER, group="evaluation_9", seed_entry="seed_decay_growth_eval9"):
    """The eighth round's confirmation (docs/findings/whatif.md, "Eighth round", 3; written after
    its rule's result, before any held-out score was seen): H = the mean of ``group``'s ⅓(Spearman
    + norm sign + effect sign) and the seed target's mean ``right`` over ``seed_entry``'s runs.
    Returns (H of the default (``model``), H of ``challenger``, whether the challenger's is higher)
    from ``scores`` (``results/whatif_scores.json``'s dict)."""
    def held(name):
        pooled = scores[group]["pooled"][name]
        fork_term = float(np.nanmean([pooled[k] for k in SCORED]))
        seed_term = float(np.mean([run[name]["right"] for run in scores[seed_entry].values()]))
        return float(np.mean([fork_term, seed_term]))
    h_default, h_challenger = held("model"), held(challenger)
    return h_default, h_challenger, h_challenger > h_default


def score_candidate(name):
    """One candidate's row of :func:`main`: per data order and group its pooled scores, S, the
    regime groups' scores and the seed setting's terms (one thread; a worker process's task)."""
    import torch

    torch.set_num_threads(1)
    pr = candidates()[name]
    seeds = [seed_decay_growth({name: pr}, config=c) for c in seed_configs()]
    seed_right = float(np.mean([sd[name]["right"] for sd in seeds]))
    found = checks(tuple(dict.fromkeys(GROUPS + REGIME_GROUPS)))
    per_seed = {}
    for ds_seed in DATA_SEEDS:
        per_seed[ds_seed] = {}
        for group, items in found.items():
            parts = [check(run_dir, at, changes, n_windows=2, predictor=pr, data_seed=ds_seed).attrs["scores"]
                     for run_dir, at, changes in items.values()]
            per_seed[ds_seed][group] = {k: _weighted([p["model"] for p in parts], k) for k in KEYS}
    S = [rule_score(per_seed[d], seed_right) for d in DATA_SEEDS]
    return {"S": S, "score": float(np.mean(S)), "groups": per_seed,
            "regime": {d: {g: per_seed[d][g] for g in REGIME_GROUPS} for d in DATA_SEEDS},
            "seed_right": seed_right, "seed": [{k: sd[name][k] for k in ("predicted_growth", "right")} for sd in seeds],
            "seed_runs": [sd["run"] for sd in seeds], "seed_measured_growth": [sd["measured_growth"] for sd in seeds]}


def main(argv=()):
    import argparse
    from concurrent.futures import ProcessPoolExecutor

    ap = argparse.ArgumentParser(prog="python -m analyses whatif_forecast_choice")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(list(argv))
    if args.workers < 1:
        raise ValueError(f"workers={args.workers} is outside the valid range [1, inf)")
    names = list(candidates())
    # the forks exist before the pool starts (two workers must not run the same fork at once)
    for ds_seed in DATA_SEEDS:
        for items in checks(tuple(dict.fromkeys(GROUPS + REGIME_GROUPS))).values():
            for run_dir, at, changes in items.values():
                check(run_dir, at, changes, n_windows=2, predictor=nqm_predictor, data_seed=ds_seed)  # the cheapest
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        rows = dict(zip(names, pool.map(score_candidate, names)))
    for name, r in rows.items():
        g0 = r["groups"][0]
        print(f"{name:28s} S {r['S'][0]:.3f} / {r['S'][1]:.3f} (mean {r['score']:.3f}); " + "; ".join(
            f"{g[:12]} {g0[g]['corr_spearman']:.2f}/{g0[g]['norm_sign']:.2f}/{g0[g]['effect_sign']:.2f}"
            for g in GROUPS) + f"; seed right {r['seed_right']:.2f}", flush=True)
    first = rows[names[0]]
    chosen, how = choose_with_regime(rows)
    regime = regime_test(rows)
    out = {"command": "python -m analyses whatif_forecast_choice", "rule": __doc__.split("The rule. ")[1].split(
        "Writes")[0].strip(), "data_seeds": list(DATA_SEEDS),
           "candidates": {n: {k: v for k, v in r.items() if k not in ("seed_runs", "seed_measured_growth")}
                          for n, r in rows.items()},
           "seed_runs": first["seed_runs"], "seed_measured_growth": first["seed_measured_growth"],
           "regime_test": {n: {"mean_d": m, "se": se, "passes": ok} for n, (m, se, ok) in regime.items()},
           "margin": choose(rows)[1], "chosen_by": how, "chosen": chosen, "chosen_is_the_default": chosen == IN_USE}
    atomic_write_json(OUT, out)
    for n, (m, se, ok) in regime.items():
        print(f"regime test {n}: mean d {m:+.3f}, se {se:.3f}, {'passes' if ok else 'does not pass'}")
    print("margin", round(out["margin"], 4), "chosen:", chosen, f"(by the {how})",
          "(the default predictor)" if out["chosen_is_the_default"] else "(NOT the default predictor)")
    return 0
