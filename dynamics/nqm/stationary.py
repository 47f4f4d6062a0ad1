r"""Noisy quadratic model (NQM): stationary and scheduled second moments of GD, heavy ball
and Nesterov with additive gradient noise (docs/theory.md §4).

Model. On :math:`f(x) = \tfrac12 x^\top H x` the optimizer sees the stochastic gradient
:math:`g_k = H x_k + \xi_k`, :math:`\xi_k` i.i.d., zero mean, :math:`\mathrm{Cov}\,\xi = \Sigma`,
and updates by the PyTorch rules of :mod:`dynamics.methods` (buffer
:math:`b_k = \beta b_{k-1} + g_k`, :math:`b_0 = 0`). Written on the state
:math:`s_k = (x_k, b_{k-1})` every rule is one linear system

.. math::
    x_{k+1} = x_k - \alpha_k (c_g\, g_k + c_b\, b_{k-1}), \qquad
    b_k = \beta b_{k-1} + g_k,

with :math:`(c_g, c_b) = (1, 0)` for GD (and :math:`\beta = 0`), :math:`(1, \beta)` for HB,
:math:`(1+\beta, \beta^2)` for NAG (expand :math:`g_k + \beta b_k`). Hence

.. math::
    s_{k+1} = A_k s_k + B_k \xi_k,\quad
    A_k = \begin{pmatrix} I - \alpha_k c_g H & -\alpha_k c_b I \\ H & \beta I\end{pmatrix},\quad
    B_k = \begin{pmatrix} -\alpha_k c_g I \\ I \end{pmatrix},\quad
    g_k = C s_k + \xi_k,\ C = (H\ \ 0).

The lr enters only the x-row, so a changing lr follows PyTorch's buffer form (THEORY §1).
Second moments :math:`P_k = E[s_k s_k^\top]` obey :math:`P_{k+1} = A_k P_k A_k^\top + B_k
\Sigma B_k^\top`; the stationary one solves the discrete Lyapunov equation
:math:`P = A P A^\top + B \Sigma B^\top` (scipy.linalg.solve_discrete_lyapunov). From it

- :math:`E\|g\|^2 = \mathrm{tr}(C P C^\top) + \mathrm{tr}\,\Sigma` (stochastic gradient),
  :math:`E\|\nabla f\|^2 = \mathrm{tr}(C P C^\top)` (its full-batch part),
- :math:`E[g_{k+j}^\top g_k] = \mathrm{tr}\, C A^{j-1} (A P C^\top + B\Sigma)` for
  :math:`j \ge 1`.

When H and Σ commute everything splits into eigen-modes :math:`(\lambda, \sigma^2)` with
:math:`h = \alpha\lambda`; docs/theory.md §4 gives the closed forms used by
:func:`stationary_iterate_variance`, :func:`gradient_autocorrelation` and
:func:`stationary_gradient_moments` (tests check them against the Lyapunov route and a
Monte-Carlo simulation).

References: Pflug (1990) for GD's :math:`\rho_g = -h/2`; Zhang et al., "Which algorithmic
choices matter at which batch sizes? Insights from a noisy quadratic model", NeurIPS 2019.
"""

from typing import NamedTuple

import numpy as np
import scipy.linalg

from dynamics._checks import broadcast, check_momentum, check_positive
from dynamics.methods import get_method
from dynamics.quadratic import stability_edge



class GradientMoments(NamedTuple):
    """Stationary per-mode moments of the stochastic gradient g = λx + ξ (arrays, broadcast)."""

    grad_sq: np.ndarray  # E g²
    full_grad_sq: np.ndarray  # E (λx)²
    lag1: np.ndarray  # E g_t g_{t+1}
    corr: np.ndarray  # lag1 / grad_sq
    iterate_var: np.ndarray  # Var x


class LyapunovStats(NamedTuple):
    """Stationary gradient statistics of a full (H, Σ) problem by the Lyapunov route."""

    grad_sq: float  # E‖g‖²
    full_grad_sq: float  # E‖Hx‖²
    iterate_cov: np.ndarray  # Cov x
    lags: np.ndarray  # E g_t·g_{t+k}, k = 0..max_lag


