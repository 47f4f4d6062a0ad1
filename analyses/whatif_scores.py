"""Scores of the what-if predictions (issue 15; docs/findings/whatif.md) on the development
setting (``experiments/specs/whatif_seed_cnn.toml``, HB 0.05 / 0.9, step 400, the setting the
first model choices were made on), on the settings seen during development
(``experiments/specs/whatif_eval.toml``: NAG 0.02 / 0.6, HB 0.1 / 0.6, NAG 0.05 / 0.9, seed 1;
steps 300 and 500), on the second evaluation settings (``experiments/specs/whatif_eval2.toml``:
NAG 0.01 / 0.5, HB 0.2 / 0.5, NAG 0.03 / 0.8, seed 2; steps 300 and 500; scored once in the
second round, development since), on the third (``experiments/specs/whatif_eval3.toml``: HB
0.03 / 0.8, NAG 0.1 / 0.5, HB 0.01 / 0.95, NAG 0.02 / 0.3, seed 3; steps 200 and 400; held out
in the third round, development since), on the fourth, held out in the fourth round
(``experiments/specs/whatif_eval4.toml``: HB 0.02 / 0.9, NAG 0.05 / 0.7, HB 0.07 / 0.7, seed 4,
constant lr; steps 300 and 500; held out in the fourth round, development since), on the fifth,
held out in the fifth round (``experiments/specs/whatif_eval5.toml``: a tanh MLP (64, 64, 64) on
MNIST-1D, HB 0.02 / 0.9, NAG 0.05 / 0.8, HB 0.1 / 0.5, seed 5, constant lr; steps 200 and 400)
on the sixth (``experiments/specs/whatif_eval6.toml``: the seed CNN at batch 64, HB 0.015 /
0.9, NAG 0.02 / 0.8, HB 0.06 / 0.5, seed 6, constant lr; steps 200 and 400; held out in the fifth
round, development since), on the seventh, held out in the sixth round
(``experiments/specs/whatif_eval7.toml``: a ResNet of width 8 with BatchNorm on MNIST-1D, HB 0.03 /
0.9, NAG 0.05 / 0.7, HB 0.1 / 0.6, seed 7, constant lr; steps 200 and 400; development since the
seventh round), on the eighth, held out in the seventh round (``experiments/specs/whatif_eval8.toml``:
a ReLU MLP (128, 64) on scikit-learn's digits, HB 0.05 / 0.9, NAG 0.1 / 0.8, HB 0.2 / 0.5, seed 8,
constant lr; steps 200 and 400; development since the eighth round), on the ninth, held out in the
eighth round (``experiments/specs/whatif_eval9.toml``: a transformer language model (2 blocks, dim
32) on pytext, HB 0.03 / 0.9, NAG 0.1 / 0.8, HB 0.3 / 0.5, seed 9, constant lr; steps 200 and
400; development since the ninth round), on the tenth, held out in the ninth round
(``experiments/specs/whatif_eval10.toml``: a GRU language model (hidden 32) on pytext, HB 0.1 / 0.9,
NAG 0.3 / 0.8, HB 1.0 / 0.5, seed 10, constant lr; steps 200 and 400; development since the tenth
round), on the eleventh (``whatif_eval11.toml``: a 2-D GELU seed CNN on digits; partly seen in the
tenth round) and the twelfth, held out in the tenth round (``whatif_eval12.toml``: a 2-D GELU
ResNet on digits), both steps 200 and 400, and, in the seed setting
(``experiments/specs/seed_cnn.toml``'s run lr 0.03, momentum 0.9, seed 0, one thread; a development
setting), the per-layer norm growth
after the step-1000 decay predicted at step 1000 (and on the runs of
``experiments/specs/whatif_eval3_decay.toml``: seed 3, lr 0.03 and 0.1, seen since the third
round, the run of ``whatif_eval4_decay.toml``: seed 4, lr 0.05, held out in the fourth round, and
the runs of ``whatif_eval8_decay.toml``: seed 8, lr 0.02 and 0.07, held out in the seventh round,
of ``whatif_eval9_decay.toml``: seed 9, lr 0.04 and 0.06, held out in the eighth, and of
``whatif_eval11_decay.toml``: seed 11, lr 0.025 and 0.085, held out in the tenth).
``model`` is the predictor in use (:data:`experiments.whatif.predict.PREDICTOR`; since the fifteenth
round ``bulk_trend_blend_small_loss``, below; ``bulk_loss_level`` in the fourteenth; ``bulk_sharpening``
from the eleventh to the fourteenth; ``sharpen_decay_run`` from the seventh to the eleventh;
``escape_drift`` in the sixth); beside it, on the same cases, those of the other candidates:
``fixed`` (the link's NQM with the curvature held fixed, anchored on window 0; the default until
the sixth round), ``delta_persistence`` / ``delta_trend``
(:mod:`experiments.whatif.delta`: the unchanged run forecast by persistence / by its flow-time
trend, times the model's effect of the change; fourth-round candidates), ``sharpening`` (the
stochastic-edge cap with the flow-time sharpening rate on; second round), ``sharpened_cap`` (the
run-level cap gated on the curvature having left its initial value; third round), ``escape``
(the fixed curvature with the plateau-escape forecast, :mod:`experiments.whatif.escape`; fifth
round), ``drift_steps`` / ``drift_flow`` (the default with the unchanged run's post-escape norm
drift continued in steps / flow time, :mod:`experiments.whatif.drift`; sixth round),
``escape_drift`` (the flow-time drift on the escape forecast; sixth round), ``sharpen_decay`` /
``sharpen_decay_run`` (the same drift on the progressive sharpening after an lr decrease, capped at
the new edge / at the run's level, :mod:`experiments.whatif.sharpen`; seventh round),
``since_escape_drift`` / ``since_escape_batches`` (the predictor in use with the drift's gate (a')
and, for the second, its batch-means fit (b'), :mod:`experiments.whatif.drift`; eighth round),
``escape_since_escape_batches`` (the same gate and fit on the escape forecast alone, without the
sharpening; eighth round), ``held_cap`` / ``held_cap_since_escape`` (the predictor in use, and the
same with the drift's gate (a') and fit (b'), with the held level after a change that lowers it,
:mod:`experiments.whatif.sharpen`'s ``increase="held"``; ninth round), ``partial_held`` /
``since_escape_steps`` / ``partial_held_since_escape_steps`` (only the part of
λ_max above its initial value following the held level, ``increase="partial"``; the drift's gate
(a') and fit (b') on the steps clock; both; tenth round), ``bulk_sharpening`` /
``bulk_sharpening_effect`` (ρ from the predictor in use, the norm and update ratio from the
flow-time sharpening of the bulk and the noise, as the level or as the effect over the reference
plan, :mod:`experiments.whatif.bulk`; eleventh round), ``bulk_trace_rate`` (the same with the
bulk's own current flow-time rate, from the summed trace over the last three probes, in place of
λ_max's since the first; twelfth round), ``bulk_power`` / ``bulk_power_trace`` /
``bulk_power_released`` (the bulk sharpening as a power of the flow time, its exponent from λ_max
or from the summed trace; the power where the lr is held, λ_max's free rate on a plan that lowers
it; thirteenth round), ``bulk_loss`` / ``bulk_loss_level`` (in the small-loss regime the bulk
follows the loss, or the loss sets the reference plan and the default the change's effect over it;
the default elsewhere; fourteenth round), ``bulk_trend_small_loss`` / ``bulk_trend_blend_small_loss`` /
``bulk_trend_blend`` (the unchanged run's level in the small-loss regime the trend baseline's, or
the geometric mean of the default's and the trend's, or that mean everywhere, each change's effect
over it the default's; fifteenth round), ``bulk_mix_held`` / ``bulk_mix_power`` /
``bulk_mix_power_held`` (the predictor in use with the norm the geometric mean of those under the
flow-time sharpening and under the held curvature, the power of τ, or both,
:mod:`experiments.whatif.bulk`'s ``mix``; sixteenth round), and the two no-theory baselines,
``persistence`` and ``trend`` (window 0 carried along the run's own trend before k). (The earlier
rounds' other variants are in the git history of this file.)
Writes ``results/whatif_scores.json`` (with group names as arguments only those groups, no seed
setting unless named (``seed_decay_growth``, ``seed_decay_growth_eval3``, ``_eval4``, ``_eval8``, ``_eval9``,
``_eval11``, ``_eval14`` to ``_eval19``); without names every group of :func:`default_groups` and
every seed entry of :func:`default_seed_entries` (eval19 and the seed-19 runs,
:data:`HELD_OUT`, only when named); their
entries replaced in the file and the others kept):

    .venv/bin/python -m analyses whatif_scores       # runs + forks the first time, then minutes
    .venv/bin/python -m analyses whatif_scores evaluation_8 seed_decay_growth_eval8
"""

