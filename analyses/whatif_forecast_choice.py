"""The choice of the what-if predictor (:mod:`experiments.whatif.predict`), seventh round
(docs/findings/whatif.md, "Seventh round"), by the rule of the third to sixth rounds with the
development settings extended to every setting seen so far.

Candidates of this round (written here, with the development set below, before any was scored
on a check or on the seed setting): the predictor in use (``escape_drift``: the plateau-escape
forecast under the flow-time post-escape norm drift, :func:`experiments.whatif.predict.default_predictor`;
the default) with, under the same drift, the progressive sharpening after an lr *decrease*
(:mod:`experiments.whatif.sharpen`: from a plan's first step whose lr is below the lr before k,
λ_max rises at the run's own flow-time sharpening rate measured on its probes below the edge
before k, continued in the new flow time; acting only on plans with an lr decrease inside the
horizon, every other plan's prediction the predictor in use's to the bit), capped at the new
method's edge (``sharpen_decay``, C1) or at the run's own level h̄ carried to the new lr
(``sharpen_decay_run``, C2: a decrease × f lets λ_max rise at most × 1/f). The earlier rounds'
candidates were rejected by this rule and are not candidates again.
``experiments/specs/whatif_eval8.toml`` and ``whatif_eval8_decay.toml`` (committed before any run
of them) are held out and not read here.

Development, every setting seen in the earlier rounds, eight fork groups: the forks of
``whatif_seed_cnn.toml`` (step 400), ``whatif_eval.toml`` and ``whatif_eval2.toml`` (steps
300, 500), ``whatif_eval3.toml`` (steps 200, 400), ``whatif_eval4.toml`` (steps 300, 500),
``whatif_eval5.toml``, ``whatif_eval6.toml`` and ``whatif_eval7.toml`` (steps 200, 400; eval7 held
out in the sixth round, scored once there, development since), and the seed setting's growth after
its step-1000 decay on the four runs seen: ``seed_cnn.toml``'s lr 0.03, momentum 0.9, seed 0,
``whatif_eval3_decay.toml``'s seed 3, lr 0.03 and 0.1, and ``whatif_eval4_decay.toml``'s seed
4, lr 0.05. Each fork check is scored twice: on the forks of the scores and on replicate forks
that differ from them only in the data order (``RunConfig.fork_data_seed`` = 1; the noise
ceilings' forks, ``analyses/whatif_ceilings.py``).

The rule. Per candidate and data order, S = the mean of nine terms: for each of the eight fork
groups ½(pooled correlation Spearman + pooled norm-change sign) (the issue's two targets), and
the seed setting's fraction of layers whose growth has the right sign and a size within ×1.5
(the issue's seed target; the mean over its four runs, the same in both orders). A
candidate's score is S averaged over the two data orders. The candidate with the highest score
replaces the default (``escape_drift``) only if it beats the default's score by more than twice the
default's data-order standard error, |S₀ − S₁|/2 (two replicates: the standard error of their
mean); otherwise the default stays. Ties go to fewer parts (``escape_drift`` < ``sharpen_decay``
< ``sharpen_decay_run``: the run's level assumes more than the method's edge).
Writes ``results/whatif_forecast_choice.json``:

    .venv/bin/python -m analyses whatif_forecast_choice     # minutes (the forks are in the store)

Result (run after this file was committed): ``sharpen_decay_run`` 0.690 and ``sharpen_decay`` 0.687
beat the default's 0.594 by more than the margin 0.025; ``sharpen_decay_run`` is the predictor in
use since (:data:`experiments.whatif.predict.PREDICTOR`; the rule's ``escape_drift`` stays the
sixth round's predictor it was written against).
"""

from pathlib import Path

import numpy as np

from analyses.whatif_scores import CANDIDATES, IN_USE, KEYS, _weighted, checks, seed_config, seed_decay_growth
from experiments.store import atomic_write_json
from experiments.sweeps import SPECS_DIR, expand, load_spec
from experiments.whatif.check import check

OUT = Path(__file__).resolve().parents[1] / "results" / "whatif_forecast_choice.json"
GROUPS = ("development", "evaluation_seen_during_development", "evaluation_new", "evaluation_3", "evaluation_4",
          "evaluation_5", "evaluation_6", "evaluation_7")
DATA_SEEDS = (0, 1)  # 0: the forks of the scores; 1: the replicate forks (another data order)
DEFAULT = "escape_drift"  # the predictor in use (experiments.whatif.predict.default_predictor)
RECORD_ONLY = ()  # record-only rows (never chosen); none this round
PARTS = {"escape_drift": 2, "sharpen_decay": 3, "sharpen_decay_run": 3.5}


def candidates():
    """name -> predictor (``escape_drift``: the flow-time drift on the plateau-escape forecast, the
    predictor in use; ``sharpen_decay`` / ``sharpen_decay_run``: the same drift on
    :func:`experiments.whatif.sharpen.predictor` with the cap at the new edge / at the run's level)."""
    return {name: CANDIDATES[name] for name in ("escape_drift", "sharpen_decay", "sharpen_decay_run")}


def parts_on(name):
    return PARTS[name]


def seed_configs():
    """The seed setting's runs seen so far: seed_cnn.toml's (seed 0), whatif_eval3_decay.toml's and
    whatif_eval4_decay.toml's."""
    return [seed_config(), *expand(load_spec(SPECS_DIR / "whatif_eval3_decay.toml")),
            *expand(load_spec(SPECS_DIR / "whatif_eval4_decay.toml"))]


def rule_score(groups, seed_right):
    """S of the module docstring from {group: pooled scores} and the seed setting's ``right``."""
    terms = [0.5 * (groups[g]["corr_spearman"] + groups[g]["norm_sign"]) for g in GROUPS] + [seed_right]
    return float(np.mean(terms))


def choose(rows, default=DEFAULT):
    """The rule of the module docstring over {name: {"score": mean S, "S": [S per data order]}}:
    (chosen name, the margin a candidate had to beat)."""
    s0, s1 = rows[default]["S"]
    margin = 2 * abs(s0 - s1) / 2
    ok = [n for n in rows if n not in RECORD_ONLY]
    best = max(ok, key=lambda n: (rows[n]["score"], -parts_on(n)))
    return (best if rows[best]["score"] - rows[default]["score"] > margin else default), margin


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