# ----------------------------------------------------------------------------- state space
def update_coefficients(method, momentum):
    r"""(c_g, c_b, β_buffer) of the rule :math:`x_{k+1} = x_k - \alpha(c_g g_k + c_b b_{k-1})`,
    :math:`b_k = \beta_{buffer} b_{k-1} + g_k`, broadcast over ``momentum`` (GD ignores it)."""
    m = get_method(method)
    b = np.asarray(momentum, dtype=float)
    if m.name == "gd":
        zero = np.zeros_like(b)
        return 1.0 + zero, zero, zero
    if m.name == "hb":
        return np.ones_like(b), b, b
    return 1.0 + b, b * b, b


def state_space(method, lam, lr, momentum):
    """Per-mode (A, B) on the state (x_k, b_{k-1}): A (..., 2, 2), B (..., 2), broadcast over
    lam, lr, momentum. The gradient is g_k = lam * x_k + xi_k (C = (lam, 0))."""
    lam, lr, momentum = broadcast(lam=lam, lr=lr, momentum=momentum)
    cg, cb, bb = update_coefficients(method, momentum)
    A = np.empty(lam.shape + (2, 2))
    A[..., 0, 0] = 1.0 - lr * cg * lam
    A[..., 0, 1] = -lr * cb
    A[..., 1, 0] = lam
    A[..., 1, 1] = bb
    B = np.stack([-lr * cg, np.ones_like(lam)], axis=-1)
    return A, B


def state_space_matrices(method, hessian, lr, momentum):
    """(A, B, C) for a general symmetric Hessian (n x n): A (2n, 2n), B (2n, n), C (n, 2n)."""
    H = np.asarray(hessian, dtype=float)
    n = H.shape[0]
    cg, cb, bb = (float(c) for c in update_coefficients(method, float(momentum)))
    eye = np.eye(n)
    A = np.block([[eye - lr * cg * H, -lr * cb * eye], [H, bb * eye]])
    B = np.vstack([-lr * cg * eye, eye])
    C = np.hstack([H, np.zeros((n, n))])
    return A, B, C


# ----------------------------------------------------------------------------- validation
def _stability_edge(method, momentum):
    return stability_edge(get_method(method), momentum)


def check_stable(method, h, momentum, *, what="h = lr*lam"):
    """Raise ValueError unless 0 < h < stability_edge(method, momentum) for every mode."""
    h, momentum = broadcast(h=h, momentum=momentum)
    bad = ~((h > 0) & (h < _stability_edge(method, momentum)))
    if np.any(bad):
        idx = [tuple(int(j) for j in i) for i in np.argwhere(bad)]
        shown = ", ".join(f"{i[0] if len(i) == 1 else i}: h={h[i]:.6g}" for i in idx[:8])
        shown = shown.replace("(): ", "")
        more = f" and {len(idx) - 8} more" if len(idx) > 8 else ""
        edge = np.broadcast_to(_stability_edge(method, momentum), h.shape)[idx[0]]
        raise ValueError(
            f"{what} is outside the stability region 0 < h < {edge:.6g} of {method!r} "
            f"(momentum={momentum[idx[0]]:g}): the dynamics diverge there and have no "
            f"stationary state; modes {shown}{more}")
    return h


def check_noise_covariance(sigma, *, rtol=1e-10):
    """Σ must be symmetric positive semi-definite (eigenvalues >= -rtol * max|eig|)."""
    S = np.asarray(sigma, dtype=float)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"noise covariance must be a square matrix, got shape {S.shape}")
    if not np.allclose(S, S.T, rtol=rtol, atol=rtol * np.abs(S).max(initial=0.0)):
        raise ValueError("noise covariance is not symmetric; valid: symmetric PSD matrices")
    eig = np.linalg.eigvalsh(S)
    tol = rtol * max(np.abs(eig).max(initial=0.0), np.finfo(float).tiny)
    if eig.min() < -tol:
        raise ValueError(f"noise covariance is not positive semi-definite: smallest eigenvalue "
                         f"{eig.min():.3g} < 0 (tolerance {tol:.2g}); valid: PSD matrices")
    return S


# ----------------------------------------------------------------------------- Lyapunov route
def lyapunov_covariance(method, hessian, noise_cov, lr, momentum):
    """Stationary E[s s^T] (2n x 2n) of the state (x, b_prev) for a general symmetric Hessian
    and noise covariance, by scipy.linalg.solve_discrete_lyapunov. Raises ValueError if some
    Hessian eigen-direction is outside the stability region or Σ is not PSD."""
    H = np.asarray(hessian, dtype=float)
    S = check_noise_covariance(noise_cov)
    check_positive("lr", lr)
    momentum = float(check_momentum(momentum))
    check_stable(method, lr * np.linalg.eigvalsh(H), momentum,
                 what="h = lr*eigenvalue(hessian)")
    A, B, _ = state_space_matrices(method, H, lr, momentum)
    return scipy.linalg.solve_discrete_lyapunov(A, B @ S @ B.T)