import functools
from pathlib import Path

import numpy as np

from experiments.runs.config import RunConfig, run_id
from experiments.runs.loop import run
from experiments.store import atomic_write_json, load_run, read_json
from experiments.sweeps import SPECS_DIR, expand, load_spec, run_sweep
from experiments.whatif import bulk, delta, drift, escape, sharpen
from experiments.whatif.check import check
from experiments.whatif.curvature import CurvatureForecast
from experiments.whatif.predict import BASES, PREDICTOR, changes_from, nqm_predictor

ROOT = Path("store/runs")
OUT = Path(__file__).resolve().parents[1] / "results" / "whatif_scores.json"
CANDIDATES = {  # name -> predictor
    "fixed": nqm_predictor,
    "delta_persistence": delta.predictor("persistence"),
    "delta_trend": delta.predictor("trend"),
    "sharpening": functools.partial(nqm_predictor, curvature=CurvatureForecast(sharpening=True)),
    "sharpened_cap": functools.partial(nqm_predictor, curvature=CurvatureForecast(level="sharpened")),
    "escape": escape.predictor(),
    "drift_steps": drift.predictor("steps"),
    "drift_flow": drift.predictor("flow"),
    "escape_drift": drift.predictor("flow", inner=escape.predictor()),
    "sharpen_decay": drift.predictor("flow", inner=sharpen.predictor("edge")),
    "sharpen_decay_run": drift.predictor("flow", inner=sharpen.predictor("run")),
    "since_escape_drift": drift.predictor("flow", inner=sharpen.predictor("run"), gate="since_escape"),
    "since_escape_batches": drift.predictor("flow", inner=sharpen.predictor("run"), gate="since_escape",
                                            fit="batches"),
    "escape_since_escape_batches": drift.predictor("flow", inner=escape.predictor(), gate="since_escape",
                                                   fit="batches"),
    "held_cap": drift.predictor("flow", inner=sharpen.predictor("run", increase="held")),
    "held_cap_since_escape": drift.predictor("flow", inner=sharpen.predictor("run", increase="held"),
                                             gate="since_escape", fit="batches"),
    "partial_held": drift.predictor("flow", inner=sharpen.predictor("run", increase="partial")),
    "since_escape_steps": drift.predictor("steps", inner=sharpen.predictor("run"), gate="since_escape",
                                          fit="batches"),
    "partial_held_since_escape_steps": drift.predictor("steps", inner=sharpen.predictor("run", increase="partial"),
                                                       gate="since_escape", fit="batches"),
    "bulk_sharpening": bulk.predictor("level"),
    "bulk_sharpening_effect": bulk.predictor("effect"),
    "bulk_trace_rate": bulk.predictor("level", rate="trace"),
    "bulk_power": bulk.predictor("level", rate="power"),
    "bulk_power_trace": bulk.predictor("level", rate="power_trace"),
    "bulk_power_released": bulk.predictor("level", rate="power_released"),
    "bulk_loss": bulk.predictor("level", rate="loss"),
    "bulk_loss_level": bulk.predictor("level", rate="loss_level"),
    "bulk_trend_small_loss": bulk.predictor("level", rate="loss_level", level="trend_small_loss"),
    "bulk_trend_blend_small_loss": BASES["bulk-trend-blend"],  # the fifteenth round's, as --base names it
    "bulk_trend_blend": bulk.predictor("level", rate="loss_level", level="blend"),
    "bulk_mix_held": bulk.predictor("level", rate="loss_level", level="blend_small_loss", mix=("held",)),
    "bulk_mix_power": bulk.predictor("level", rate="loss_level", level="blend_small_loss", mix=("power_trace",)),
    "bulk_mix_power_held": bulk.predictor("level", rate="loss_level", level="blend_small_loss",
                                          mix=("power_trace", "held")),
}


