r"""Figure 6 — the link, scored: predicted vs measured per-layer successive-gradient
correlation and squared gradient norm across the seed-CNN sweep (lr × momentum × {HB, NAG},
``experiments/specs/link_seed_cnn_probe.toml``: the runs of ``link_seed_cnn.toml`` with the
probe on 512 drawn examples, 8 Hutchinson vectors, 16 micro-batches), every (run, probe step,
layer) one point.

Prediction: the noisy quadratic model of each layer (:mod:`dynamics.nqm.layer`) fed with
the probe's measured block sharpness, Hutchinson trace and gradient noise. Left: the plain
layer model (the layer's diagonal block, stationary); middle: the link's default (:func:`experiments.linking.core.link_trace`: the network's top mode in every layer, NQM
run through the lr schedule); right: the squared gradient norm (log-log). Scores in each
panel: Spearman, Pearson, sign agreement, binned calibration error
(:func:`experiments.linking.scores.agreement_scores`).

``python -m paper_figures.link_scores`` runs the quick setting and writes
``results/link_seed_cnn.{csv,json}`` (every point, the scores, the scores of the model
variants in :data:`VARIANTS`, and the previous default: the same model on the runs probed
on the training batch, ``link_seed_cnn.toml``).
"""

from pathlib import Path

import numpy as np
import pandas as pd

from experiments.linking.core import OPTIONS, link_run, stack_runs
from experiments.linking.report import link_scores
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


def data(ctx):
    dirs = run_dirs(ctx)
    return {"default": linked(dirs), "block": linked(dirs, global_mode=False, prediction="stationary")}


def _corr_panel(ax, ds, title):
    pred, meas = ds["pred_grad_corr"], ds["meas_grad_corr"]
    for method in ("hb", "nag"):
        sel = ds["opt"] == method
        ax.scatter(pred.where(sel).values.ravel(), meas.where(sel).values.ravel(), s=4, alpha=0.6, lw=0,
                   color=style.METHOD_COLOURS[method], label=method.upper())
    ax.plot([-1, 1], [-1, 1], color="k", lw=0.6)
    ax.axhline(0, color="0.6", lw=0.5)
    ax.axvline(0, color="0.6", lw=0.5)
    sc = link_scores(ds)["grad_corr"]
    ax.text(0.03, 0.97, f"Spearman {sc['spearman']:.2f}\nPearson {sc['pearson']:.2f}\n"
            f"sign agreement {sc['sign_agreement']:.0%}\ncalibration err. {sc['calibration_error']:.2f}\n"
            f"n = {sc['n']}", transform=ax.transAxes, va="top", fontsize=6)
    ax.set(xlim=(-1, 1), ylim=(-1, 1), title=title, xlabel=r"predicted $\rho_g$ (NQM)",
           ylabel=r"measured $\rho_g = \sum g_k\cdot g_{k-1} / \sum\|g\|^2$")
    ax.legend(loc="lower right")


def plot(data, ctx):
    fig, axes = style.new_figure(ncols=3, height=2.5)
    _corr_panel(axes[0], data["block"], "plain layer NQM (block, stationary)")
    _corr_panel(axes[1], data["default"], "+ network top mode, lr schedule")
    ds, ax = data["default"], axes[2]
    for method in ("hb", "nag"):
        sel = ds["opt"] == method
        ax.scatter(ds["pred_grad_sq_norm"].where(sel).values.ravel(), ds["meas_grad_sq_norm"].where(sel).values.ravel(),
                   s=4, alpha=0.6, lw=0, color=style.METHOD_COLOURS[method], label=method.upper())
    both = np.concatenate([ds["pred_grad_sq_norm"].values.ravel(), ds["meas_grad_sq_norm"].values.ravel()])
    both = both[np.isfinite(both) & (both > 0)]
    lims = (both.min() / 2, both.max() * 2) if both.size else (1e-6, 1)
    ax.plot(lims, lims, color="k", lw=0.6)
    sc = link_scores(ds)["log10_grad_sq_norm"]
    ax.text(0.03, 0.97, f"on log10: Spearman {sc['spearman']:.2f}\nPearson {sc['pearson']:.2f}\n"
            f"mean |error| {sc['mean_abs_error']:.2f} dec.", transform=ax.transAxes, va="top", fontsize=6)
    ax.set(xscale="log", yscale="log", xlim=lims, ylim=lims, title="squared gradient norm",
           xlabel=r"predicted $E\|g_l\|^2$", ylabel=r"measured $\|g_l\|^2$ (window mean)")
    ax.legend(loc="lower right")
    return fig


FIGURE = Figure(
    name="link_scores",
    summary="The link scored: NQM-predicted vs measured per-layer successive-gradient correlation "
            "(plain layer model, and with the network's top mode and the lr schedule) and gradient norm "
            "across the seed-CNN "
            "lr x momentum x method sweep, with Spearman, Pearson, sign agreement and calibration error.",
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
