r"""Figure 6 — the link, scored on families of runs (issue 16): every (run, probe step, layer)
one point, predicted vs measured per-layer successive-gradient correlation.

Prediction: the link's default (:func:`experiments.linking.core.link_trace`): the forecast that
combines, with equal weights, the previous window's measurement and the theory, the response
model (:mod:`dynamics.nqm.response`: the layer's noise as one NQM mode at its noise-weighted
curvature plus a drift with its one-step response) fed with the probe's gradient signal, noise and
curvature along the gradient and the momentum buffer; the theory alone is scored beside it. Panels:
the development families (the model was chosen on them), the evaluation families (reported only),
the small-h region (network h/edge < 0.05) of all families, and per family the Spearman score of
the link beside the theory alone, persistence (the previous probe window's measured value) and
one mode at the network's h = lr·λ_max, with the family's noise ceiling (the split-half reliability of
the measured window correlation, :func:`experiments.linking.scores.noise_ceiling`: an estimate of
the best score a forecast independent of the window's noise can reach); the text gives their pooled scores on the same points.
Quick mode runs the cheap families (seed CNN and MLP development, plain-SGD seed CNN and linear
regression evaluation); full mode all eight (experiments/specs/link_{dev,eval}_*.toml).

``python -m paper_figures.link_scores`` still writes ``results/link_seed_cnn.{csv,json}``: the
earlier NQM link's scores and variants on ``link_seed_cnn_probe.toml`` (see docs/findings/link.md).
"""

from pathlib import Path

import numpy as np
import pandas as pd

from experiments.linking.core import OPTIONS, link_run, stack_runs
from experiments.linking.report import link_scores, protocol_points, protocol_scores
from paper_figures import _runs, style
from paper_figures.registry import Context, Figure

SPEC = "link_seed_cnn_probe"  # in experiments/specs/
OLD_PROBE_SPEC = "link_seed_cnn"  # probe on the step's 32 examples, 1 Hutchinson vector, 4 micro-batches
# tiny: two runs of a narrow seed CNN, seconds; full: the paper-scale seed CNN (GPU)
TINY_BASE = {"steps": 30, "probe_every": 10, "step_every": 20, "model_args": {"channels": 4, "hidden": 16},
             "probe_batch_size": 64}
TINY_GRID = {"opt": ["hb", "nag"], "lr": [0.05], "momentum": [0.9]}
FULL_BASE = {"steps": 3000, "probe_every": 100, "step_every": 2000, "model_args": {"channels": 32, "hidden": 450}}
# model variants scored in the results file: name -> link_trace options (default first)
VARIANTS = {
    "default (schedule NQM, block + network top mode, curvature noise, power shape, smooth 3)": {},
    "stationary NQM (each probe's stationary state)": {"prediction": "stationary"},
    "stationary NQM, block only (the plain layer model)": {"prediction": "stationary", "global_mode": False},
    "block only (no network top mode)": {"global_mode": False},
    "no probe smoothing": {"smooth": 1},
    "additive noise": {"noise_model": "additive"},
    "two-level spectrum": {"shape": "two-level"},
    "window after the probe": {"align": "after"},
    "+ signal term, rho_m = top-mode fluctuation lag-1 (fluct)": {"signal": "fluct"},
    "+ signal term, rho_m = top-mode dominant root cos arg z (root)": {"signal": "root"},
    "+ signal term, rho_m = +1 (drift)": {"signal": "drift"},
}


def run_dirs(ctx, name=SPEC):
    """Compute the runs the store lacks; their directories, in spec order."""
    overrides, grid = ctx.pick((TINY_BASE, TINY_GRID), ({}, None), (FULL_BASE, None))
    return [path for _, path in _runs.run_dirs(name, ctx, overrides, grid)]


def linked(dirs, **options):
    """The link of every run (``link.nc`` beside each run for the default options)."""
    write = not options
    return stack_runs([link_run(d, write=write, **options) for d in dirs])


