"""The choice of the what-if predictor (:mod:`experiments.whatif.predict`), fourteenth round
(docs/findings/whatif.md, "Fourteenth round"): the twelfth round's rule on the same development
settings, and a paired rule on the small-loss regime's checks.

Candidates of this round (written here, with the development set and the rules below, before the
run of this file): the predictor in use since the eleventh round (``bulk_sharpening``: ρ from the
seventh round's predictor, the norm and the update ratio from the NQM under the flow-time
sharpening of the whole spectrum and the noise at λ_max's rate since the first probe;
:func:`experiments.whatif.predict.default_predictor`; the default) and two that differ from it only
in the *small-loss regime* (a cross-entropy run whose mean training loss over the window before k
is below 0.2 nats and falling; :mod:`experiments.whatif.bulk`): ``bulk_loss`` (there the bulk and
the noise follow the loss as a power of each plan's flow time, ``rate="loss"``) and
``bulk_loss_level`` (there the loss model's reference plan times the default's effect of each plan
over it, ``rate="loss_level"``). Outside the regime both are the default to the bit
(tests/test_whatif_bulk_sharpening.py). Why: in the thirteenth round the checks below 0.2 nats
(eval8, eval12, eval16) got the norm sign on 0.56 of the checks from the default and on 0.78 from
the fixed curvature (``python -m analyses whatif_loss_regime``). Looked at before this file was
written, in the first data order only (scratch runs, not kept), the four-term group mean, default /
``bulk_loss`` / ``bulk_loss_level``: eval8 0.291 / 0.459 / 0.425, eval12 0.454 / 0.360 / 0.469,
eval16 0.390 / 0.387 / 0.557; the development group the same for all three.
``experiments/specs/whatif_eval17.toml`` (a tanh MLP on digits, a family of the small-loss kind)
and ``whatif_eval17_decay.toml`` (the seed setting, seed 17) were committed before the candidates
(their runs and eval17's forks were made, not looked at, while the candidates were written) and are
held out, not read here.

Development: the eleventh round's thirteen fork groups (the forks of ``whatif_seed_cnn.toml`` at
step 400, ``whatif_eval.toml``, ``whatif_eval2.toml`` and ``whatif_eval4.toml`` at 300 and 500,
``whatif_eval3.toml`` and ``whatif_eval5.toml`` to ``whatif_eval12.toml`` at 200 and 400) and the
seed setting's growth after its step-1000 decay on its ten runs (``seed_cnn.toml``'s lr 0.03,
momentum 0.9, seed 0, and the runs of ``whatif_eval3_decay.toml``, ``whatif_eval4_decay.toml``,
``whatif_eval8_decay.toml``, ``whatif_eval9_decay.toml`` and ``whatif_eval11_decay.toml``). Each
fork check is scored twice: on the forks of the scores and on replicate forks that differ from them
only in the data order (``RunConfig.fork_data_seed`` = 1).

The rule. Two parts, over candidates that equal the default outside the small-loss regime.
(1) The twelfth round's S: per candidate and data order, the mean of fourteen terms (for each of the
thirteen development fork groups the mean of its pooled correlation Spearman, norm-change sign,
effect sign and share of norm growths within ×1.5, those defined; and the seed setting's fraction of
layers right, the mean over its ten runs); the score is S averaged over the two data orders.
(2) The regime test, paired: the regime groups are eval8, eval12 and eval16 (every check of theirs
is in the regime; eval16 was held out in the thirteenth round and scored once there, and has
replicate forks from its noise ceilings). For each regime group and data order (six units), d = the
candidate's mean of the four terms minus the default's. A candidate passes if the mean of d exceeds
twice its standard error (sd(d)/√6, sd with one degree of freedom less) and its score (1) is not
below the default's. The passing candidate with the largest mean d replaces the default (ties go to
fewer parts, ``bulk_sharpening`` < ``bulk_loss`` < ``bulk_loss_level``); if none passes, the
twelfth round's rule on (1) decides (a candidate replaces the default only if its score beats the
default's by more than twice the default's data-order standard error). The held-out families
(eval17, the two seed-17 runs) are then scored once, with every candidate and both no-theory
baselines beside the one chosen, for the record; no second test on them is made. Why the paired
part: the twelfth round's margin is the default's own data-order noise over every group, which a
candidate that changes nothing outside two of them cannot beat whatever it does there, and the
paired difference cancels the noise the two share.
Writes ``results/whatif_forecast_choice.json``:

    .venv/bin/python -m analyses whatif_forecast_choice     # ~25 min

Result (run after this file was committed; ``results/whatif_forecast_choice.json``): S, the default
0.686 / 0.714 (mean 0.700), ``bulk_loss`` 0.691 / 0.710 (0.700), ``bulk_loss_level`` 0.696 / 0.723
(0.710); the seed term 0.71 for all three (the seed runs are outside the regime). The regime test:
``bulk_loss`` mean d −0.012 (SE 0.045), does not pass; ``bulk_loss_level`` mean d +0.094 (SE 0.028),
passes. **``bulk_loss_level`` replaces the default** (the twelfth round's margin, 0.028, it would not
have beaten: +0.010).
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
DEFAULT = "bulk_sharpening"  # the predictor in use when this round ran (since then: bulk_loss_level)
RECORD_ONLY = ()  # record-only rows (never chosen); none this round
PARTS = {"bulk_sharpening": 4, "bulk_loss": 4.5, "bulk_loss_level": 5}
REGIME_GROUPS = ("evaluation_8", "evaluation_12", "evaluation_16")  # the small-loss regime (rule part 2)
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
    """The fourteenth round's rule (module docstring): (chosen name, by which part: "regime", or
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


