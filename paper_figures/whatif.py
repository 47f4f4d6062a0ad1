r"""Figure 10 — what a change would do, predicted before it is made (issue 15): at one step of
the seed setting (seed CNN, MNIST-1D, HB 0.9, step decay; ``experiments/specs/whatif_seed_cnn.toml``)
the lr is halved or doubled, the momentum set to 0.6 or the method switched to NAG; per layer
and window after the change, the successive-gradient correlation and the gradient-norm growth
(window j over the window before the change) that :mod:`experiments.whatif.predict` predicted
from the trace and probes up to the step, against the forks that made the change
(:mod:`experiments.whatif.check`), with persistence (no change) beside them, and the trend
baseline's scores (the run's own trend before the step carried on) in the norm panel's title: the sign
of the moves over 10 % (persistence predicts none) and the share within ×1.5.

``python -m paper_figures.whatif`` runs the quick setting and writes ``results/whatif_seed_cnn.json``
(the scores of :func:`experiments.whatif.check.scores`).
"""

import numpy as np
from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

from paper_figures import style
from paper_figures._runs import run_dirs
from paper_figures.registry import Context, Figure

SPEC = "whatif_seed_cnn"
TINY = {"steps": 40, "step_every": 30, "probe_every": 10, "checkpoint_every": 10, "probe_batch_size": 128,
        "hutchinson_samples": 2, "noise_microbatches": 4, "model_args": {"channels": 4, "hidden": 16}}
FULL = {"steps": 1600, "step_every": 1200, "checkpoint_every": 100}
AT = {"tiny": 20, "quick": 400, "full": 800}
WINDOW = {"tiny": 10, "quick": 100, "full": 100}


def changes():
    from experiments.whatif.predict import changes_from

    return changes_from(lr_factors=[0.5, 2.0], momenta=[0.6], methods=["nag"])


def data(ctx):
    from experiments.whatif.check import check

    (_, parent), = run_dirs(SPEC, ctx, ctx.pick(TINY, {}, FULL))
    ds = check(parent, AT[ctx.mode], changes(), window=WINDOW[ctx.mode], n_windows=2)
    return ds.drop_attrs().assign_attrs(at=AT[ctx.mode], scores=ds.attrs["scores"])


def plot(ds, ctx):
    fig, (a_corr, a_norm) = style.new_figure(ncols=2, nrows=1, width=style.COLUMN_WIDTH * 2, height=3.3)
    after = ds.isel(window=slice(1, None))
    m0 = ds["meas_grad_norm"].isel(window=0)
    for c, label in enumerate(ds["label"].values):
        x = after.isel(change=c)
        colour = style.PALETTE[c % len(style.PALETTE)]
        a_corr.scatter(x.meas_grad_corr, x.pred_grad_corr, s=9, color=colour, label=label)
        a_corr.scatter(x.meas_grad_corr, x.persist_grad_corr, s=9, facecolors="none", edgecolors=colour, lw=0.6)
        a_norm.scatter(x.meas_grad_norm / m0.isel(change=c), x.pred_grad_norm / m0.isel(change=c), s=9, color=colour)
        a_norm.scatter(x.meas_grad_norm / m0.isel(change=c), np.ones(x.meas_grad_norm.shape), s=9,
                       facecolors="none", edgecolors=colour, lw=0.6)
    lo, hi = _limits(after.meas_grad_corr, after.pred_grad_corr)
    a_corr.plot([lo, hi], [lo, hi], "k--", lw=0.7)
    sc = ds.attrs["scores"]
    a_corr.set(xlabel="forked ρ (measured)", ylabel="predicted ρ  (open: persistence)",
               title=f"successive-gradient correlation\nSpearman {sc['model']['corr_spearman']:.2f} "
                     f"(persistence {sc['persistence']['corr_spearman']:.2f})")
    a_corr.legend(fontsize=6)
    a_norm.set(xscale="log", yscale="log")
    grow = [after[f"{v}_grad_norm"] / m0 for v in ("meas", "pred")]
    lo, hi = (float(np.nanmin([g.min() for g in grow])), float(np.nanmax([g.max() for g in grow])))
    lo, hi = min(0.4, lo / 1.1), max(2.5, hi * 1.1)  # every point on the chart
    g = np.geomspace(lo, hi, 2)
    a_norm.plot(g, g, "k--", lw=0.7)
    a_norm.fill_between(g, g / 1.5, g * 1.5, color="0.92", lw=0, zorder=0)
    a_norm.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="forked ‖g_l‖ growth (window j / window 0)",
               ylabel="predicted growth  (open: persistence = 1)",
               title=f"gradient-norm growth at step {ds.attrs['at']}\nsign of moves > 10 %: "
                     f"{sc['model']['norm_sign']:.0%} (trend {sc['trend']['norm_sign']:.0%})\nwithin x1.5: "
                     f"{sc['model']['norm_factor_1p5']:.0%} (persistence {sc['persistence']['norm_factor_1p5']:.0%}, "
                     f"trend {sc['trend']['norm_factor_1p5']:.0%})")
    ticks = [t for t in (0.25, 0.5, 0.7, 1.0, 1.4, 2.0, 3.0, 4.0, 6.0, 8.0) if lo <= t <= hi]
    for axis in (a_norm.xaxis, a_norm.yaxis):
        axis.set_major_locator(FixedLocator(ticks))
        axis.set_major_formatter(FixedFormatter([f"{t:g}" for t in ticks]))
        axis.set_minor_locator(NullLocator())
    return fig


def _limits(*arrays):
    v = np.concatenate([np.ravel(a) for a in arrays])
    v = v[np.isfinite(v)]
    return (float(v.min()) - 0.05, float(v.max()) + 0.05) if v.size else (-1.0, 1.0)


FIGURE = Figure(
    name="whatif",
    summary="What-if at one step of the seed setting: predicted vs forked per-layer correlation and "
            "gradient-norm growth for lr x0.5 / x2, momentum 0.6 and NAG, with persistence beside them.",
    data=data,
    plot=plot,
    tags=("empirical",),
)


def main():
    import torch

    from experiments.store import atomic_write_json

    torch.set_num_threads(1)
    ds = data(Context(mode="quick"))
    out = {"command": "python -m paper_figures.whatif", "at": ds.attrs["at"], "changes": [str(x) for x in ds.label.values],
           "scores": ds.attrs["scores"]}
    atomic_write_json("results/whatif_seed_cnn.json", out)
    print(out)


if __name__ == "__main__":
    main()
