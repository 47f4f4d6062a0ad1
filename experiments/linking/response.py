r"""The link's response model and its no-theory baselines (:mod:`experiments.linking.core`).

:func:`response_predict` feeds :func:`dynamics.nqm.response.response_model` with what the probe
measured at each probe step (``probe_curvature=True``; :func:`experiments.trace.probes.microbatch_curvature`):
``grad_signal`` S = ‖E g_l‖², ``grad_noise`` N (at the training batch size), ``grad_curv``
:math:`E[g_{B,l}^\top (H g_B)_l]`, ``grad_curv_mean`` :math:`m_l^\top(Hm)_l` and ``buffer_curv``
:math:`m_l^\top (H b)_l`, with the lr in force at the probe. The layer's noise is one NQM mode at
its noise-weighted curvature :math:`h_N = \alpha\,\mathrm{tr}(H\Sigma)_{ll}/\mathrm{tr}\,\Sigma_{ll}`
and the part of the mean gradient the noise does not explain is a drift with its one-step response
(derivation, assumptions and references in :mod:`dynamics.nqm.response`). The probe estimates are
fed raw by default, or as their trailing mean over ``smooth`` probes (the probe at p and the ones
before it). Only probes at or before p: the measured window around p ends before the next probe, so
a centred mean would feed the forecast a measurement taken after the window it forecasts, which
persistence is denied (docs/findings/link.md). Points where the estimates leave
the model undefined (N ≤ 0, missing) are NaN; nothing is skipped.

:func:`forecast` with ``mode="persistence"`` is the link's default forecast: the equal-weight combination of the
theory's prediction (made from the probe at p) and persistence (the window before p). Two
forecasts with error variances σ₁², σ₂² and error correlation r combine, with weights ½, to error
variance (σ₁² + σ₂² + 2rσ₁σ₂)/4, below the smaller of the two whenever r < min(σ₁/σ₂, σ₂/σ₁)
(Bates & Granger, "The combination of forecasts", Oper. Res. Q. 20, 1969): the theory reads the
state at p (the lr in force, the curvature and noise now), persistence carries what the theory
leaves out but changes slowly (a family's offset, a window's average). The norm is combined in
log space (geometric mean). Equal weights were chosen on the development families over
Bates–Granger weights from each run's past errors (docs/findings/link.md); where there is no
previous window (the first probe) the forecast is the theory's.

:func:`baselines` are the no-theory forecasts of docs/theory.md §9 on the same points:
persistence (the previous probe window's measured value, same run and layer), one mode at the
network's :math:`h = \alpha\lambda_{\max}` (the NQM's :math:`\rho_g(h)`, docs/theory.md §4, the same
for every layer; h held a margin below the edge as in :func:`experiments.linking.predict.with_global_mode`;
undefined where :math:`\lambda_{\max} \le 0`), and the constant 0.
"""

import numpy as np
import xarray as xr

from dynamics.nqm.response import response_model
from dynamics.quadratic import stability_edge
from dynamics.nqm.stationary import gradient_autocorrelation
from experiments.linking.predict import EDGE_MARGIN

RESPONSE_KEYS = ("grad_signal", "grad_noise", "grad_curv", "grad_curv_mean", "buffer_curv")


def has_response_inputs(trace):
    """True when the trace holds the probe measurements the response model needs."""
    return all(k in trace for k in RESPONSE_KEYS)


def response_predict(trace, method, momentum, smooth=1):
    """``pred_grad_corr``, ``pred_grad_sq_norm`` and the model's parts (``pred_h_noise``,
    ``pred_fluct``, ``pred_drift``, ``pred_drift_corr``, ``pred_noise_corr``) over (probe_step,
    layer) of :func:`dynamics.nqm.response.response_model` fed with the probe's estimates
    (their trailing mean over ``smooth`` probes at or before each probe; 1: raw)."""
    if not has_response_inputs(trace):
        missing = [k for k in RESPONSE_KEYS if k not in trace]
        raise ValueError(f"the trace lacks {', '.join(missing)}: run with probe_curvature=True "
                         f"(and noise_microbatches >= 3) for prediction='response'")
    if int(smooth) < 1:
        raise ValueError(f"response_smooth={smooth} is outside the valid range [1, inf)")
    probe = trace["probe_step"].values
    lr = trace["lr"].reindex(step=probe).rename(step="probe_step")
    terms = {k: trace[k].rolling(probe_step=int(smooth), center=False, min_periods=1).mean()
             for k in RESPONSE_KEYS}
    S = terms["grad_signal"]
    out = response_model(method, lr.broadcast_like(S).values, momentum, S.values, terms["grad_noise"].values,
                         terms["grad_curv"].values, terms["grad_curv_mean"].values,
                         terms["buffer_curv"].fillna(0.0).values)
    names = {"corr": "pred_grad_corr", "grad_sq": "pred_grad_sq_norm", "h_noise": "pred_h_noise",
             "fluct": "pred_fluct", "drift": "pred_drift", "drift_corr": "pred_drift_corr",
             "noise_corr": "pred_noise_corr"}
    return xr.Dataset({v: (S.dims, out[k]) for k, v in names.items()}, coords=S.coords)