# The issue-16 families (experiments/specs/link_{dev,eval}_*.toml); roles fixed before scoring.
# Quick mode runs the cheap ones (~3 CPU-min on 2 cores), full mode all eight; tiny: two tiny runs.
FAMILIES = {  # name: (role, in quick mode)
    "link_dev_seed_cnn": ("development", True), "link_dev_mlp_digits": ("development", True),
    "link_dev_gru_pytext": ("development", False),
    "link_eval_seed_cnn_sgd": ("evaluation", True), "link_eval_linreg": ("evaluation", True),
    "link_eval_resnet_mnist1d": ("evaluation", False), "link_eval_transformer_pytext": ("evaluation", False),
    "link_eval_seed_cnn_b128": ("evaluation", False),
}
TINY_FAMILIES = {
    "link_dev_seed_cnn": ({"steps": 40, "probe_every": 10, "step_every": 30, "probe_batch_size": 64,
                           "noise_microbatches": 4, "hutchinson_samples": 1,
                           "model_args": {"channels": 4, "hidden": 16}},
                          {"opt": ["hb"], "lr": [0.05], "momentum": [0.9]}),
    "link_eval_linreg": ({"steps": 40, "probe_every": 10}, {"opt": ["gd"], "lr": [0.3]}),
}
SMALL_H = 0.05  # network h/edge below this: the small-h region (docs/theory.md §9 regimes)


def families(ctx):
    """{family: (role, link Dataset)} for this mode."""
    out = {}
    for name, (role, quick) in FAMILIES.items():
        if ctx.mode == "tiny":
            if name not in TINY_FAMILIES:
                continue
            overrides, grid = TINY_FAMILIES[name]
        elif ctx.mode == "quick" and not quick:
            continue
        else:
            overrides, grid = {}, None
        dirs = [path for _, path in _runs.run_dirs(name, ctx, overrides, grid)]
        out[name] = (role, linked(dirs))
    return out


def data(ctx):
    return {"families": families(ctx)}


def _short(name):
    return name.replace("link_dev_", "").replace("link_eval_", "")


def _flat(ds, key):
    return ds[key].broadcast_like(ds["meas_grad_corr"]).values.ravel()


def _scatter(ax, fams, role, title, region=None):
    markers = {"development": "o", "evaluation": "^"}
    for i, (name, (r, ds)) in enumerate(fams.items()):
        if role is not None and r != role:
            continue
        keep = protocol_points(ds).ravel()
        if region is not None:
            keep &= _flat(ds, "edge_ratio_global") < region
        ax.scatter(_flat(ds, "pred_grad_corr")[keep], _flat(ds, "meas_grad_corr")[keep], s=4, alpha=0.5, lw=0,
                   marker=markers[r], color=style.PALETTE[i % len(style.PALETTE)], label=f"{_short(name)} ({r[:3]})")
    ax.plot([-1, 1], [-1, 1], color="k", lw=0.6)
    ax.axhline(0, color="0.6", lw=0.5)
    ax.axvline(0, color="0.6", lw=0.5)
    ax.set(xlim=(-1, 1), ylim=(-1, 1), title=title, xlabel=r"predicted $\rho_g$ (link)",
           ylabel=r"measured $\rho_g$ (window)")
    ax.legend(loc="lower right", fontsize=4, markerscale=2)


def _scores_text(ax, sc):
    lines = [f"{k}: Spearman {v['spearman']:.2f}, sign {v['sign_agreement']:.0%}"
             for k, v in sc.items() if k in ("link", "theory", "persistence", "one_mode")]
    ax.text(0.03, 0.97, "\n".join(lines), transform=ax.transAxes, va="top", fontsize=4.5)


def role_scores(fams, role, region=None):
    """Agreement of link, persistence and one mode pooled over a role's families (or all: None),
    on the protocol's common points, optionally only where the network's h/edge < ``region``."""
    from experiments.linking.scores import agreement_scores

    cols = {"link": "pred_grad_corr", "theory": "theory_grad_corr", "persistence": "base_persist_corr",
            "one_mode": "base_one_mode_corr"}
    pred = {k: [] for k in cols}
    meas = []
    for r, ds in fams.values():
        if role is not None and r != role:
            continue
        keep = protocol_points(ds).ravel()
        if region is not None:
            keep &= _flat(ds, "edge_ratio_global") < region
        meas.append(_flat(ds, "meas_grad_corr")[keep])
        for k, c in cols.items():
            pred[k].append(_flat(ds, c)[keep])
    if not meas:
        return {}
    return {k: agreement_scores(np.concatenate(v), np.concatenate(meas)) for k, v in pred.items()}


