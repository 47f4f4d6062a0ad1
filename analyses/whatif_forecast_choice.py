"""The choice of the what-if predictor (:mod:`experiments.whatif.predict`), sixteenth round
(docs/findings/whatif.md, "Sixteenth round"): model averaging over the bulk's future, chosen by a
paired test over the development families.

Candidates of this round (written here, with the development set and the rule below, before the
run of this file): the predictor in use since the fifteenth round (``bulk_trend_blend_small_loss``:
:func:`experiments.whatif.predict.default_predictor`; the default) and three that keep everything
of it but the bulk's curvature forecast, whose norm becomes the equal-weight geometric mean of the
norms under several forecasts (:mod:`experiments.whatif.bulk`, ``mix=``; the log10 update ratio
their mean): ``bulk_mix_held`` (the flow-time sharpening and the curvature held at k),
``bulk_mix_power`` (the flow-time sharpening and the power of τ with the summed trace's exponent)
and ``bulk_mix_power_held`` (all three). In the small-loss regime the reference level stays the
default's; only each change's effect is mixed there. Why: the three forecasts of the curvature
after k (it goes on sharpening at its rate since the first probe, it sharpens at a slowing rate, it
holds) are each the best of the three on the norm sign on some of the nineteen families scored so
far and the worst on others (``results/whatif_scores.json``, the pooled ``norm_sign`` of ``model``
(the flow-time sharpening in use), ``bulk_power_trace`` and ``fixed``: eval14 0.70 / 0.44 / 0.40,
eval18 0.58 / 0.80 / 0.80, eval7 0.71 / 0.83 / 0.83, eval3 0.88 / 0.88 / 0.47), and no rule before
k has told them apart in fifteen rounds. Equal weights: the combination of forecasts from models
whose errors differ errs less than the average model, and estimated weights seldom beat equal ones
out of sample (Bates & Granger 1969, "The combination of forecasts"; Smith & Wallis 2009, "A
simple explanation of the forecast combination puzzle"); no weight is fitted. Nothing of the mixes
was run before this file was written (the numbers above are the record of earlier rounds).
``experiments/specs/whatif_eval19.toml`` (a GRU reading MNIST-1D as a 40-step sequence, a kind not
among the development families) and ``whatif_eval19_decay.toml`` (the seed setting, seed 19) were
committed before the candidates (their runs and forks were made, not looked at, while the
candidates were written) and are held out, not read here.

Development: nineteen fork groups, the fifteenth round's eighteen (the forks of
``whatif_seed_cnn.toml`` at step 400, ``whatif_eval.toml``, ``whatif_eval2.toml`` and
``whatif_eval4.toml`` at 300 and 500, ``whatif_eval3.toml`` and ``whatif_eval5.toml`` to
``whatif_eval17.toml`` at 200 and 400) and the family held out there, scored once and seen since
(``whatif_eval18.toml``, at 200 and 400); and the seed setting's growth after its step-1000 decay on
its twenty runs (``seed_cnn.toml``'s lr 0.03, momentum 0.9, seed 0, and the runs of
``whatif_eval3_decay.toml``, ``whatif_eval4_decay.toml``, ``whatif_eval8_decay.toml``,
``whatif_eval9_decay.toml``, ``whatif_eval11_decay.toml`` and ``whatif_eval14_decay.toml`` to
``whatif_eval18_decay.toml``). Each fork check is scored twice: on the forks of the scores and on
replicate forks that differ from them only in the data order (``RunConfig.fork_data_seed`` = 1).

The rule. Two parts. (1) The twelfth round's S: per candidate and data order, the mean of twenty
terms (for each of the nineteen development fork groups the mean of its pooled correlation
Spearman, norm-change sign, effect sign and share of norm growths within ×1.5, those defined; and
the seed setting's fraction of layers right, the mean over its twenty runs); the score is S
averaged over the two data orders. (2) The family test, paired: for each development fork group g,
d_g = the candidate's mean of the four terms minus the default's, averaged over the two data
orders (nineteen units: a held-out family is a new draw of a family, so the gain to expect on it
is the mean of d over families, and its standard error is over families). A candidate passes if
the mean of d_g exceeds twice its standard error (sd(d_g)/√19, sd with one degree of freedom less)
and its score (1) is not below the default's. The passing candidate with the largest mean d
replaces the default (ties go to fewer parts, ``bulk_trend_blend_small_loss`` < ``bulk_mix_held`` <
``bulk_mix_power`` < ``bulk_mix_power_held``); if none passes, the default stays. The held-out
families (eval19, the two seed-19 runs) are then scored once, with every candidate and both
no-theory baselines beside the one chosen, for the record; no second test on them is made.
Writes ``results/whatif_forecast_choice.json`` (the candidates are scored in ``--workers``
processes, default 2, one candidate each at a time):

    .venv/bin/python -m analyses whatif_forecast_choice     # ~65 min on two cores (runs and forks present)

Result (run after the candidates and the rule were committed, on a store regenerated from scratch):
S (mean of the two data orders) 0.697 for the default, 0.708 ``bulk_mix_held``, 0.709
``bulk_mix_power``, 0.713 ``bulk_mix_power_held``; family test mean d (SE) +0.012 (0.005), +0.012
(0.003), +0.017 (0.006): all three pass; ``bulk_mix_power_held`` has the largest mean d and becomes
the predictor in use (``results/whatif_forecast_choice.json``). That store was made on a machine
whose kernels give other trajectories than the stores of every other round: on this project's
usual machine the difference is +0.013 (SE 0.007) over 15 of the 19 groups, order 0
(``analyses/whatif_machines.py``; docs/findings/whatif.md, "Seventeenth round").

The fifteenth round's choice (the two-part rule with the small-loss regime's paired test on eval8,
eval12, eval16 and eval17; ``bulk_trend_blend_small_loss`` replaced ``bulk_loss_level``) is in
docs/findings/whatif.md, "Fifteenth round", and in the git history of this file.
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
          "evaluation_17", "evaluation_18")
DATA_SEEDS = (0, 1)  # 0: the forks of the scores; 1: the replicate forks (another data order)
DEFAULT = "bulk_trend_blend_small_loss"  # the predictor in use when this round ran
RECORD_ONLY = ()  # record-only rows (never chosen); none this round
PARTS = {"bulk_trend_blend_small_loss": 6, "bulk_mix_held": 6.5, "bulk_mix_power": 6.6, "bulk_mix_power_held": 7}
SEED_DECAY_SPECS = ("whatif_eval3_decay", "whatif_eval4_decay", "whatif_eval8_decay", "whatif_eval9_decay",
                    "whatif_eval11_decay", "whatif_eval14_decay", "whatif_eval15_decay", "whatif_eval16_decay",
                    "whatif_eval17_decay", "whatif_eval18_decay")
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
    :data:`SEED_DECAY_SPECS`."""
    return [seed_config(), *(c for name in SEED_DECAY_SPECS for c in expand(load_spec(SPECS_DIR / f"{name}.toml")))]


