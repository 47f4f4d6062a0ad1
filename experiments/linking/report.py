"""Scores and the per-layer table of a link Dataset (:mod:`experiments.linking.core`), as printed by
``optdyn link``."""

import numpy as np
import pandas as pd

from experiments.linking.scores import SCORES, agreement_scores


def link_scores(ds, bins=10):
    """Agreement over every (run, probe_step, layer) of a link Dataset: for ``grad_corr``
    the scores of :func:`agreement_scores`; for ``grad_sq_norm`` the same on log10 (norms
    span decades across layers and runs; a ratio error is what matters)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"grad_corr": agreement_scores(ds["pred_grad_corr"], ds["meas_grad_corr"], bins=bins),
                "log10_grad_sq_norm": agreement_scores(np.log10(ds["pred_grad_sq_norm"]),
                                                       np.log10(ds["meas_grad_sq_norm"]), bins=bins)}


def layer_table(ds):
    """Per-layer summary of a link Dataset (pooled over runs and probe steps): median h/edge,
    the most frequent top-mode regime, mean predicted and measured correlation and squared
    norm, and the per-layer Spearman and sign agreement of the correlation."""
    rows = {}
    for layer in ds["layer"].values:
        x = ds.sel(layer=layer)
        pred, meas = x["pred_grad_corr"].values.ravel(), x["meas_grad_corr"].values.ravel()
        sc = agreement_scores(pred, meas)
        regimes = pd.Series(x["regime"].values.ravel()).dropna()
        rows[layer] = {
            "n": sc["n"], "h/edge": float(np.nanmedian(x["edge_ratio"])),
            "regime": regimes.mode().iloc[0] if len(regimes) else "",
            "pred_corr": float(np.nanmean(pred)) if sc["n"] else np.nan,
            "meas_corr": float(np.nanmean(meas)) if sc["n"] else np.nan,
            "spearman": sc["spearman"], "sign_agree": sc["sign_agreement"],
            "pred_|g|^2": float(np.nanmean(x["pred_grad_sq_norm"])),
            "meas_|g|^2": float(np.nanmean(x["meas_grad_sq_norm"])),
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def format_report(ds):
    """The per-layer table and the pooled scores, as printed by ``optdyn link``."""
    scores = link_scores(ds)
    lines = [layer_table(ds).to_string(float_format=lambda v: f"{v:.3g}"), ""]
    for what, sc in scores.items():
        lines.append(f"{what}: " + ", ".join(f"{k}={sc[k]:.3g}" if isinstance(sc[k], float) else f"{k}={sc[k]}"
                                              for k in SCORES))
    if ds.attrs.get("skipped"):
        lines.append(f"skipped: {ds.attrs['skipped']}")
    return "\n".join(lines)
