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


def sign_ceiling(half1, half2):
    r"""The best sign agreement any forecast can reach against a windowed measurement, from the
    sign disagreement of the window's two halves.

    Model as in :func:`noise_ceiling`: :math:`X_k = T + e_k` per half, the full window
    :math:`X = T + e` with :math:`e = (e_1 + e_2)/2`, the half errors independent of each other
    and of T and symmetric about 0. The best sign forecast made without the window's error is
    sign(T) (for noise symmetric about 0 the sign of X most often equals that of T), and it misses
    where 0 lies between T and X. To first order in the noise (T's density f smooth near 0 on the
    noise's scale) that happens with probability :math:`f(0)\,E|e|`, and the two halves disagree
    in sign where 0 lies between :math:`X_1` and :math:`X_2`: :math:`f(0)\,E|e_1 - e_2|`. For
    independent symmetric errors :math:`e_1 + e_2` and :math:`e_1 - e_2` have the same
    distribution, so :math:`E|e| = E|e_1 - e_2|/2` and

    .. math:: \text{sign ceiling} = 1 - D_h / 2,

    with :math:`D_h` the fraction of points whose halves differ in sign: no Gaussian assumption, no
    constant fitted (with heterogeneous noise across points the relation holds point by point and
    so for the mean). The departures err as in :func:`noise_ceiling`: state change between the
    halves raises :math:`D_h` (understates the ceiling), correlated errors of adjacent halves lower
    it (overstate); where the noise is large against the spread of T near 0 the first-order step
    fails (the test measures it on a constructed AR(1) trace). Returns a dict: ``n``,
    ``half_disagreement`` D_h, ``ceiling``; NaN where n = 0."""
    a, b = _finite_pairs(half1, half2)
    if a.size == 0:
        return {"n": 0, "half_disagreement": float("nan"), "ceiling": float("nan")}
    d = float(np.mean(np.sign(a) != np.sign(b)))
    return {"n": int(a.size), "half_disagreement": d, "ceiling": 1 - d / 2}


def error_floor(half1, half2):
    r"""The smallest mean absolute error any forecast can reach against a windowed measurement
    (the forecast equal to the window's true value T, scored against X = T + e): with
    :math:`e = (e_1 + e_2)/2` and independent symmetric half errors, :math:`e_1 + e_2` has the
    distribution of :math:`e_1 - e_2 = X_1 - X_2`, so :math:`E|e| = E|X_1 - X_2|/2` exactly (no
    Gaussian assumption). For the norm pass the halves' log10 mean squared norms (the full
    window's log is then the mean of the halves' to first order in the relative error). A trend
    within the window counts as error with the first/second halves (overstating the floor), not
    with the even/odd steps. Returns a dict: ``n``, ``floor``."""
    a, b = _finite_pairs(half1, half2)
    return {"n": int(a.size), "floor": float(np.mean(np.abs(a - b)) / 2) if a.size else float("nan")}


def calibration_floor(half1, half2, full, bins=10):
    r"""The calibration error (:func:`calibration_error`, ``bins`` groups) of the forecast equal
    to the window's true value T, scored against the measured X: per group of n_b points
    :math:`|\bar\beta_b + \bar e_b|`, the estimator's bias β plus the mean of its errors.

    Sampling part: :math:`E e^2 = E(X_1 - X_2)^2/4` per point (independent halves, the full window
    their mean), so the mean of n_b errors has variance :math:`v_b = \overline{(X_1-X_2)^2}_b/(4 n_b)`.
    Bias part: a ratio estimator's bias falls as 1/W (the halves' is twice the full window's), so
    :math:`\beta = E[\bar X_h - X]` with :math:`\bar X_h = (X_1 + X_2)/2`, the jackknife estimate.
    T is unknown, so the groups are cut by X (a proxy: the bias varies slowly with T). The floor is
    :math:`\sum_b (n_b/n)\,E|N(\hat\beta_b, v_b)|`. Returns a dict: ``n``, ``floor``, ``sampling``
    (the floor with β = 0) and ``bias`` (the count-weighted mean of |β̂_b|)."""
    from scipy.stats import norm as normal

    a, b, x = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (half1, half2, full)))
    keep = np.isfinite(a) & np.isfinite(b) & np.isfinite(x)
    a, b, x = a[keep], b[keep], x[keep]
    if x.size == 0:
        return {"n": 0, "floor": float("nan"), "sampling": float("nan"), "bias": float("nan")}
    groups = np.array_split(np.argsort(x, kind="stable"), min(bins, x.size))

    def folded(mu, sd):  # E|N(mu, sd^2)|
        if sd == 0:
            return abs(mu)
        return sd * np.sqrt(2 / np.pi) * np.exp(-mu**2 / (2 * sd**2)) + mu * (1 - 2 * normal.cdf(-mu / sd))

    floor = sampling = bias = 0.0
    for g in groups:
        sd = np.sqrt(np.mean((a[g] - b[g]) ** 2) / 4 / g.size)
        beta = float(np.mean((a[g] + b[g]) / 2 - x[g]))
        floor += g.size * folded(beta, sd)
        sampling += g.size * folded(0.0, sd)
        bias += g.size * abs(beta)
    n = x.size
    return {"n": int(n), "floor": float(floor / n), "sampling": float(sampling / n), "bias": float(bias / n)}