def rule_score(groups, seed_right):
    """S of the module docstring from {group: pooled scores} and the seed setting's ``right``."""
    terms = [float(np.nanmean([groups[g][k] for k in RULE_TERMS])) for g in GROUPS] + [seed_right]
    return float(np.mean(terms))


def group_term(scores):
    """A fork group's term of S: the mean of the :data:`RULE_TERMS` defined."""
    return float(np.nanmean([scores[k] for k in RULE_TERMS]))


def family_test(rows, default=DEFAULT):
    """Part (2) of the rule over {name: {"groups": {order: {group: pooled scores}}, "score": mean S}}:
    {name: (mean d, its standard error over the groups, passes)} for every candidate but the default."""
    out = {}
    for name, r in rows.items():
        if name == default:
            continue
        d = np.array([np.mean([group_term(r["groups"][o][g]) - group_term(rows[default]["groups"][o][g])
                               for o in r["groups"]]) for g in GROUPS])
        se = float(np.std(d, ddof=1) / np.sqrt(d.size))
        mean = float(np.mean(d))
        out[name] = (mean, se, bool(mean > 2 * se and r["score"] >= rows[default]["score"]))
    return out


def choose(rows, default=DEFAULT):
    """The rule of the module docstring: the passing candidate with the largest mean d (ties: fewer
    parts), else the default."""
    passed = {n: v for n, v in family_test(rows, default).items() if v[2] and n not in RECORD_ONLY}
    return max(passed, key=lambda n: (passed[n][0], -parts_on(n))) if passed else default


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
    seed setting's terms (one thread; a worker process's task)."""
    import torch

    torch.set_num_threads(1)
    pr = candidates()[name]
    seeds = [seed_decay_growth({name: pr}, config=c) for c in seed_configs()]
    seed_right = float(np.mean([sd[name]["right"] for sd in seeds]))
    found = checks(GROUPS)
    per_seed = {}
    for ds_seed in DATA_SEEDS:
        per_seed[ds_seed] = {}
        for group, items in found.items():
            parts = [check(run_dir, at, changes, n_windows=2, predictor=pr, data_seed=ds_seed).attrs["scores"]
                     for run_dir, at, changes in items.values()]
            per_seed[ds_seed][group] = {k: _weighted([p["model"] for p in parts], k) for k in KEYS}
    S = [rule_score(per_seed[d], seed_right) for d in DATA_SEEDS]
    return {"S": S, "score": float(np.mean(S)), "groups": per_seed, "seed_right": seed_right, "seed": [{k: sd[name][k] for k in ("predicted_growth", "right")} for sd in seeds],
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
        for items in checks(GROUPS).values():
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
    chosen = choose(rows)
    test = family_test(rows)
    out = {"command": "python -m analyses whatif_forecast_choice", "rule": __doc__.split("The rule. ")[1].split(
        "Writes")[0].strip(), "data_seeds": list(DATA_SEEDS),
           "candidates": {n: {k: v for k, v in r.items() if k not in ("seed_runs", "seed_measured_growth")}
                          for n, r in rows.items()},
           "seed_runs": first["seed_runs"], "seed_measured_growth": first["seed_measured_growth"],
           "family_test": {n: {"mean_d": m, "se": se, "passes": ok} for n, (m, se, ok) in test.items()},
           "chosen": chosen, "chosen_is_the_default": chosen == IN_USE}
    atomic_write_json(OUT, out)
    for n, (m, se, ok) in test.items():
        print(f"family test {n}: mean d {m:+.3f}, se {se:.3f}, {'passes' if ok else 'does not pass'}")
    print("chosen:", chosen, "(the default predictor)" if out["chosen_is_the_default"] else "(NOT the default predictor)")
    return 0
