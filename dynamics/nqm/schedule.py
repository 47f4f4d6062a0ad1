r"""Non-stationary NQM: the second-moment recursion of :mod:`dynamics.nqm.stationary` run
forward under a learning-rate schedule (PyTorch's buffer form, docs/theory.md §1); the schedules
themselves are :func:`dynamics.schedules.lr_schedule`."""

import numpy as np

from dynamics._checks import check_momentum, check_positive
from dynamics.nqm.stationary import update_coefficients

def schedule_prediction(method, lrs, momentum, lam, sigma2, x0_var=0.0, weights=None,
                        per_mode=False):
    r"""Second moments of the NQM run forward under a per-step lr (PyTorch's buffer form).

    Step t uses ``lrs[t]`` (and ``momentum[t]`` if an array, ``method[t]`` if a sequence of
    names: a change of method mid-run); the gradient at step t is
    :math:`g_t = \lambda_t x_t + \xi_t`. ``lam`` and ``sigma2`` are per-mode arrays, shape
    (n,) or (T, n) (a per-step spectrum, e.g. rising sharpness); ``x0_var`` is
    :math:`E[x_0^2]` per mode (the mean-square distance of the start from the minimum:
    deterministic starts give :math:`x_0^2`), and the buffer starts at 0. ``weights`` are mode
    multiplicities (default 1). The recursion is exact (no stationarity assumed), vectorised
    over modes and looped over steps:
    :math:`P_{t+1} = A_t P_t A_t^\top + \sigma_t^2 B_t B_t^\top`,
    :math:`E[s_{t+1} g_t] = A_t E[s_t g_t] + \sigma_t^2 B_t`.

    Returns dict of (T,) arrays indexed like a trace's ``step``: ``grad_sq`` = E|g_t|²,
    ``full_grad_sq`` = E|H x_t|², ``update_sq`` = E|Δθ_t|² with
    :math:`\Delta\theta_t = -\alpha_t(c_g g_t + c_b b_{t-1})`, i.e. per mode
    :math:`\alpha_t^2(c_g^2 E g_t^2 + 2 c_g c_b \lambda E[x_t b_{t-1}] + c_b^2 E b_{t-1}^2)`,
    ``lag1`` = E[g_t . g_{t-1}] and ``grad_corr`` =
    lag1 / sqrt(E|g_t|² E|g_{t-1}|²) (both NaN at t = 0, like the tracer's ``grad_cos``);
    with ``per_mode`` also ``mode_grad_sq``, ``mode_lag1`` (T, n). Unstable steps are not an
    error: the moments then grow (a divergent run is a result).
    """
    lrs = np.atleast_1d(check_positive("lrs", lrs, allow_zero=True))
    if lrs.ndim != 1:
        raise ValueError(f"lrs must be one-dimensional (one lr per step), got shape {lrs.shape}")
    T = lrs.shape[0]
    methods = [method] * T if isinstance(method, str) else list(method)
    if len(methods) != T:
        raise ValueError(f"method has {len(methods)} entries; valid: a name or one per step ({T})")
    beta = np.broadcast_to(check_momentum(momentum), (T,))
    sigma2 = check_positive("sigma2", sigma2, allow_zero=True)
    try:
        lam, sigma2 = np.broadcast_arrays(np.atleast_1d(np.asarray(lam, dtype=float)),
                                          np.atleast_1d(sigma2))
        if lam.ndim > 2:
            raise ValueError
        lam, sigma2 = (np.broadcast_to(a, (T, lam.shape[-1])) for a in (lam, sigma2))
    except ValueError:
        raise ValueError(f"lam {np.shape(lam)} and sigma2 {np.shape(sigma2)} must broadcast to "
                         f"(n,) or (T={T}, n)") from None
    n = lam.shape[1]
    w = np.ones(n) if weights is None else np.broadcast_to(
        check_positive("weights", weights, allow_zero=True), (n,))
    pxx = np.broadcast_to(check_positive("x0_var", x0_var, allow_zero=True), (n,)).astype(float)
    pxb, pbb, ux = np.zeros(n), np.zeros(n), np.zeros(n)
    mode_gs, mode_l1, mode_u2 = np.empty((T, n)), np.empty((T, n)), np.empty((T, n))
    for t in range(T):
        lm, s2, alpha = lam[t], sigma2[t], lrs[t]
        cg, cb, bb = (float(c) for c in update_coefficients(methods[t], beta[t]))
        mode_gs[t] = lm * lm * pxx + s2
        mode_u2[t] = alpha * alpha * (cg * cg * mode_gs[t] + 2 * cg * cb * lm * pxb + cb * cb * pbb)
        mode_l1[t] = lm * ux if t else np.nan
        a, c, d, e, p = 1 - alpha * cg * lm, -alpha * cb, lm, bb, -alpha * cg
        ux = a * lm * pxx + c * lm * pxb + s2 * p  # first row of A E[s g] + σ² B
        pxx, pxb, pbb = (a * a * pxx + 2 * a * c * pxb + c * c * pbb + s2 * p * p,
                         a * d * pxx + (a * e + c * d) * pxb + c * e * pbb + s2 * p,
                         d * d * pxx + 2 * d * e * pxb + e * e * pbb + s2)
    grad_sq = mode_gs @ w
    lag1 = mode_l1 @ w
    prev = np.concatenate([[np.nan], grad_sq[:-1]])
    out = {"grad_sq": grad_sq, "full_grad_sq": (mode_gs - sigma2) @ w, "lag1": lag1, "update_sq": mode_u2 @ w,
           "grad_corr": lag1 / np.sqrt(grad_sq * prev)}
    if per_mode:
        out.update(mode_grad_sq=mode_gs, mode_lag1=mode_l1)
    return out