IN_USE = "bulk_mix_power_held"  # the candidate PREDICTOR computes (predict.default_predictor; tests/test_whatif_drift.py)
VARIANTS = {"model": PREDICTOR, **{n: pr for n, pr in CANDIDATES.items() if n != IN_USE}}
NAMES = (*VARIANTS, "persistence", "trend")  # the two no-theory baselines last
KEYS = ("corr_spearman", "norm_sign", "norm_factor_1p5", "effect_sign", "effect_factor_1p5", "ratio_mae",
        "h_edge_rel_error", "regime_agreement", "h_edge_layer_rel_error", "regime_layer_agreement")


def changes_for(config):
    other_method = "nag" if config.opt == "hb" else "hb"
    other_momentum = 0.9 if config.momentum < 0.75 else 0.6
    return changes_from(lr_factors=[0.5, 2.0], decays=[0.1], momenta=[other_momentum], methods=[other_method])


def pooled(parts, names=NAMES):
    """Scores over all points of several checks: ``parts`` is a list of {name: scores} (one
    per check), the windows after the change pooled (weighted by each check's counts)."""
    return {name: {k: _weighted([p[name] for p in parts], k) for k in KEYS} for name in names}


def check_variants(run_dir, at, changes, n_windows, variants=None):
    """{name: the check's dataset} for each predictor of ``variants`` (default
    :data:`VARIANTS`; the forks are run once, by the first), and {name: scores}, the two
    baselines (persistence, trend) from the first."""
    variants = VARIANTS if variants is None else variants
    out = {name: check(run_dir, at, changes, n_windows=n_windows, predictor=pr) for name, pr in variants.items()}
    sc = {name: ds.attrs["scores"]["model"] for name, ds in out.items()}
    for base in ("persistence", "trend"):
        sc[base] = out[next(iter(variants))].attrs["scores"][base]
    return out, sc