def main(argv=()):
    import torch

    torch.set_num_threads(1)
    predictors = candidates()
    seeds = [seed_decay_growth(predictors, config=c) for c in seed_configs()]
    seed_right = {n: float(np.mean([sd[n]["right"] for sd in seeds])) for n in predictors}
    found = checks(tuple(dict.fromkeys(GROUPS + REGIME_GROUPS)))
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
        regime = {d: {g: per_seed[d][g] for g in REGIME_GROUPS} for d in DATA_SEEDS}
        rows[name] = {"S": S, "score": float(np.mean(S)), "groups": per_seed, "regime": regime,
                      "seed_right": seed_right[name],
                      "seed": [{k: sd[name][k] for k in ("predicted_growth", "right")} for sd in seeds]}
        print(f"{name:20s} S {S[0]:.3f} / {S[1]:.3f} (mean {np.mean(S):.3f}); " + "; ".join(
            f"{g[:12]} {per_seed[0][g]['corr_spearman']:.2f}/{per_seed[0][g]['norm_sign']:.2f}"
            f"/{per_seed[0][g]['effect_sign']:.2f}" for g in GROUPS) + f"; seed right {seed_right[name]:.2f}",
              flush=True)
    chosen, how = choose_with_regime(rows)
    regime = regime_test(rows)
    out = {"command": "python -m analyses whatif_forecast_choice", "rule": __doc__.split("The rule. ")[1].split(
        "Writes")[0].strip(), "data_seeds": list(DATA_SEEDS), "candidates": rows,
           "seed_runs": [sd["run"] for sd in seeds], "seed_measured_growth": [sd["measured_growth"] for sd in seeds],
           "regime_test": {n: {"mean_d": m, "se": se, "passes": ok} for n, (m, se, ok) in regime.items()},
           "margin": choose(rows)[1], "chosen_by": how, "chosen": chosen, "chosen_is_the_default": chosen == IN_USE}
    atomic_write_json(OUT, out)
    for n, (m, se, ok) in regime.items():
        print(f"regime test {n}: mean d {m:+.3f}, se {se:.3f}, {'passes' if ok else 'does not pass'}")
    print("margin", round(out["margin"], 4), "chosen:", chosen, f"(by the {how})",
          "(the default predictor)" if out["chosen_is_the_default"] else "(NOT the default predictor)")
    return 0
