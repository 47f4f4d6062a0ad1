"""The choice of the what-if curvature forecast (:mod:`experiments.whatif.curvature`), third
round (docs/findings/whatif.md, "Third round"). Written, rule included, before any candidate
of this round was scored; ``experiments/specs/whatif_eval3.toml`` and
``whatif_eval3_decay.toml`` (committed before this file) are held out and not read here.

Development, now every setting seen in the earlier rounds: the forks of
``whatif_seed_cnn.toml`` (step 400), ``whatif_eval.toml`` and ``whatif_eval2.toml`` (steps
300, 500; both have been scored and looked at, so neither is held out any more), and the seed
setting's growth after its step-1000 decay (``seed_cnn.toml``'s lr 0.03, momentum 0.9, seed
0). Each fork check is scored twice: on the forks of the scores and on replicate forks that
differ from them only in the data order (``RunConfig.fork_data_seed`` = 1; the noise
ceilings' forks, ``analyses/whatif_ceilings.py``).

The rule. Per candidate and data order, S = the mean of four terms: for each of the three
fork groups ½(pooled correlation Spearman + pooled norm-change sign) (the issue's two
targets), and the seed setting's fraction of layers whose growth has the right sign and a
size within ×1.5 (the issue's seed target; one run, the same in both orders). A candidate's
score is S averaged over the two data orders. The candidate with the highest score replaces
the default (the fixed curvature) only if it beats the default's score by more than twice
the default's data-order standard error, |S₀ − S₁|/2 (two replicates: the standard error of
their mean); otherwise the default stays. Ties go to fewer parts on.
The earlier forecast (the run-level cap whether or not the lr holds the curvature) is scored
for the record and is not a candidate.
Writes ``results/whatif_forecast_choice.json``:

    .venv/bin/python -m analyses whatif_forecast_choice     # minutes (the forks are in the store)
"""

import functools
from pathlib import Path

import numpy as np

from analyses.whatif_scores import KEYS, _weighted, checks, seed_decay_growth
from experiments.store import atomic_write_json
from experiments.whatif.check import check
from experiments.whatif.curvature import CurvatureForecast as CF
from experiments.whatif.predict import FORECAST, nqm_predictor

OUT = Path(__file__).resolve().parents[1] / "results" / "whatif_forecast_choice.json"
GROUPS = ("development", "evaluation_seen_during_development", "evaluation_new")
DATA_SEEDS = (0, 1)  # 0: the forks of the scores; 1: the replicate forks (another data order)
RECORD_ONLY = "cap=run noise (earlier forecast)"


def candidates():
    """name -> CurvatureForecast (None: the curvature held fixed)."""
    return {"fixed": None,
            "cap=sharpened noise": CF(level="sharpened"),
            "cap=relaxed noise": CF(level="relaxed"),
            RECORD_ONLY: CF(level="run")}


def parts_on(forecast):
    if forecast is None:
        return 0
    return sum((forecast.cap, forecast.noise, forecast.sharpening))


def rule_score(groups, seed_right):
    """S of the module docstring from {group: pooled scores} and the seed setting's ``right``."""
    terms = [0.5 * (groups[g]["corr_spearman"] + groups[g]["norm_sign"]) for g in GROUPS] + [seed_right]
    return float(np.mean(terms))


def choose(rows, forecasts, default="fixed"):
    """The rule of the module docstring over {name: {"score": mean S, "S": [S per data order]}}:
    (chosen name, the margin a candidate had to beat)."""
    s0, s1 = rows[default]["S"]
    margin = 2 * abs(s0 - s1) / 2
    ok = [n for n in rows if n != RECORD_ONLY]
    best = max(ok, key=lambda n: (rows[n]["score"], -parts_on(forecasts[n])))
    return (best if rows[best]["score"] - rows[default]["score"] > margin else default), margin


def main(argv=()):
    import torch

    torch.set_num_threads(1)
    forecasts = candidates()
    predictors = {n: functools.partial(nqm_predictor, curvature=fc) for n, fc in forecasts.items()}
    seed = seed_decay_growth(predictors)
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
        S = [rule_score(per_seed[d], seed[name]["right"]) for d in DATA_SEEDS]
        rows[name] = {"S": S, "score": float(np.mean(S)), "groups": per_seed, "seed": seed[name]}
        print(f"{name:34s} S {S[0]:.3f} / {S[1]:.3f} (mean {np.mean(S):.3f}); " + "; ".join(
            f"{g[:12]} {per_seed[0][g]['corr_spearman']:.2f}/{per_seed[0][g]['norm_sign']:.2f}" for g in GROUPS)
              + f"; seed right {seed[name]['right']:.2f}", flush=True)
    chosen, margin = choose(rows, forecasts)
    out = {"command": "python -m analyses whatif_forecast_choice", "rule": __doc__.split("The rule. ")[1].split(
        "Writes")[0].strip(), "data_seeds": list(DATA_SEEDS), "candidates": rows,
           "seed_measured_growth": seed["measured_growth"], "margin": margin, "chosen": chosen,
           "chosen_is_the_default": forecasts[chosen] == FORECAST}
    atomic_write_json(OUT, out)
    print("margin", round(margin, 4), "chosen:", chosen,
          "(the default FORECAST)" if out["chosen_is_the_default"] else "(NOT the default)")
    return 0