def _weighted(parts, key):
    n = "norm_n_moved" if key == "norm_sign" else "effect_n_moved" if key == "effect_sign" else "n"
    vals = [(p[key], p[n]) for p in parts if np.isfinite(p[key]) and p[n]]
    return float(sum(v * w for v, w in vals) / sum(w for _, w in vals)) if vals else float("nan")


GROUPS = {"development": ("whatif_seed_cnn", [400]),
          "evaluation_seen_during_development": ("whatif_eval", [300, 500]),
          "evaluation_new": ("whatif_eval2", [300, 500]),
          "evaluation_3": ("whatif_eval3", [200, 400]),
          "evaluation_4": ("whatif_eval4", [300, 500]),
          "evaluation_5": ("whatif_eval5", [200, 400]),
          "evaluation_6": ("whatif_eval6", [200, 400]),
          "evaluation_7": ("whatif_eval7", [200, 400]),
          "evaluation_8": ("whatif_eval8", [200, 400]),
          "evaluation_9": ("whatif_eval9", [200, 400]),
          "evaluation_10": ("whatif_eval10", [200, 400]),
          "evaluation_11": ("whatif_eval11", [200, 400]),
          "evaluation_12": ("whatif_eval12", [200, 400]),
          "evaluation_13": ("whatif_eval13", [200, 400]),
          "evaluation_14": ("whatif_eval14", [200, 400]),
          "evaluation_15": ("whatif_eval15", [200, 400]),
          "evaluation_16": ("whatif_eval16", [200, 400]),
          "evaluation_17": ("whatif_eval17", [200, 400]),
          "evaluation_18": ("whatif_eval18", [200, 400]),
          "evaluation_19": ("whatif_eval19", [200, 400])}
