"""Agreement scores of a prediction against a measurement (used by :mod:`experiments.linking.core`;
importable from there too): Pearson and Spearman correlation, sign agreement, binned
calibration error, mean absolute error, pooled over any array shape."""

import numpy as np
from scipy import stats

SCORES = ("n", "pearson", "spearman", "sign_agreement", "calibration_error", "mean_abs_error")


def calibration_error(predicted, measured, bins=10):
    r"""Binned (ECE-style) calibration error of ``predicted`` against ``measured``.

    The pairs are sorted by the predicted value and cut into ``bins`` groups of (nearly)
    equal size; the error is the count-weighted mean over groups of
    :math:`|\overline{\mathrm{pred}}_b - \overline{\mathrm{meas}}_b|`. Unlike the mean
    absolute error it forgives scatter that averages out within a bin and measures the
    systematic bias of the prediction as a function of its own value: a calibrated
    prediction (E[meas | pred] = pred) scores ≈ 0 however noisy the measurements.
    Non-finite pairs are dropped; an empty input gives NaN.
    """
    pred, meas = _finite_pairs(predicted, measured)
    if bins < 1:
        raise ValueError(f"bins={bins} is outside the valid range [1, inf)")
    if pred.size == 0:
        return float("nan")
    order = np.argsort(pred, kind="stable")
    groups = np.array_split(order, min(bins, pred.size))
    sizes = np.array([g.size for g in groups])
    gaps = np.array([abs(pred[g].mean() - meas[g].mean()) for g in groups])
    return float(np.sum(sizes * gaps) / pred.size)


def agreement_scores(predicted, measured, bins=10):
    """Pearson and Spearman correlation, sign agreement, calibration error and mean absolute
    error of ``predicted`` vs ``measured`` (any shapes that broadcast; pooled flat).

    ``sign_agreement`` is the fraction of pairs whose signs agree (a zero agrees only with
    a zero). Pairs with a non-finite member (a diverged run, a missing probe) are dropped
    and ``n`` counts the pairs used; correlations need n ≥ 3 and a non-constant input,
    else they are NaN.
    """
    pred, meas = _finite_pairs(predicted, measured)
    n = pred.size
    varied = n >= 3 and np.ptp(pred) > 0 and np.ptp(meas) > 0
    return {
        "n": int(n),
        "pearson": float(stats.pearsonr(pred, meas).statistic) if varied else float("nan"),
        "spearman": float(stats.spearmanr(pred, meas).statistic) if varied else float("nan"),
        "sign_agreement": float(np.mean(np.sign(pred) == np.sign(meas))) if n else float("nan"),
        "calibration_error": calibration_error(pred, meas, bins=bins),
        "mean_abs_error": float(np.mean(np.abs(pred - meas))) if n else float("nan"),
    }


def _finite_pairs(predicted, measured):
    pred, meas = np.broadcast_arrays(np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float))
    keep = np.isfinite(pred) & np.isfinite(meas)
    return pred[keep], meas[keep]