def plot(data, ctx):
    fams = data["families"]
    fig, axes = style.new_figure(ncols=2, nrows=2, height=4.6)
    axes = axes.ravel()
    for ax, role in zip(axes[:2], ("development", "evaluation")):
        _scatter(ax, fams, role, f"{role} families")
        _scores_text(ax, role_scores(fams, role))
    _scatter(axes[2], fams, None, f"small h (network h/edge < {SMALL_H})", region=SMALL_H)
    _scores_text(axes[2], role_scores(fams, None, region=SMALL_H))
    ax = axes[3]
    names = list(fams)
    bars = (("link", "link"), ("theory alone", "theory"), ("persistence", "persistence"), ("one mode", "one_mode"))
    width = 0.8 / len(bars)
    scores = {n: protocol_scores(fams[n][1]) for n in names}
    for j, (label, col) in enumerate(bars):
        vals = [scores[n]["corr"][col]["spearman"] for n in names]
        ax.bar(np.arange(len(names)) + (j - (len(bars) - 1) / 2) * width, vals, width, label=label,
               color=style.PALETTE[j])
    ceiling = [scores[n].get("ceiling", {}).get("ceiling", np.nan) for n in names]  # split-half noise ceiling
    ax.hlines(ceiling, np.arange(len(names)) - 0.45, np.arange(len(names)) + 0.45, color="k", lw=1,
              label="noise ceiling")
    n_dev = sum(fams[n][0] == "development" for n in names)
    ax.axvline(n_dev - 0.5, color="k", lw=0.6)
    ax.set_xticks(np.arange(len(names)), [_short(n) for n in names], rotation=30, ha="right", fontsize=5)
    ax.set(ylim=(-0.2, 1), ylabel="Spearman (correlation)", title="per family: dev | eval")
    ax.legend(loc="lower left", fontsize=5)
    return fig


FIGURE = Figure(
    name="link_scores",
    summary="The link scored on families of runs: predicted vs measured per-layer successive-gradient "
            "correlation on development and evaluation families, the small-h region apart, and per family "
            "the link's Spearman beside persistence and one mode at the network's h.",
    data=data,
    plot=plot,
    tags=("empirical",),
)


def results(ctx):
    """(tidy table of every point, scores of every variant, diagnostics, options) for the
    results files."""
    dirs = run_dirs(ctx)
    default = linked(dirs)
    cols = ["opt", "lr0", "momentum", "lr", "h", "edge_ratio", "edge_ratio_global", "regime", "sharpness",
            "sharpness_global", "hessian_trace", "grad_noise", "grad_signal", "pred_grad_corr", "meas_grad_corr", "meas_mean_cos",
            "pred_grad_sq_norm", "meas_grad_sq_norm", "meas_steps"]
    table = default[[c for c in cols if c in default]].to_dataframe().reset_index()
    scores = {name: link_scores(default if not opts else linked(dirs, **opts)) for name, opts in VARIANTS.items()}
    scores["previous default: probe on the training batch (link_seed_cnn.toml), same model"] = link_scores(
        linked(run_dirs(ctx, OLD_PROBE_SPEC), signal="none"))
    return table, scores, diagnostics(table), {k: default.attrs.get(k) for k in OPTIONS}


def diagnostics(table):
    """Where the default model fails: its correlation scores per probe step, per band of the
    network's h/edge, and on the points where it predicts |ρ| > 0.1 (not the target: the
    target is scored on every point)."""
    from experiments.linking.scores import agreement_scores

    def score(part):
        return agreement_scores(part.pred_grad_corr, part.meas_grad_corr)

    bands = pd.cut(table.edge_ratio_global, [0, 0.05, 0.2, 0.5, np.inf])
    return {
        "by_probe_step": {int(k): score(g) for k, g in table.groupby("probe_step")},
        "by_network_h_over_edge": {str(k): score(g) for k, g in table.groupby(bands, observed=True)},
        "where_abs_pred_gt_0.1": score(table[table.pred_grad_corr.abs() > 0.1]),
    }


def main():
    import torch

    from experiments.store import atomic_write_json, atomic_write_text

    torch.set_num_threads(1)
    table, scores, diag, options = results(Context(mode="quick"))
    out = Path("results")
    atomic_write_text(out / "link_seed_cnn.csv", table.to_csv(index=False, float_format="%.6g"))
    atomic_write_json(out / "link_seed_cnn.json", {
        "command": "python -m paper_figures.link_scores", "spec": "experiments/specs/link_seed_cnn_probe.toml",
        "options": options, "scores": scores, "diagnostics": diag,
        "target": {"spearman_grad_corr": 0.8, "sign_agreement": 0.9}})
    for name, sc in scores.items():
        c = sc["grad_corr"]
        print(f"{name:70s} spearman {c['spearman']:.3f} pearson {c['pearson']:.3f} "
              f"sign {c['sign_agreement']:.3f} calib {c['calibration_error']:.3f} n {c['n']}")
    print(pd.Series(scores[next(iter(scores))]["log10_grad_sq_norm"]).to_string())


if __name__ == "__main__":
    main()