# committed before any run of them and kept for a later round: run only when named, never by default.
# The eleventh to fourteenth rounds' (eval13 to eval17 and the seed-14 to seed-17 runs) were scored
# once there and are development since the fifteenth round; the fifteenth round's (eval18 and the
# seed-18 runs) were scored once there and are development since the sixteenth.
HELD_OUT = ("evaluation_19", "seed_decay_growth_eval19")  # the sixteenth round's


def default_groups():
    """The groups a command runs when none is named: :data:`GROUPS` less :data:`HELD_OUT`."""
    return [g for g in GROUPS if g not in HELD_OUT]


def default_seed_entries():
    """The seed-setting entries a command runs when none is named: :data:`SEED_SPECS` less
    :data:`HELD_OUT`."""
    return [s for s in SEED_SPECS if s not in HELD_OUT]


SEED_SPECS = {"seed_decay_growth": None, "seed_decay_growth_eval3": "whatif_eval3_decay",
              "seed_decay_growth_eval4": "whatif_eval4_decay", "seed_decay_growth_eval8": "whatif_eval8_decay",
              "seed_decay_growth_eval9": "whatif_eval9_decay",
              "seed_decay_growth_eval11": "whatif_eval11_decay", "seed_decay_growth_eval14": "whatif_eval14_decay",
              "seed_decay_growth_eval15": "whatif_eval15_decay",
              "seed_decay_growth_eval16": "whatif_eval16_decay",
              "seed_decay_growth_eval17": "whatif_eval17_decay",
              "seed_decay_growth_eval18": "whatif_eval18_decay",
              "seed_decay_growth_eval19": "whatif_eval19_decay"}


def setting_checks(spec_name, steps):
    """{"opt lr=.. m=.. at=..": (run_dir, step, changes)} of a spec's runs (run first if missing)."""
    spec = load_spec(SPECS_DIR / f"{spec_name}.toml")
    run_sweep(spec, root=ROOT, workers=0, progress=False)
    return {f"{c.opt} lr={c.lr:g} m={c.momentum:g} at={at}": (ROOT / run_id(c), at, changes_for(c))
            for c in expand(spec) for at in steps}


def checks(groups=None):
    """{group: setting_checks} over :func:`default_groups` (or the names given)."""
    return {g: setting_checks(*GROUPS[g]) for g in (default_groups() if groups is None else groups)}


def score_setting(spec_name, steps, variants=None):
    """Per check and pooled, the scores of ``variants`` (default :data:`VARIANTS`) and of the two
    baselines on a spec's checks (:func:`setting_checks`)."""
    names = NAMES if variants is None else (*variants, "persistence", "trend")
    result, parts = {}, []
    for key, (run_dir, at, changes) in setting_checks(spec_name, steps).items():
        _, sc = check_variants(run_dir, at, changes, n_windows=2, variants=variants)
        parts.append(sc)
        result[key] = {name: {k: sc[name][k] for k in KEYS} for name in names}
    return result, pooled(parts, names)


def seed_config():
    """The seed setting's run: seed_cnn.toml's lr 0.03, momentum 0.9, seed 0, one thread."""
    spec = load_spec(SPECS_DIR / "seed_cnn.toml")
    return RunConfig.from_dict({**spec.base, "lr": 0.03, "momentum": 0.9, "seed": 0, "threads": 1})


def growth_right(pred, meas, factor=1.5):
    """Per layer, the seed target's tests of a predicted growth against the measured: the sign of
    pred − 1 that of meas − 1 (``sign``), |log pred/meas| ≤ log ``factor`` (``within``), both
    (``right``); boolean arrays."""
    pred, meas = np.asarray(pred, dtype=float), np.asarray(meas, dtype=float)
    sign = np.sign(pred - 1) == np.sign(meas - 1)
    within = np.abs(np.log(pred / meas)) <= np.log(factor)
    return {"sign": sign, "within": within, "right": sign & within}


