r"""One-step response of the stochastic gradient: its successive correlation and energy per
layer from the state at one step (docs/theory.md §2, §4, §7).

Model. Write the update of GD, HB and NAG (PyTorch's convention, docs/theory.md §1) as
:math:`\theta_{t+1} = \theta_t - \alpha(c_g g_t + c_b b_{t-1})`, :math:`b_t = \beta b_{t-1} + g_t`
(:func:`dynamics.nqm.stationary.update_coefficients`: GD c_g = 1, c_b = 0; HB c_g = 1, c_b = β;
NAG c_g = 1 + β, c_b = β²). The mini-batch gradient is :math:`g_t = m(\theta_t) + \xi_t`, with
:math:`m` the population mean gradient and :math:`\xi_t` zero-mean noise, independent between
steps, :math:`E\|\xi_{t,l}\|^2 = N_l` in layer (block) l. To first order in the step (exactly on
a quadratic), :math:`m(\theta_{t+1}) = m_t - \alpha H (c_g g_t + c_b b_{t-1})` with H the
population Hessian of the whole network, so, given the state at t (θ_t, b_{t−1}) and taking
expectations over :math:`\xi_t, \xi_{t+1}`:

.. math::

    E[g_{t+1,l}\cdot g_{t,l}] = S_l - \alpha c_b\, m_l^\top (H b_{t-1})_l
                                - \alpha c_g\, E[g_{t,l}^\top (H g_t)_l],
    \qquad E\|g_{t,l}\|^2 = S_l + N_l,

with :math:`S_l = \|m_{t,l}\|^2` (the layer's mean-gradient energy, ``grad_signal``). The
predicted successive correlation is :math:`\rho_l = E[g_{t+1,l}\cdot g_{t,l}] / E\|g_{t,l}\|^2`,
clipped into [−1, 1] (a correlation; the first-order forecast can leave it past the edge).

The three terms are the parts the earlier noise-only model (:mod:`dynamics.nqm_layer`) could not
separate:

* :math:`S_l` — the persistent mean gradient: where the step barely moves it (small h) it
  gives lag-1 ≈ +1 with weight :math:`S_l/(S_l+N_l)`;
* :math:`\alpha c_g E[g^\top (Hg)_l]` — the response to the step just taken. Its per-example
  part is :math:`\alpha c_g\,\mathrm{tr}(H\Sigma)_{ll}/B`, the mean part
  :math:`\alpha c_g m_l^\top(Hm)_l`; divided by :math:`\|g\|^2` it is α times the curvature
  along the gradient, the batch-sharpness-type quantity of Andreyev & Beneventano (2024)
  (docs/theory.md §7) but with the *population* H, which is what changes the next batch's
  gradient (a batch's own Hessian along its own gradient overstates it by the batch's self
  term). The layer's share of the network's top direction enters through :math:`(Hg)_l`:
  the whole network's step, seen in layer l — no block-diagonal assumption.
* :math:`\alpha c_b m_l^\top (H b_{t-1})_l` — the momentum buffer's push on the mean gradient;
  near the edge the mean gradient and the buffer flip together and this term carries the
  oscillation's sign and size (self-consistently: it is measured, not extrapolated from a
  linear mode).

Consistency with the NQM: on a quadratic with a stationary noise-driven state (m = Hx around the
minimum) the expectations of the terms over the stationary distribution give exactly the NQM's
lag-1 correlation ρ_g of docs/theory.md §4 (:func:`stationary_terms` builds them per mode; the
tests check the identity for GD, HB and NAG). With no mean-gradient drift and no momentum push
beyond the stationary ones, the model *is* the NQM.

Assumptions: first order in the step (H constant over one step; exact on quadratics); the noise of
successive steps independent (fresh batches); the measured window's correlation is that of the
state at the probe (the state is stationary over a window); the terms are estimated without
bias from independent micro-batches (:func:`experiments.sharpness.microbatch_curvature`).
No constant is fitted.

References: Pflug (1990) and Zhang et al. (2019) for the NQM (docs/theory.md §4); Andreyev &
Beneventano, "Edge of Stochastic Stability", arXiv:2412.20553 (2024), docs/theory.md §7.
"""

import numpy as np

from dynamics.nqm.stationary import stationary_state_covariance, update_coefficients