def lyapunov_gradient_stats(method, hessian, noise_cov, lr, momentum, max_lag=1):
    """Stationary gradient statistics of the general model by the Lyapunov route
    (:class:`LyapunovStats`: E‖g‖², E‖Hx‖², E[x xᵀ], and E g_t·g_{t+j} for j = 0..max_lag)."""
    H = np.asarray(hessian, dtype=float)
    S = np.asarray(noise_cov, dtype=float)
    P = lyapunov_covariance(method, H, S, lr, momentum)
    A, B, C = state_space_matrices(method, H, lr, momentum)
    full = np.trace(C @ P @ C.T)
    lags = [full + np.trace(S)]
    U = A @ P @ C.T + B @ S  # E[s_{t+1} g_t^T]
    for _ in range(max_lag):
        lags.append(np.trace(C @ U))
        U = A @ U
    n = H.shape[0]
    return LyapunovStats(grad_sq=lags[0], full_grad_sq=full, iterate_cov=P[:n, :n], lags=np.array(lags))


def stationary_state_covariance(method, lam, lr, momentum, sigma2):
    """Per-mode stationary E[s s^T] (..., 2, 2) of (x, b_prev), batched: the 2x2 Lyapunov
    equation solved as the linear system (I - A kron A) vec P = sigma2 vec(B B^T)."""
    lam, lr, momentum, sigma2 = broadcast(lam=lam, lr=lr, momentum=momentum, sigma2=sigma2)
    check_stable(method, lr * lam, momentum)
    A, B = state_space(method, lam, lr, momentum)
    kron = np.einsum("...ik,...jl->...ijkl", A, A).reshape(lam.shape + (4, 4))
    Q = (sigma2[..., None, None] * B[..., :, None] * B[..., None, :]).reshape(lam.shape + (4,))
    P = np.linalg.solve(np.eye(4) - kron, Q[..., None])[..., 0]
    return P.reshape(lam.shape + (2, 2))


def gradient_autocovariance(method, lam, lr, momentum, sigma2, lags):
    """Stationary E[g_t g_{t+j}] per mode for each j in ``lags`` (non-negative ints), from
    the state-space form: shape broadcast(lam, lr, momentum, sigma2) + (len(lags),)."""
    lags = np.atleast_1d(np.asarray(lags))
    if lags.ndim != 1 or np.any(lags < 0) or not np.issubdtype(lags.dtype, np.integer):
        raise ValueError(f"lags={lags!r} must be non-negative integers")
    lam, lr, momentum, sigma2 = broadcast(lam=lam, lr=lr, momentum=momentum, sigma2=sigma2)
    P = stationary_state_covariance(method, lam, lr, momentum, sigma2)
    A, B = state_space(method, lam, lr, momentum)
    out = np.empty(lam.shape + (len(lags),))
    # E[s_{t+1} g_t] = A E[s_t g_t] + B E[xi_t g_t] = A lam P[:, 0] + sigma2 B
    u = np.einsum("...ij,...j->...i", A, lam[..., None] * P[..., :, 0]) + sigma2[..., None] * B
    gamma = {0: lam**2 * P[..., 0, 0] + sigma2}
    for j in range(1, int(lags.max(initial=0)) + 1):
        gamma[j] = lam * u[..., 0]
        u = np.einsum("...ij,...j->...i", A, u)
    for i, j in enumerate(lags):
        out[..., i] = gamma[int(j)]
    return out


# ----------------------------------------------------------------------------- closed forms
def _validated(method, lam, lr, momentum, sigma2):
    m = get_method(method)
    lam = check_positive("lam", lam)
    lr = check_positive("lr", lr)
    momentum = check_momentum(momentum)
    sigma2 = check_positive("sigma2", sigma2, allow_zero=True)
    lam, lr, momentum, sigma2 = broadcast(lam=lam, lr=lr, momentum=momentum, sigma2=sigma2)
    if m.name == "gd":
        momentum = np.zeros_like(momentum)
    check_stable(m.name, lr * lam, momentum)
    return m.name, lam, lr, momentum, sigma2


