r"""The optional mean-gradient (signal) term of the link (:mod:`experiments.linking.core`): the NQM
prediction with the probe's measured ‖E g‖² mixed in (:func:`with_signal`), and the lag-1
correlations it can be given (:func:`fluctuation_correlation`, :func:`mean_part_correlation`)."""

import numpy as np
import xarray as xr

from dynamics.quadratic import char_roots
from dynamics.nqm.stationary import stationary_state_covariance, state_space

# the mean-gradient (signal) term (with_signal): none (plain NQM, default), its lag-1 correlation
# that of the network top mode's stationary fluctuation (fluct), of its dominant root (root), +1 (drift)
SIGNALS = ("none", "fluct", "root", "drift")


def mean_part_correlation(method, h, momentum):
    r"""Successive correlation of the deterministic part of a mode's gradient,
    :math:`\cos\arg z_1 = \mathrm{Re}\,z_1/|z_1|` with :math:`z_1` the dominant root of the
    method's characteristic polynomial at ``h`` (docs/theory.md §2). Without noise a mode's gradient
    is :math:`m_t = \mathrm{Re}(c z_1^t) + \dots`; for a complex pair :math:`z = r e^{\pm i\theta}`,
    :math:`m_t = r^t\cos(\theta t + \phi)` and
    :math:`\sum_t m_t m_{t-1}/\sqrt{\sum_t m_t^2\sum_t m_{t-1}^2} \to \cos\theta` over many
    periods; for real roots the dominant one wins and the ratio tends to sign(z_1): +1 in the
    monotone regime (persistent drift at small h), −1 in the flip regime. Broadcasts over h."""
    hh = np.asarray(h, dtype=float)
    z = np.asarray(char_roots(method, np.nan_to_num(hh), momentum))[..., 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(np.isfinite(hh), np.where(np.abs(z) > 0, np.real(z) / np.abs(z), 0.0), np.nan)
    return xr.DataArray(rho, dims=h.dims, coords=h.coords) if isinstance(h, xr.DataArray) else rho


def fluctuation_correlation(method, h, momentum):
    r"""Lag-1 correlation :math:`E[x_{t+1}x_t]/E[x_t^2]` of a mode's stationary noise-driven
    iterate (so of its gradient λx): :math:`(AP)_{00}/P_{00}` with P the stationary state
    covariance (:func:`dynamics.nqm.stationary.stationary_state_covariance`) and A the mode's
    state matrix; it depends on h only (HB: :math:`1 - h/(1+\beta)`, docs/theory.md §4). ≈ 1 at
    small h (a displacement persists), → −1 at the edge. Broadcasts over h."""
    hh = np.asarray(h, dtype=float)
    flat = np.clip(np.nan_to_num(hh.ravel()), 1e-12, None)
    one = np.ones_like(flat)
    P = stationary_state_covariance(method, one, flat, momentum, one)
    A, _ = state_space(method, one, flat, momentum)
    rho = np.where(np.isfinite(hh.ravel()), (A @ P)[..., 0, 0] / P[..., 0, 0], np.nan).reshape(hh.shape)
    return xr.DataArray(rho, dims=h.dims, coords=h.coords) if isinstance(h, xr.DataArray) else rho


def with_signal(pred_corr, pred_sq, pred_full_sq, signal, rho_mean):
    r"""The NQM prediction with the measured mean-gradient (signal) part added.

    Model: a layer's stochastic gradient :math:`g_t = m_t + \xi_t`, with :math:`\xi_t` the NQM
    part (zero mean; :math:`E\|\xi\|^2` = ``pred_sq``, successive correlation
    :math:`\rho_N` = ``pred_corr``) and :math:`m_t` the part of the mean gradient the NQM
    does not produce, with :math:`E[m_t\cdot m_{t-1}] = \rho_m\|m\|^2` (``rho_mean``). The
    cross terms vanish in expectation (ξ has zero mean, independent of m), so

    .. math:: \rho = \frac{\rho_N E\|\xi\|^2 + \rho_m \|m\|^2}{E\|\xi\|^2 + \|m\|^2},
       \qquad E\|g\|^2 = E\|\xi\|^2 + \|m\|^2 .

    The probe measures ``signal`` = ‖E g‖² at θ (:func:`experiments.trace.probes.microbatch_moments`),
    which is :math:`\|m + Hx\|^2`; the NQM's own full-batch part :math:`F = E\|Hx\|^2`
    (``pred_full_sq``) is taken out so nothing is counted twice:
    :math:`\|m\|^2 = \max(\text{signal} - F, 0)`. Missing signal: no term.
    Returns (corr, grad_sq_norm, ‖m‖²)."""
    mean_sq = (signal.clip(min=0) - pred_full_sq.fillna(0.0)).clip(min=0).fillna(0.0)
    corr = (pred_corr * pred_sq + rho_mean * mean_sq) / (pred_sq + mean_sq)
    return corr, pred_sq + mean_sq, mean_sq
