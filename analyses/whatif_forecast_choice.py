"""The choice of the what-if predictor (:mod:`experiments.whatif.predict`), thirteenth round
(docs/findings/whatif.md, "Thirteenth round"), by the twelfth round's rule, on the same development
settings.

Candidates of this round (written here, with the development set and the rule below, before the
run of this file): the predictor in use since the eleventh round (``bulk_sharpening``: ρ from the
seventh round's predictor, the norm and the update ratio from the NQM under the flow-time
sharpening of the whole spectrum and the noise at λ_max's rate since the first probe;
:func:`experiments.whatif.predict.default_predictor`; the default) and three with the bulk
sharpening as a power of the flow time, λ(τ) = λ_k (τ/τ_k)^b (:mod:`experiments.whatif.bulk`):
``bulk_power`` (b from λ_max, ``rate="power"``), ``bulk_power_trace`` (b from the summed Hessian
trace, ``rate="power_trace"``) and ``bulk_power_released`` (the power where the plan keeps the lr,
λ_max's rate since the first probe where it lowers it, ``rate="power_released"``). Why: the
twelfth round left the default's sizes ×5–14 where the forks grew ×0.6–1.4, and on the development
runs' own probes λ_max's rate since the first probe overforecasts log λ_max 200 steps on by a median
1.51, a power of τ by 0.18 (``python -m analyses whatif_rate_forms``). Looked at before this file was
written, on the development set in the first data order only (scratch runs, not kept): the mean of
the thirteen groups' four terms was 0.683 (default), 0.701 (``bulk_power``), 0.709
(``bulk_power_trace``), 0.688 (``bulk_power_released``), and the seed term 0.71, 0.47, 0.41, 0.71.
``experiments/specs/whatif_eval16.toml`` and ``whatif_eval16_decay.toml`` (committed before any run
of them; their runs were made, not looked at, while the candidates were written) are held out and
not read here. eval13, eval14 and eval15 (held out in the eleventh and twelfth rounds, scored once
there) and the seed-14 and seed-15 runs are not in the development set: they have no replicate
forks, and the development set is kept the twelfth round's so that the two rounds' scores compare.

Development: the eleventh round's thirteen fork groups (the forks of ``whatif_seed_cnn.toml`` at
step 400, ``whatif_eval.toml``, ``whatif_eval2.toml`` and ``whatif_eval4.toml`` at 300 and 500,
``whatif_eval3.toml`` and ``whatif_eval5.toml`` to ``whatif_eval12.toml`` at 200 and 400) and the
seed setting's growth after its step-1000 decay on its ten runs (``seed_cnn.toml``'s lr 0.03,
momentum 0.9, seed 0, and the runs of ``whatif_eval3_decay.toml``, ``whatif_eval4_decay.toml``,
``whatif_eval8_decay.toml``, ``whatif_eval9_decay.toml`` and ``whatif_eval11_decay.toml``). Each
fork check is scored twice: on the forks of the scores and on replicate forks that differ from them
only in the data order (``RunConfig.fork_data_seed`` = 1).

The rule. (The twelfth round's.) Per candidate and data order, S = the mean of fourteen terms: for
each of the thirteen fork groups the mean of its pooled correlation Spearman, pooled norm-change
sign, pooled effect sign and pooled share of norm growths within ×1.5 of the fork's (those of the
four that are defined), and the seed setting's fraction of layers whose growth has the right sign
and a size within ×1.5 (the mean over its ten runs, the same in both orders). A candidate's score is
S averaged over the two data orders. The candidate with the highest score replaces the default
(``bulk_sharpening``) only if it beats the default's score by more than twice the default's
data-order standard error, |S₀ − S₁|/2; otherwise the default stays. Ties go to fewer parts
(``bulk_sharpening`` = ``bulk_power`` < ``bulk_power_trace`` < ``bulk_power_released``). The
held-out families (eval16, the two seed-16 runs) are then scored once, with every candidate and both
no-theory baselines beside the one chosen, for the record; no second test on them is made.
Writes ``results/whatif_forecast_choice.json``:

    .venv/bin/python -m analyses whatif_forecast_choice     # ~27 min

Result (run after this file was committed; ``results/whatif_forecast_choice.json``): the default
0.686 / 0.714 (mean 0.700); ``bulk_power`` 0.685 / 0.704 (0.694; seed term 0.47), ``bulk_power_trace``
0.688 / 0.707 (0.697; seed term 0.41), ``bulk_power_released`` 0.690 / 0.713 (0.701; seed term 0.71).
The margin is 0.028: **the default stays.**
"""