def seed_decay_growth(variants=None, config=None):
    """The seed setting (``config``, default :func:`seed_config`; held-out runs of the same
    kind: ``whatif_eval3_decay.toml``): at step 1000 (the first decay, not yet made), predict each layer's
    norm growth from the first window after the decay (steps 1000-1099) to the last of nine
    (1800-1899), against the run itself; ``right``: the fraction of layers with the sign right
    and the size within ×1.5 (the issue's target). Beside it the rise of the layers'
    sharpness as the diagnosis measures it (mean over the probes 1500-1900 over the mean over
    1000-1400) and as the forecast predicts it (κ at the windows' first steps 1500-1800 over
    1000-1400). ``trend``: the same scores for the trend baseline (the run's own trend before
    1000 carried on; persistence predicts no growth, so none of its layers is right)."""
    config = seed_config() if config is None else config
    run(config, ROOT / run_id(config))
    dss, sc = check_variants(ROOT / run_id(config), 1000, changes_from(), n_windows=9, variants=variants)
    first = next(iter(dss.values()))
    out = {"run": run_id(config), "layers": [str(v) for v in first.layer.values]}
    trace = load_run(ROOT / run_id(config))
    sh = trace["sharpness"].transpose("probe_step", "layer")
    p = trace["probe_step"].values
    early, late = (p >= 1000) & (p < 1500), (p >= 1500) & (p < 2000)
    out["measured_sharpness_rise"] = (sh.values[late].mean(0) / sh.values[early].mean(0)).tolist()
    growth = lambda v: (v.isel(window=-1) / v.isel(window=1)).values  # noqa: E731
    meas = growth(first.isel(change=0).meas_grad_norm)

    def right(pred):
        ok = growth_right(pred, meas)
        return {"predicted_growth": pred.tolist(), "growth_sign_right": float(np.mean(ok["sign"])),
                "within_factor_1p5": float(np.mean(ok["within"])), "right": float(np.mean(ok["right"]))}

    for name, ds in dss.items():
        x = ds.isel(change=0)
        h, start = x.pred_h_edge.values, x.start.values  # lr·κ·λ/edge; the lr is constant after the decay
        k = float(h[(start >= 1500) & (start < 2000)].mean() / h[(start >= 1000) & (start < 1500)].mean())
        out[name] = {**right(growth(x.pred_grad_norm)), "predicted_sharpness_rise": k}
    out["trend"] = right(growth(first.isel(change=0).trend_grad_norm))  # the no-theory baseline
    out["measured_growth"] = meas.tolist()
    out["scores_vs_before_decay"] = sc
    return out


def seed_entry(name):
    """The seed-setting entry ``name`` of :data:`SEED_SPECS`: seed_cnn.toml's run, or per run of
    the named spec (run first if missing)."""
    if SEED_SPECS[name] is None:
        return seed_decay_growth()
    spec = load_spec(SPECS_DIR / f"{SEED_SPECS[name]}.toml")
    run_sweep(spec, root=ROOT, workers=0, progress=False)
    return {f"lr={c.lr:g} seed={c.seed}": seed_decay_growth(config=c) for c in expand(spec)}


def main(argv=()):
    import torch

    torch.set_num_threads(1)
    bad = [g for g in argv if g not in GROUPS and g not in SEED_SPECS]
    if bad:
        raise ValueError(f"groups={bad}: not among the valid groups {list(GROUPS) + list(SEED_SPECS)}")
    groups = [g for g in argv if g in GROUPS] if argv else default_groups()
    seeds = [g for g in argv if g in SEED_SPECS] if argv else default_seed_entries()
    out = read_json(OUT) if argv and OUT.exists() else {}
    out["command"] = "python -m analyses whatif_scores"
    for group in groups:
        settings, pooled_scores = score_setting(*GROUPS[group])
        out[group] = {"settings": settings, "pooled": pooled_scores}
        print(group, pooled_scores, flush=True)
    for name in seeds:
        out[name] = seed_entry(name)
        print(name, "done", flush=True)
    atomic_write_json(OUT, out)
    print({g: out[g]["pooled"] for g in GROUPS if g in out})
    return 0