def one_step_response(method, lr, momentum, signal, noise, grad_curv, buffer_curv):
    r"""(ρ, E‖g‖², lag-1 covariance) per point of the one-step response model (module docstring).

    ``signal`` :math:`S=\|m_l\|^2`, ``noise`` :math:`N_l=E\|\xi_l\|^2` (at the training batch
    size), ``grad_curv`` :math:`E[g_l^\top(Hg)_l]`, ``buffer_curv`` :math:`m_l^\top(Hb)_l`; all
    broadcast (numpy or xarray). Where :math:`S+N \le 0` or an input is not finite the point is
    undefined (NaN)."""
    cg, cb, _ = update_coefficients(method, momentum)
    cg, cb = float(np.asarray(cg)), float(np.asarray(cb))
    lag = signal - lr * cb * buffer_curv - lr * cg * grad_curv
    sq = signal + noise
    ok = np.isfinite(sq) & (sq > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (lag / sq).clip(-1.0, 1.0)
    if hasattr(rho, "where"):
        return rho.where(ok), sq.where(ok), lag
    return np.where(ok, rho, np.nan), np.where(ok, sq, np.nan), lag


def stationary_terms(method, lam, lr, momentum, sigma2):
    r"""The model's inputs for one stationary NQM mode (curvature λ, noise variance σ²): dict with
    ``signal`` :math:`E(\lambda x)^2`, ``noise`` σ², ``grad_curv`` :math:`\lambda(E(\lambda x)^2+\sigma^2)`
    and ``buffer_curv`` :math:`E[\lambda x\cdot\lambda b]` from the stationary covariance of the
    state (x_t, b_{t−1}) (:func:`dynamics.nqm.stationary.stationary_state_covariance`)."""
    P = stationary_state_covariance(method, lam, lr, momentum, sigma2)
    lam = np.asarray(lam, dtype=float)
    signal = lam**2 * P[..., 0, 0]
    return {"signal": signal, "noise": np.asarray(sigma2, dtype=float) + 0 * signal,
            "grad_curv": lam * (signal + sigma2), "buffer_curv": lam**2 * P[..., 0, 1]}


def _unit_buffer_ratio(method, h, momentum):
    """E[x b]/(λ E[x²]) of a stationary NQM mode (λ = 1): the momentum buffer's alignment with a
    noise-driven displacement, in units of the mode's curvature (0 for GD)."""
    t = stationary_terms(method, 1.0, h, momentum, 1.0)
    return t["buffer_curv"] / t["signal"]


def response_model(method, lr, momentum, signal, noise, grad_curv, grad_curv_mean, buffer_curv,
                   edge_margin=0.05):
    r"""Successive-gradient correlation and E‖g‖² of a layer: a noise-driven NQM part plus a drift.

    Inputs per point (numpy arrays that broadcast), as the probe measures them at one step:
    ``signal`` S = ‖m_l‖², ``noise`` N = E‖ξ_l‖² (training batch size B), ``grad_curv``
    C = E[g_lᵀ(Hg)_l] (batch size B), ``grad_curv_mean`` a = m_lᵀ(Hm)_l, ``buffer_curv``
    Bc = m_lᵀ(H b)_l (0 for GD).

    The mean gradient is split into a noise-driven fluctuation (the NQM's stationary
    displacement, zero mean over the noise) and a drift D (what the noise does not explain).

    1. Noise-weighted curvature: :math:`C - a = \mathrm{tr}(H\Sigma)_{ll}/B` and
       :math:`N = \mathrm{tr}\,\Sigma_{ll}/B`, so :math:`h_N = \alpha (C - a)/N` is the curvature
       the noise sees (for Σ ∝ H it is the NQM's curvature-weighted mean h). The layer's noise is
       treated as one NQM mode at h_N (held at (1 − ``edge_margin``) of the edge, as the link's
       network top mode is), with the closed forms of docs/theory.md §4:
       :math:`(v, \rho_g) =` :func:`dynamics.nqm.stationary.mode_factors`; its fluctuation energy is
       :math:`F = \min(S^+, N v)` (:math:`S^+ = \max(S, 0)`).
    2. Drift :math:`D = S^+ - F` with the one-step response of the module docstring restricted
       to it: its curvature terms are the measured ones less the
       fluctuation's stationary expectations (:math:`\lambda_N F` and
       :math:`\lambda_N F\,\kappa(h_N)` with :math:`\lambda_N = h_N/\alpha` and κ the stationary
       buffer alignment, :func:`stationary_terms`):
       :math:`\rho_D = \mathrm{clip}(1 - \alpha[c_g a_D + c_b B_D]/D, -1, 1)`.
    3. Cross terms vanish in expectation (the fluctuation has zero mean), so

    .. math:: \rho = \frac{\rho_g(h_N)(N + F) + \rho_D D}{N + S^+}, \qquad E\|g\|^2 = N + S^+ .

    With D = 0 this is the one-mode NQM at h_N exactly; as N/S → 0 it tends to the drift's
    one-step response. Undefined (NaN) where N ≤ 0 or an input is not finite. Returns a dict with
    ``corr``, ``grad_sq``, ``h_noise``, ``fluct`` F, ``drift`` D, ``drift_corr`` ρ_D,
    ``noise_corr`` ρ_g(h_N).
    """
    from dynamics.quadratic import stability_edge
    from dynamics.nqm.stationary import mode_factors

    S, N, C, a, Bc = (np.asarray(x, dtype=float) for x in (signal, noise, grad_curv, grad_curv_mean, buffer_curv))
    S, N, C, a, Bc, lr = np.broadcast_arrays(S, N, C, a, Bc, np.asarray(lr, dtype=float))
    cg, cb, _ = (float(np.asarray(c)) for c in update_coefficients(method, momentum))
    edge = float(stability_edge(method, momentum))
    ok = np.isfinite(S) & np.isfinite(N) & np.isfinite(C) & np.isfinite(a) & np.isfinite(lr) & (N > 0) & (lr > 0)
    ok &= np.isfinite(Bc) | (cb == 0)
    Bc = np.where(np.isfinite(Bc), Bc, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        h_noise = np.where(ok, lr * (C - a) / N, np.nan)
        hc = np.clip(np.nan_to_num(h_noise, nan=1.0), 1e-12, edge * (1 - edge_margin))
        v, rho_g = mode_factors(method, hc, momentum)
        Sp = np.clip(S, 0.0, None)
        F = np.minimum(Sp, N * v)
        D = Sp - F
        lam_n = hc / lr
        kappa = _unit_buffer_ratio(method, hc, momentum) if cb else 0.0
        a_d, b_d = a - lam_n * F, Bc - lam_n * F * kappa
        rho_d = np.where(D > 0, np.clip(1 - lr * (cg * a_d + cb * b_d) / np.where(D > 0, D, 1.0), -1, 1), 1.0)
        corr = (rho_g * (N + F) + rho_d * D) / (N + Sp)
    nan = lambda x: np.where(ok, x, np.nan)  # noqa: E731
    return {"corr": nan(corr), "grad_sq": nan(N + Sp), "h_noise": h_noise, "fluct": nan(F), "drift": nan(D),
            "drift_corr": nan(rho_d), "noise_corr": nan(rho_g)}


def top_direction_response(method, lr, momentum, signal, noise, grad_curv, grad_curv_mean, buffer_curv, signal_top,
                           lam_top, noise_term="exact", edge_margin=0.05):
    r"""A candidate (docs/findings/link.md; not the link's default): :func:`response_model` with the
    mean gradient's part along the network's top Ritz direction given the top mode's dynamics.

    Inputs as :func:`response_model`, plus ``signal_top`` :math:`S_T = (m_l\cdot u_l)^2` (the layer's
    mean gradient along :math:`u_l`, its unit piece of the top Ritz vector v; ``grad_signal_top``) and
    ``lam_top`` λ = λ_max(H). Assumptions: v is an eigenvector (Hv = λv), so the mean gradient's
    coordinate along it evolves as one NQM mode at :math:`h_T = \alpha\lambda` (held below the edge by
    ``edge_margin``), decoupled from the rest; it is that mode's stationary displacement, whose
    gradient λx has lag-1 correlation :math:`\rho_x(h_T) = 1 - h_T(c_g + c_b\kappa(h_T))`
    (:func:`experiments.linking.signal.fluctuation_correlation`; κ the buffer alignment of
    :func:`stationary_terms`) — near the edge ≈ −1, the flip the window shows, where the probe's
    single snapshot of the buffer term :math:`m^\top Hb` need not have the flip's sign. Its
    curvature terms are the stationary ones, :math:`\lambda S_T` and :math:`\lambda\kappa S_T`, taken
    out of the measured ones; the rest :math:`S - S_T` is split into fluctuation and drift as in
    :func:`response_model`.

    ``noise_term``: "exact" uses the exact one-step response of the module docstring for the noise,
    :math:`-\alpha c_g(C - a)` (the noise's response to its own step), with each mean-gradient part
    at its lag-1 correlation (:math:`\rho_x(h_T) S_T + \rho_x(h_N) F + \rho_D D`); on a stationary
    one-mode NQM with the mean gradient all along v it gives the NQM's ρ_g(h) exactly, and with
    :math:`S_T = 0` and an uncapped fluctuation (F = N v) it is :func:`response_model`. "mode" keeps
    :func:`response_model` for the rest (noise at :math:`\rho_g(h_N)`, which already counts the
    fluctuation it drives) and adds :math:`\rho_x(h_T) S_T`: simpler, but on the one-mode NQM it
    counts the top displacement's correlation twice. Returns a dict with ``corr`` and ``grad_sq``
    (N + S⁺, as :func:`response_model`)."""
    from dynamics.nqm.stationary import mode_factors
    from dynamics.quadratic import stability_edge

    if noise_term not in ("exact", "mode"):
        raise ValueError(f"noise_term={noise_term!r} is unknown; valid: exact, mode")
    S, N, C, a, Bc, St, lam, lr = np.broadcast_arrays(*(np.asarray(x, dtype=float) for x in (
        signal, noise, grad_curv, grad_curv_mean, buffer_curv, signal_top, lam_top, lr)))
    cg, cb, _ = (float(np.asarray(c)) for c in update_coefficients(method, momentum))
    edge = float(stability_edge(method, momentum))
    ok = np.isfinite(S) & np.isfinite(N) & np.isfinite(C) & np.isfinite(a) & np.isfinite(lr) & (N > 0) & (lr > 0)
    Bc = np.where(np.isfinite(Bc), Bc, 0.0)
    Sp = np.clip(np.nan_to_num(S), 0.0, None)
    top_ok = np.isfinite(St) & np.isfinite(lam) & (lam > 0)
    ST = np.where(top_ok, np.clip(np.nan_to_num(St), 0.0, Sp), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        hT = np.clip(np.where(top_ok, lr * lam, 1.0), 1e-12, edge * (1 - edge_margin))
        lamT = np.where(top_ok, hT / lr, 0.0)
        kT = _unit_buffer_ratio(method, hT, momentum) if cb else 0.0
        P = stationary_state_covariance(method, 1.0, hT, momentum, 1.0)
        rho_x = 1 - hT * (cg + cb * P[..., 0, 1] / P[..., 0, 0])
        a_r, b_r, C_r = a - lamT * ST, Bc - lamT * kT * ST, C - lamT * ST
        if noise_term == "mode":
            rest = response_model(method, lr, momentum, Sp - ST, N, C_r, a_r, b_r, edge_margin)
            corr = (rest["corr"] * rest["grad_sq"] + rho_x * ST) / (N + Sp)
        else:
            hN = np.clip(np.nan_to_num(lr * (C - a) / N, nan=1.0), 1e-12, edge * (1 - edge_margin))
            v, _ = mode_factors(method, hN, momentum)
            F = np.minimum(Sp - ST, N * v)
            D = Sp - ST - F
            kN = _unit_buffer_ratio(method, hN, momentum) if cb else 0.0
            PN = stationary_state_covariance(method, 1.0, hN, momentum, 1.0)
            rho_f = 1 - hN * (cg + cb * PN[..., 0, 1] / PN[..., 0, 0])
            lamN = hN / lr
            a_d, b_d = a_r - lamN * F, b_r - lamN * kN * F
            rho_d = np.where(D > 0, np.clip(1 - lr * (cg * a_d + cb * b_d) / np.where(D > 0, D, 1.0), -1, 1), 1.0)
            corr = (rho_x * ST + rho_f * F + rho_d * D - lr * cg * (C - a)) / (N + Sp)
    return {"corr": np.where(ok, np.clip(corr, -1.0, 1.0), np.nan), "grad_sq": np.where(ok, N + Sp, np.nan)}
