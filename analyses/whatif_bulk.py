"""What moves with λ_max after a change (docs/findings/whatif.md, "Tenth round"): per check of the
named groups of :data:`analyses.whatif_scores.GROUPS` (default: the tenth round's development
groups, :data:`analyses.whatif_forecast_choice.GROUPS`) and per change, the fork's log-ratio to the
unchanged run (the same data order) of the network's λ_max, of the Hessian trace summed over the
layers (Σ_l tr H_l, the bulk of the spectrum) and of the gradient noise summed over the layers
(Σ_l tr Σ_l / B), each the mean over the probes after k. The curvature options of the what-if model
(:mod:`experiments.whatif.curvature`, :mod:`experiments.whatif.sharpen`) move every layer's whole
spectrum, and the noise, by the factor they forecast for λ_max: that assumes d log Σtr H = d log
λ_max and d log Σ tr Σ = d log Σtr H. Prints, per group, for the forks where λ_max moved by more
than :data:`MOVED` (log), the median of the two slopes d log Σtr H / d log λ_max and d log Σ tr Σ /
d log Σtr H, and of the same slope of log Σtr H on log λ_max over the probes at or before k (the
run's own co-movement before the change); and per layer (over layers and those forks) the median
of d log λ_l / d log λ_max and d log tr H_l / d log λ_max (λ_l the block's top eigenvalue: whether
the top of each block moves with the network's, and its bulk with it); and the median over the
checks of :func:`outliers_before` (how far the blocks' tops stand above their bulk before k); writes
``results/whatif_bulk.json``:

    .venv/bin/python -m analyses whatif_bulk                    # ~4 min (the forks are in the store)
    .venv/bin/python -m analyses whatif_bulk evaluation_9
"""

from pathlib import Path

import numpy as np

from analyses.whatif_forecast_choice import GROUPS as DEVELOPMENT
from analyses.whatif_scores import GROUPS, checks
from experiments import store
from experiments.store import atomic_write_json
from experiments.whatif.check import check
from experiments.whatif.core import nqm_predictor

OUT = Path(__file__).resolve().parents[1] / "results" / "whatif_bulk.json"
MOVED = 0.1  # |d log λ_max| above which a fork's slopes are summarized


def totals(trace, steps):
    """(λ_max, Σ_l tr H_l, Σ_l tr Σ_l / B) at the probe ``steps`` of ``trace``."""
    sel = trace.sel(probe_step=list(steps))
    return (sel["sharpness_global"].values, sel["hessian_trace"].sum("layer").values,
            sel["grad_noise"].sum("layer").values)


def shared_after(fork, unchanged, at):
    """The probe steps after ``at`` that both traces have, in the fork's order."""
    shared = set(unchanged["probe_step"].values)
    return [s for s in fork["probe_step"].values if s > at and s in shared]


def fork_moves(fork, unchanged, at):
    """The mean over :func:`shared_after` of log(fork / unchanged) of λ_max, Σ tr H and Σ tr Σ (a
    3-tuple; NaN where there is no such probe)."""
    post = shared_after(fork, unchanged, at)
    if not post:
        return (np.nan,) * 3
    with np.errstate(divide="ignore", invalid="ignore"):
        return tuple(float(np.mean(np.log(a / b))) for a, b in zip(totals(fork, post), totals(unchanged, post)))


def layer_moves(fork, unchanged, at):
    """Per layer, the mean over :func:`shared_after` of log(fork / unchanged) of the block's top
    eigenvalue and of its trace: two arrays over the layers (NaN where there is no such probe)."""
    post = shared_after(fork, unchanged, at)
    if not post:
        return (np.full(fork.sizes["layer"], np.nan),) * 2
    with np.errstate(divide="ignore", invalid="ignore"):
        return tuple(np.log(fork[v].sel(probe_step=post).transpose("probe_step", "layer").values
                            / unchanged[v].sel(probe_step=post).transpose("probe_step", "layer").values).mean(0)
                     for v in ("sharpness", "hessian_trace"))


def coupling_before(trace, at):
    """The least-squares slope of log Σ tr H on log λ_max over the probes at or before ``at`` with
    both finite and positive (NaN with fewer than two, or no spread of λ_max)."""
    p = trace["probe_step"].values
    lam, tr, _ = totals(trace, p[p <= at])
    with np.errstate(divide="ignore", invalid="ignore"):
        x, y = np.log(lam), np.log(tr)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2 or np.ptp(x[ok]) == 0:
        return np.nan
    return float(np.polyfit(x[ok], y[ok], 1)[0])