def baselines(meas, lr, sharpness_global, method, momentum):
    """Baseline forecasts on the link's points: ``base_persist_corr`` / ``base_persist_sq`` (the
    previous probe's measured window, same layer; NaN at the first probe), ``base_one_mode_corr``
    (ρ_g at the network's h, one value per probe for every layer), ``base_const_corr`` (0)."""
    edge = float(stability_edge(method, momentum))
    h = (lr * sharpness_global).values
    defined = np.isfinite(h) & (h > 0)
    hc = np.where(defined, np.minimum(h, edge * (1 - EDGE_MARGIN)), 0.5 * edge)
    one = np.where(defined, gradient_autocorrelation(method, hc, momentum), np.nan)
    one_mode = xr.DataArray(one, dims="probe_step", coords={"probe_step": meas["probe_step"]})
    return xr.Dataset({
        "base_persist_corr": meas["meas_grad_corr"].shift(probe_step=1),
        "base_persist_sq": meas["meas_grad_sq_norm"].shift(probe_step=1),
        "base_one_mode_corr": one_mode.broadcast_like(meas["meas_grad_corr"]),
        "base_const_corr": xr.zeros_like(meas["meas_grad_corr"]),
    })


# ---------------------------------------------------------------------------------------
# forecasts from the theory and the measured past: the default and the alternatives tried on the
# development families (docs/findings/link.md). Each is a function of the theory's prediction and the measured windows
# of the same run and layer before p (along ``probe_step``); none uses the window it forecasts.

FORECASTS = ("persistence", "residual", "change", "persistence2")


def _past_mean(x):
    """Mean of ``x`` over the probes q < p (same run and layer), non-finite entries skipped; NaN
    where no earlier probe has a value."""
    prev = x.shift(probe_step=1)
    n = np.isfinite(prev).cumsum("probe_step")
    return (prev.fillna(0.0).cumsum("probe_step") / n).where(n > 0)


def forecast(mode, theory, meas):
    r"""A forecast of the window at p from the theory's prediction ``theory`` (at every p) and the
    measured windows ``meas`` (used only before p), both DataArrays with a ``probe_step`` dim
    (for E‖g‖² pass their logarithms: every mode is then a ratio model). Where a mode's past input
    is missing (the first probes) it falls back to the combination with one window, and where
    there is no window before p to the theory alone.

    - "persistence" (the default, module docstring): :math:`\tfrac12[T(p) + M(p-1)]`, the
      geometric mean for E‖g‖²;
    - "residual": :math:`T(p) + \overline{M(q) - T(q)}_{q<p}`: the theory supplies the dynamics and
      the run-and-layer's past residuals its offset; exact for a theory that is off by a constant
      per layer;
    - "change": :math:`M(p-1) + T(p) - T(p-1)`: the theory's predicted change laid on the measured
      level (exact when the theory's error is constant in time: an lr decay between p−1 and p
      that persistence misses is then carried by the theory);
    - "persistence2": :math:`\tfrac12[T(p) + \tfrac12(M(p-1) + M(p-2))]`: persistence over two
      windows, whose sampling noise is half that of one if the two windows' errors are
      independent and the true value has not moved.
    """
    if mode not in FORECASTS:
        raise ValueError(f"combine={mode!r} is unknown; valid: none, {', '.join(FORECASTS)}")
    p1 = meas.shift(probe_step=1)
    half = xr.where(np.isfinite(p1), 0.5 * (theory + p1), theory)
    if mode == "persistence":
        return half
    if mode == "residual":
        new = theory + _past_mean(meas - theory)
    elif mode == "change":
        new = p1 + theory - theory.shift(probe_step=1)
    else:
        new = 0.5 * (theory + 0.5 * (p1 + meas.shift(probe_step=2)))
    return xr.where(np.isfinite(new), new, half)


def forecast_link(mode, theory_corr, theory_sq, meas_corr, meas_sq):
    """:func:`forecast` of the correlation (clipped into [−1, 1]) and of E‖g‖² (in log space) of a
    link; non-positive norms are undefined (NaN) in log space."""
    corr = forecast(mode, theory_corr, meas_corr).clip(-1.0, 1.0)
    log = lambda x: np.log(x.where(x > 0))  # noqa: E731
    sq = np.exp(forecast(mode, log(theory_sq), log(meas_sq)))
    return corr, sq
