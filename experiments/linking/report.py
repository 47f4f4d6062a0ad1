"""Scores and the per-layer table of a link Dataset (:mod:`experiments.linking.core`), as printed by
``optdyn link``."""

import numpy as np
import pandas as pd

from experiments.linking.scores import (SCORES, agreement_scores, calibration_floor, error_floor, noise_ceiling,
                                        sign_ceiling, spearman_brown)


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
    table = layer_table(ds)
    lines = [table.to_string(float_format=lambda v: f"{v:.3g}", na_rep="n/a"), ""]
    missing = bool(table.select_dtypes("number").isna().to_numpy().any())
    for what, sc in scores.items():
        cells = []
        for k in SCORES:
            v = sc[k]
            missing |= isinstance(v, float) and not np.isfinite(v)
            cells.append(f"{k}={v:.3g}" if isinstance(v, float) and np.isfinite(v) else
                         f"{k}=n/a" if isinstance(v, float) else f"{k}={v}")
        lines.append(f"{what}: " + ", ".join(cells))
    if missing:
        lines.append("n/a: not defined on these points (fewer than 3, or a constant prediction or measurement)")
    if "base_persist_corr" in ds:
        lines += ["", format_protocol(protocol_scores(ds))]
    if ds.attrs.get("skipped"):
        lines.append(f"skipped: {ds.attrs['skipped']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# the protocol of docs/theory.md §9: the link beside its baselines on the same points

REGIMES = (("h/edge<0.05", 0.0, 0.05), ("0.05-0.5", 0.05, 0.5), (">=0.5", 0.5, np.inf))
CORR_PREDICTORS = {"link": "pred_grad_corr", "theory": "theory_grad_corr", "nqm": "nqm_grad_corr", "persistence": "base_persist_corr",
                   "one_mode": "base_one_mode_corr", "constant": "base_const_corr"}
NORM_PREDICTORS = {"link": "pred_grad_sq_norm", "theory": "theory_grad_sq_norm", "nqm": "nqm_grad_sq_norm", "persistence": "base_persist_sq"}


def _flat(ds, name):
    return np.asarray(ds[name].transpose(*_dims(ds)).values, dtype=float)


def _dims(ds):
    return tuple(d for d in ("run", "probe_step", "layer") if d in ds[("meas_grad_corr")].dims)


def protocol_points(ds):
    """Boolean array (dims of ``meas_grad_corr``): the points every predictor of the protocol
    (link, NQM, persistence, one mode) and the measurement have, so all are scored on the same."""
    keep = np.isfinite(_flat(ds, "meas_grad_corr"))
    for name in list(CORR_PREDICTORS.values()) + list(NORM_PREDICTORS.values()) + ["meas_grad_sq_norm"]:
        if name in ds:
            keep &= np.isfinite(_flat(ds, name))
    return keep


def within_probe_ranking(pred, meas, return_count=False):
    """Spearman correlation across layers within each (run, probe) (the last axis is the layer),
    averaged over the probes where it is defined (>= 3 layers, neither side constant); NaN if none
    (a prediction that is the same for every layer ranks nothing). ``return_count``: also the
    number of probes averaged."""
    from scipy import stats

    p = np.asarray(pred, dtype=float).reshape(-1, np.shape(pred)[-1])
    m = np.asarray(meas, dtype=float).reshape(-1, np.shape(meas)[-1])
    values = []
    for a, b in zip(p, m):
        ok = np.isfinite(a) & np.isfinite(b)
        if ok.sum() >= 3 and np.ptp(a[ok]) > 0 and np.ptp(b[ok]) > 0:
            values.append(stats.spearmanr(a[ok], b[ok]).statistic)
    mean = float(np.mean(values)) if values else float("nan")
    return (mean, len(values)) if return_count else mean


def ranking_ceiling(split_half, probes):
    """The noise ceiling of the within-probe layer ranking: ``split_half`` is the within-probe
    ranking of one half-window against the other (:func:`within_probe_ranking`), averaged over
    ``probes``; Spearman–Brown applied to that average as in
    :func:`experiments.linking.scores.noise_ceiling` (an approximation: the per-probe reliabilities
    vary, and the mean of √R is not √ of the mean)."""
    rel = spearman_brown(split_half) if np.isfinite(split_half) else float("nan")
    return {"probes": int(probes), "split_half": float(split_half), "reliability": float(rel),
            "ceiling": float(np.sqrt(max(rel, 0.0))) if np.isfinite(rel) else float("nan")}


def protocol_scores(ds, bins=10):
    """The protocol's scores of a link Dataset: per predictor (link, NQM, persistence, one mode,
    constant) the agreement of the correlation pooled and per regime of the network's h/edge
    (``edge_ratio_global``: < 0.05, 0.05–0.5, ≥ 0.5), the within-probe layer ranking, and for the
    norm (link, NQM, persistence) the agreement of log10 E‖g‖² with its mean absolute error in
    decades — all on the same points (:func:`protocol_points`). Where the Dataset has the window's
    halves (``meas_half*_grad_corr``), ``ceiling`` (pooled) and ``ceiling_regimes`` (per regime) are
    the noise ceiling of the measured correlation on those points
    (:func:`experiments.linking.scores.noise_ceiling`): the Spearman score no forecast can beat;
    ``ceiling_layer_ranking`` that of the within-probe layer ranking (:func:`ranking_ceiling`);
    ``ceiling_alternate`` (and ``_regimes``) the same from the even / odd steps split
    (:func:`experiments.linking.measure.split_half_windows`: the two splits err in opposite
    directions). Ceilings of the other targets from the same splits (``<key>`` is ``ceiling`` for the
    halves, ``ceiling_alternate`` for the even / odd steps): ``<key>_sign`` and ``<key>_sign_regimes``
    (:func:`experiments.linking.scores.sign_ceiling`), ``<key>_calibration``
    (:func:`experiments.linking.scores.calibration_floor`, a floor) and, where the Dataset has the
    halves' norms, ``<key>_log10_norm`` (:func:`experiments.linking.scores.error_floor` of log10
    E‖g‖², a floor in decades). On a constructed AR(1) trace the halves' estimates are within 0.005 of
    the true values' scores and the even / odd split overstates the sign ceiling and understates the
    floors (tests/test_link.py): the halves are the estimate, the even / odd split a bracket."""
    keep = protocol_points(ds)
    meas = np.where(keep, _flat(ds, "meas_grad_corr"), np.nan)
    ratio = np.broadcast_to(np.asarray(ds["edge_ratio_global"].broadcast_like(ds["meas_grad_corr"])
                                       .transpose(*_dims(ds)).values, dtype=float), meas.shape)
    out = {"n": int(keep.sum()), "corr": {}, "regimes": {}, "layer_ranking": {}, "log10_norm": {}}
    for label, name in CORR_PREDICTORS.items():
        if name not in ds:
            continue
        pred = np.where(keep, _flat(ds, name), np.nan)
        out["corr"][label] = agreement_scores(pred, meas, bins=bins)
        out["layer_ranking"][label], out.setdefault("layer_ranking_probes", {})[label] = within_probe_ranking(
            pred, meas, return_count=True)
        for reg, lo, hi in REGIMES:
            inside = (ratio >= lo) & (ratio < hi)
            sc = agreement_scores(pred[inside], meas[inside], bins=bins)
            ok = inside & np.isfinite(pred) & np.isfinite(meas)
            sc["mean_pred"], sc["mean_meas"] = (float(np.mean(pred[ok])), float(np.mean(meas[ok]))) if ok.any() else (
                float("nan"), float("nan"))
            sc["pred_pos_meas_neg"] = int(np.sum((pred[ok] > 0) & (meas[ok] < 0)))
            out["regimes"].setdefault(reg, {})[label] = sc
    for key, split in (("ceiling", "half"), ("ceiling_alternate", "alt")):  # halves; even / odd steps
        names = (f"meas_{split}1_grad_corr", f"meas_{split}2_grad_corr")
        if not all(n in ds for n in names):
            continue
        a, b = (np.where(keep, _flat(ds, n), np.nan) for n in names)
        out[key] = noise_ceiling(a, b)
        out[f"{key}_regimes"] = {reg: noise_ceiling(a[(ratio >= lo) & (ratio < hi)], b[(ratio >= lo) & (ratio < hi)])
                                 for reg, lo, hi in REGIMES}
        out[f"{key}_sign"] = sign_ceiling(a, b)
        out[f"{key}_sign_regimes"] = {reg: sign_ceiling(a[(ratio >= lo) & (ratio < hi)],
                                                        b[(ratio >= lo) & (ratio < hi)]) for reg, lo, hi in REGIMES}
        out[f"{key}_calibration"] = calibration_floor(a, b, meas, bins=bins)
        norms = (f"meas_{split}1_grad_sq_norm", f"meas_{split}2_grad_sq_norm")
        if all(n in ds for n in norms):
            with np.errstate(divide="ignore", invalid="ignore"):
                out[f"{key}_log10_norm"] = error_floor(*(np.log10(np.where(keep, _flat(ds, n), np.nan)) for n in norms))
        if split == "half":
            out["ceiling_layer_ranking"] = ranking_ceiling(*within_probe_ranking(a, b, return_count=True))
    with np.errstate(divide="ignore", invalid="ignore"):
        meas_n = np.log10(np.where(keep, _flat(ds, "meas_grad_sq_norm"), np.nan))
        for label, name in NORM_PREDICTORS.items():
            if name in ds:
                out["log10_norm"][label] = agreement_scores(np.log10(np.where(keep, _flat(ds, name), np.nan)),
                                                            meas_n, bins=bins)
    return out


def format_protocol(sc):
    """The protocol's scores as a few lines of text (as printed by ``optdyn link``)."""
    f = lambda v: "n/a" if not np.isfinite(v) else f"{v:.2f}"  # noqa: E731
    lines = [f"protocol on {sc['n']} points (the same for every predictor)",
             "correlation      spearman  sign  calib  mae   layer-rank"]
    for label, s in sc["corr"].items():
        lines.append(f"  {label:<14} {f(s['spearman']):>8} {f(s['sign_agreement']):>5} "
                     f"{f(s['calibration_error']):>6} {f(s['mean_abs_error']):>5} {f(sc['layer_ranking'][label]):>8}")
    for reg, by in sc["regimes"].items():
        lines.append(f"regime {reg} (n={next(iter(by.values()))['n']}): " + "; ".join(
            f"{label} {f(s['spearman'])}/{f(s['sign_agreement'])}" for label, s in by.items() if label != "constant"))
    if "ceiling" in sc:
        lines.append("noise ceiling of the measured correlation (split-half, Spearman-Brown): "
                     f"{f(sc['ceiling']['ceiling'])} (split-half {f(sc['ceiling']['split_half'])}); per regime "
                     + "; ".join(f"{reg} {f(c['ceiling'])}" for reg, c in sc["ceiling_regimes"].items())
                     + f"; layer ranking {f(sc['ceiling_layer_ranking']['ceiling'])}")
    if "ceiling_alternate" in sc:
        lines.append(f"  from the even/odd steps split: {f(sc['ceiling_alternate']['ceiling'])}; per regime "
                     + "; ".join(f"{reg} {f(c['ceiling'])}" for reg, c in sc["ceiling_alternate_regimes"].items()))
    if "ceiling_sign" in sc:
        lines.append(format_ceilings(sc))
    lines.append("log10 |g|^2: " + "; ".join(f"{label} spearman {f(s['spearman'])}, err {f(s['mean_abs_error'])} dec"
                                             for label, s in sc["log10_norm"].items()))
    return "\n".join(lines)


def format_ceilings(sc):
    """One line per target: the best score the 25-step measurement allows (halves; even / odd steps
    in brackets), the link's and persistence's, from :func:`protocol_scores`."""
    f = lambda v: "n/a" if not np.isfinite(v) else f"{v:.2f}"  # noqa: E731
    small = REGIMES[0][0]
    rows = [("spearman", sc["ceiling"]["ceiling"], sc.get("ceiling_alternate", {}).get("ceiling", np.nan),
             lambda p: sc["corr"][p]["spearman"]),
            ("sign", sc["ceiling_sign"]["ceiling"], sc.get("ceiling_alternate_sign", {}).get("ceiling", np.nan),
             lambda p: sc["corr"][p]["sign_agreement"]),
            ("calibration (floor)", sc["ceiling_calibration"]["floor"],
             sc.get("ceiling_alternate_calibration", {}).get("floor", np.nan),
             lambda p: sc["corr"][p]["calibration_error"]),
            ("small h spearman", sc["ceiling_regimes"][small]["ceiling"],
             sc.get("ceiling_alternate_regimes", {}).get(small, {}).get("ceiling", np.nan),
             lambda p: sc["regimes"][small][p]["spearman"]),
            ("small h sign", sc["ceiling_sign_regimes"][small]["ceiling"],
             sc.get("ceiling_alternate_sign_regimes", {}).get(small, {}).get("ceiling", np.nan),
             lambda p: sc["regimes"][small][p]["sign_agreement"]),
            ("layer ranking", sc["ceiling_layer_ranking"]["ceiling"], np.nan, lambda p: sc["layer_ranking"][p])]
    if "ceiling_log10_norm" in sc:
        rows.append(("log10-norm err. (floor, dec.)", sc["ceiling_log10_norm"]["floor"],
                     sc.get("ceiling_alternate_log10_norm", {}).get("floor", np.nan),
                     lambda p: sc["log10_norm"][p]["mean_abs_error"]))
    lines = ["ceiling per target (halves [even/odd]): link / persistence"]
    for name, c, alt, score in rows:
        lines.append(f"  {name:<30} {f(c):>5} [{f(alt)}]  {f(score('link'))} / {f(score('persistence'))}")
    return "\n".join(lines)