def outliers_before(trace, at, smooth=3):
    """How far each block's top stands above its mean eigenvalue before ``at``: the mean over the
    layers, weighted by their share of Σ tr H, of log10(λ_l n_l / tr H_l) (n_l the block's
    parameters), each the mean over the last ``smooth`` probes at or before ``at``."""
    p = trace["probe_step"].values
    sel = trace.sel(probe_step=p[p <= at][-smooth:]).mean("probe_step")
    top, tr, n = (sel[v].values.astype(float) for v in ("sharpness", "hessian_trace", "n_params"))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log10(top * n / tr)
    ok = np.isfinite(ratio) & (tr > 0)
    return float(np.sum(tr[ok] * ratio[ok]) / np.sum(tr[ok])) if ok.any() else float("nan")


def _median(values):
    values = [v for v in values if np.isfinite(v)]
    return float(np.median(values)) if values else float("nan")


def main(argv=()):
    import torch

    torch.set_num_threads(1)
    bad = [g for g in argv if g not in GROUPS]
    if bad:
        raise ValueError(f"groups={bad}: not among the valid groups {list(GROUPS)}")
    out = {"command": "python -m analyses whatif_bulk " + " ".join(argv), "moved": MOVED, "groups": {}}
    for group, items in checks(list(argv) or list(DEVELOPMENT)).items():
        rows = []
        for key, (run_dir, at, changes) in items.items():
            ds = check(run_dir, at, changes, n_windows=2, predictor=nqm_predictor)
            labels, dirs = list(ds.label.values), ds.attrs["fork_dirs"]
            unchanged = store.load_run(dirs[labels.index("scheduled")])
            parent = store.load_run(run_dir)
            before, outliers = coupling_before(parent, at), outliers_before(parent, at)
            for label, d in zip(labels, dirs):
                if label == "scheduled":
                    continue
                fork = store.load_run(d)
                lam, tr, noise = fork_moves(fork, unchanged, at)
                top_l, trace_l = layer_moves(fork, unchanged, at)
                rows.append({"check": key, "change": label, "dlog_lambda": lam, "dlog_trace": tr,
                             "dlog_noise": noise, "coupling_before": before, "outliers_before": outliers,
                             "dlog_layer_top": top_l.tolist(), "dlog_layer_trace": trace_l.tolist()})
        moved = [r for r in rows if abs(r["dlog_lambda"]) > MOVED and np.isfinite(r["dlog_trace"])]
        per_lambda = [r["dlog_trace"] / r["dlog_lambda"] for r in moved]
        per_trace = [r["dlog_noise"] / r["dlog_trace"] for r in moved if abs(r["dlog_trace"]) > MOVED]
        summary = {"n_moved": len(moved), "trace_per_lambda": _median(per_lambda),
                   "noise_per_trace": _median(per_trace),
                   "coupling_before": _median([r["coupling_before"] for r in rows]),
                   "outliers_before": _median([r["outliers_before"] for r in rows]),
                   "layer_top_per_lambda": _median([x / r["dlog_lambda"] for r in moved for x in r["dlog_layer_top"]]),
                   "layer_trace_per_lambda": _median([x / r["dlog_lambda"] for r in moved
                                                      for x in r["dlog_layer_trace"]])}
        out["groups"][group] = {"summary": summary, "forks": rows}
        print(f"{group}: {summary['n_moved']} forks with |dlog λ_max| > {MOVED}: median dlog Σtr H / dlog λ_max "
              f"{summary['trace_per_lambda']:.2f}, dlog Σtr Σ / dlog Σtr H {summary['noise_per_trace']:.2f}; "
              f"before k, slope of log Σtr H on log λ_max {summary['coupling_before']:.2f}, log10 top / mean "
              f"eigenvalue {summary['outliers_before']:.2f}; per layer, "
              f"dlog λ_l / dlog λ_max {summary['layer_top_per_lambda']:.2f}, dlog tr H_l / dlog λ_max "
              f"{summary['layer_trace_per_lambda']:.2f}", flush=True)
    atomic_write_json(OUT, out)
    return 0