def _full_grad_factor(name, h, b):
    """v(h, β) = λ² Var x / σ² = E(∇f)² / σ² per mode (THEORY §4 times λ²/σ²)."""
    if name == "gd":
        return h / (2 - h)
    if name == "hb":
        return h * (1 + b) / ((1 - b) * (2 + 2 * b - h))
    return h * (1 + b + b * h + 2 * b * b * h) / ((1 - b + b * h) * (2 + 2 * b - h * (1 + 2 * b)))


def _lag1_correlation(name, h, b):
    """ρ_g = E[g_t g_{t+1}] / E g² per mode (THEORY §4)."""
    if name == "gd":
        return -h / 2
    if name == "hb":
        return -h * ((1 + b) * (1 - 2 * b) + b * h) / (2 * ((1 - b) * (1 + b) + b * h))
    return (-h * (1 + b) * (1 + b * h - 2 * b * b + 2 * b * b * h)
            / (2 * (1 + b * h - b * b + 2 * b * b * h)))


def mode_factors(method, h, momentum):
    """(v, ρ_g) per mode, unvalidated: v = E(∇f)²/σ², ρ_g = lag-1 gradient correlation, so
    E g² = σ²(1 + v) and E g_t g_{t+1} = ρ_g σ²(1 + v). Both are 0 at h = 0 (the limit of a
    flat mode: the gradient is the white noise alone). Meaningful for 0 <= h < edge only."""
    name = get_method(method).name
    h, b = broadcast(h=h, momentum=momentum)
    if name == "gd":
        b = np.zeros_like(b)
    return _full_grad_factor(name, h, b), _lag1_correlation(name, h, b)


def stationary_iterate_variance(method, lam, lr, momentum, sigma2):
    r"""Stationary Var x per eigen-mode (THEORY §4), broadcast over all arguments.

    GD: :math:`\alpha^2\sigma^2/(h(2-h))`; HB: :math:`\alpha^2\sigma^2(1+\beta)/
    [h(1-\beta)(2+2\beta-h)]`; NAG: :math:`h\sigma^2(1+\beta+\beta h+2\beta^2 h)/
    [\lambda^2(1-\beta+\beta h)(2+2\beta-h(1+2\beta))]`. Requires lam > 0 and h inside the
    stability region (ValueError naming the divergent modes otherwise).

    >>> float(stationary_iterate_variance("gd", 1.0, 0.5, 0.0, 1.0))  # 0.25/(0.5*1.5)
    0.3333333333333333
    """
    name, lam, lr, b, sigma2 = _validated(method, lam, lr, momentum, sigma2)
    return sigma2 * _full_grad_factor(name, lr * lam, b) / lam**2


def stationary_gradient_moments(method, lam, lr, momentum, sigma2):
    """Stationary per-mode gradient moments (:class:`GradientMoments`): ``grad_sq`` (E g², the stochastic
    gradient), ``full_grad_sq`` (E (λx)²), ``lag1`` (E g_t g_{t+1}), ``corr`` (lag1/grad_sq)
    and ``iterate_var`` (Var x), all broadcast over the arguments.

    E g² = σ²(1 + v) with v = λ² Var x/σ² because the noise ξ_t is independent of x_t.
    """
    name, lam, lr, b, sigma2 = _validated(method, lam, lr, momentum, sigma2)
    h = lr * lam
    v = _full_grad_factor(name, h, b)
    rho = _lag1_correlation(name, h, b)
    grad_sq = sigma2 * (1 + v)
    return GradientMoments(grad_sq=grad_sq, full_grad_sq=sigma2 * v, lag1=rho * grad_sq,
                           corr=rho + 0.0 * grad_sq, iterate_var=sigma2 * v / lam**2)


def gradient_autocorrelation(method, h, momentum, lag=1):
    """Stationary correlation E[g_t g_{t+lag}] / E g_t² of the stochastic gradient in one
    eigen-mode; depends on h and momentum only (λ and σ² scale out). lag = 1 is THEORY §4's
    closed form ρ_g; other lags come from the state-space form (A^(lag-1))."""
    m = get_method(method)
    h = check_positive("h", h)
    b = check_momentum(momentum)
    h, b = broadcast(h=h, momentum=b)
    if m.name == "gd":
        b = np.zeros_like(b)
    check_stable(m.name, h, b)
    lag = int(lag)
    if lag < 0:
        raise ValueError(f"lag={lag} is outside the valid range [0, inf)")
    if lag == 1:
        return _lag1_correlation(m.name, h, b)
    gam = gradient_autocovariance(m.name, 1.0, h, b, 1.0, [0, lag])
    return gam[..., 1] / gam[..., 0]
