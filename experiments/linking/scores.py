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


def noise_ceiling(half1, half2, rank=True):
    r"""Split-half reliability of a windowed measurement and the ceiling it puts on any forecast's
    correlation with it.

    ``half1``, ``half2``: the quantity measured over the first and the second half of each window
    (any shapes that broadcast; non-finite pairs dropped). Classical test theory: each half is
    :math:`X_k = T + e_k` with T the value the window measures (here the expected successive-
    gradient correlation of the state over the window) and :math:`e_k` its sampling error. If the
    errors of the two halves are independent of each other and of T with equal variance
    (parallel halves), :math:`r_h = \mathrm{corr}(X_1, X_2) = \mathrm{var}\,T/(\mathrm{var}\,T +
    \sigma_h^2)`; the full window averages the two halves (its estimator is their norm-weighted
    mean), so its error variance is :math:`\sigma_h^2/2` and its reliability is the
    Spearman–Brown prophecy (Spearman 1910; Brown 1910)

    .. math:: R = \mathrm{var}\,T/\mathrm{var}\,X = 2 r_h / (1 + r_h).

    A forecast f made without the window's sampling error (f independent of e) has
    :math:`\mathrm{corr}(f, X) = \mathrm{corr}(f, T)\sqrt{R} \le \sqrt{R}`: ``ceiling`` = √R is
    the best score any forecast can reach, T itself reaching it.

    Departures from the assumptions, and their direction: (i) adjacent halves are not independent
    — the gradient sequence is autocorrelated across their boundary, so where |ρ| is large their
    errors are positively correlated, which raises r_h and overstates the ceiling (slightly: one
    boundary pair against ~W/2 pairs per half); (ii) the state changes between the halves (an lr
    decay inside the window, a transient): the change counts as error, which lowers r_h and
    understates the ceiling (a forecast of the full window's average can then beat it). With
    ``rank`` (default) r_h is Spearman's rank correlation, as the link is scored, and the
    Spearman–Brown step is applied to it as to Pearson's (for a bivariate normal the two differ by
    < 0.02, :math:`r_s = (6/\pi)\arcsin(r/2)`); ``rank=False``: Pearson's. The test checks the
    ceiling against the Spearman score of the true values on a constructed AR(1) trace.

    Returns a dict: ``n`` pairs, ``split_half`` r_h, ``reliability`` R (≤ 0 when r_h ≤ 0: no
    signal), ``ceiling`` √max(R, 0); NaN where n < 3 or a half is constant.
    """
    a, b = _finite_pairs(half1, half2)
    n = a.size
    if n < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"n": int(n), "split_half": float("nan"), "reliability": float("nan"), "ceiling": float("nan")}
    r = float((stats.spearmanr if rank else stats.pearsonr)(a, b).statistic)
    rel = spearman_brown(r)
    return {"n": int(n), "split_half": r, "reliability": rel, "ceiling": float(np.sqrt(max(rel, 0.0)))}


def spearman_brown(r):
    """The reliability 2r/(1 + r) of a measurement over a whole window from the split-half
    correlation r of its two halves (:func:`noise_ceiling`); −inf at r = −1."""
    return 2 * r / (1 + r) if r > -1 else float("-inf")