from pathlib import Path

import numpy as np

from analyses.whatif_scores import CANDIDATES, IN_USE, KEYS, _weighted, checks, seed_config, seed_decay_growth
from experiments.store import atomic_write_json
from experiments.sweeps import SPECS_DIR, expand, load_spec
from experiments.whatif.check import check

OUT = Path(__file__).resolve().parents[1] / "results" / "whatif_forecast_choice.json"
GROUPS = ("development", "evaluation_seen_during_development", "evaluation_new", "evaluation_3", "evaluation_4",
          "evaluation_5", "evaluation_6", "evaluation_7", "evaluation_8", "evaluation_9", "evaluation_10",
          "evaluation_11", "evaluation_12")
DATA_SEEDS = (0, 1)  # 0: the forks of the scores; 1: the replicate forks (another data order)
DEFAULT = "bulk_sharpening"  # the predictor in use (experiments.whatif.predict.default_predictor)
RECORD_ONLY = ()  # record-only rows (never chosen); none this round
PARTS = {"bulk_sharpening": 4, "bulk_power": 4, "bulk_power_trace": 4.5, "bulk_power_released": 5}
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
    whatif_eval{3,4,8,9,11}_decay.toml."""
    return [seed_config(), *(c for name in ("whatif_eval3_decay", "whatif_eval4_decay", "whatif_eval8_decay",
                                            "whatif_eval9_decay", "whatif_eval11_decay")
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


def main(argv=()):
    import torch

    torch.set_num_threads(1)
    predictors = candidates()
    seeds = [seed_decay_growth(predictors, config=c) for c in seed_configs()]
    seed_right = {n: float(np.mean([sd[n]["right"] for sd in seeds])) for n in predictors}
    found = checks(GROUPS)
    rows = {}
    for name, pr in predictors.items():
        per_seed = {}
        for ds_seed in DATA_SEEDS:
            per_seed[ds_seed] = {}
            for group, items in found.items():
                parts = [check(run_dir, at, changes, n_windows=2, predictor=pr, data_seed=ds_seed).attrs["scores"]
                         for run_dir, at, changes in items.values()]
                per_seed[ds_seed][group] = {k: _weighted([p["model"] for p in parts], k) for k in KEYS}
        S = [rule_score(per_seed[d], seed_right[name]) for d in DATA_SEEDS]
        rows[name] = {"S": S, "score": float(np.mean(S)), "groups": per_seed, "seed_right": seed_right[name],
                      "seed": [{k: sd[name][k] for k in ("predicted_growth", "right")} for sd in seeds]}
        print(f"{name:20s} S {S[0]:.3f} / {S[1]:.3f} (mean {np.mean(S):.3f}); " + "; ".join(
            f"{g[:12]} {per_seed[0][g]['corr_spearman']:.2f}/{per_seed[0][g]['norm_sign']:.2f}"
            f"/{per_seed[0][g]['effect_sign']:.2f}" for g in GROUPS) + f"; seed right {seed_right[name]:.2f}",
              flush=True)
    chosen, margin = choose(rows)
    out = {"command": "python -m analyses whatif_forecast_choice", "rule": __doc__.split("The rule. ")[1].split(
        "Writes")[0].strip(), "data_seeds": list(DATA_SEEDS), "candidates": rows,
           "seed_runs": [sd["run"] for sd in seeds], "seed_measured_growth": [sd["measured_growth"] for sd in seeds],
           "margin": margin, "chosen": chosen, "chosen_is_the_default": chosen == IN_USE}
    atomic_write_json(OUT, out)
    print("margin", round(margin, 4), "chosen:", chosen,
          "(the default predictor)" if out["chosen_is_the_default"] else "(NOT the default predictor)")
    return 0
