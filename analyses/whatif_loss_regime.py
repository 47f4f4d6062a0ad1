"""Where the predictor in use loses the norm sign: the small-loss regime (docs/findings/whatif.md,
"Thirteenth round", 5). Per check of the scored groups (``results/whatif_scores.json``; every group
of :data:`analyses.whatif_scores.GROUPS` in it), the run's mean training loss over the window
before k, L_k, and over steps k + 100 to k + 199, L_after; the checks are split at L_k <
:data:`SMALL_LOSS` (nats), and per side the unweighted mean over the checks of each variant's norm
sign (:data:`VARIANTS`) is printed, with the median L_after / L_k.

Why that split: for cross-entropy the per-example gradient is J_iᵀ(p_i − y_i), whose size is
1 − p_{i,y} = 1 − e^{−ℓ_i} ≈ ℓ_i for a small loss ℓ_i (within 10 % below 0.2 nats). There the
gradients, the noise and the Gauss–Newton curvature all shrink with the loss as the network fits
its data, while every bulk forecast of :mod:`experiments.whatif.bulk` can only hold or grow.

    .venv/bin/python -m analyses whatif_loss_regime     # ~1 min (reads the runs' traces)
"""

import numpy as np

from analyses.whatif_scores import GROUPS, OUT, setting_checks
from experiments.store import read_json, read_trace

SMALL_LOSS = 0.2  # nats: 1 − e^{−ℓ} is within 10 % of ℓ below it
VARIANTS = ("model", "bulk_sharpening", "fixed", "bulk_power_trace", "since_escape_batches", "trend")  # model: in use


def loss_around(loss, at, width=100):
    """(L_k, L_after): the mean of ``loss`` over [at − width, at) and over [at + width, at + 2 width)."""
    loss = np.asarray(loss, dtype=float)
    if not width <= at <= loss.size - 2 * width:
        raise ValueError(f"at={at} is outside the valid range [{width}, {loss.size - 2 * width}] for width={width}")
    return float(np.nanmean(loss[at - width:at])), float(np.nanmean(loss[at + width:at + 2 * width]))


def split(rows, variants=VARIANTS, small=SMALL_LOSS):
    """{"small": ..., "other": ...}: per side of L_k < ``small``, the number of checks, the median
    L_after / L_k and the mean norm sign of each variant over the checks where it is defined.
    ``rows``: dicts with "L_k", "L_after" and {variant: norm sign}."""
    out = {}
    for side, keep in (("small", lambda r: r["L_k"] < small), ("other", lambda r: not r["L_k"] < small)):
        sel = [r for r in rows if keep(r)]
        out[side] = {"checks": len(sel),
                     "loss_ratio_median": float(np.median([r["L_after"] / r["L_k"] for r in sel])) if sel else np.nan,
                     **{v: float(np.nanmean([r[v] for r in sel])) if sel else np.nan for v in variants}}
    return out


def main(argv=()):
    scores = read_json(OUT)
    rows = []
    for group in [g for g in GROUPS if g in scores]:
        for key, (run_dir, at, _) in setting_checks(*GROUPS[group]).items():
            l_k, l_after = loss_around(read_trace(run_dir)["loss"].values, at)
            rows.append({"group": group, "check": key, "L_k": l_k, "L_after": l_after,
                         **{v: scores[group]["settings"][key][v]["norm_sign"] for v in VARIANTS}})
    for group in sorted({r["group"] for r in rows if r["L_k"] < SMALL_LOSS}):
        n = sum(r["group"] == group and r["L_k"] < SMALL_LOSS for r in rows)
        print(f"{group}: {n} checks at L_k < {SMALL_LOSS}")
    for side, s in split(rows).items():
        print(f"{side:5s} {s['checks']:3d} checks, median L_after/L_k {s['loss_ratio_median']:.2f}; norm sign "
              + ", ".join(f"{v} {s[v]:.2f}" for v in VARIANTS))
    return 0
