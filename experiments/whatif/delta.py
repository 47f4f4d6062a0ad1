r"""The what-if prediction as (a forecast of the unchanged run) ∘ (the model's effect of the
change): a predictor option of :mod:`experiments.whatif.predict` (docs/findings/whatif.md,
"Fourth round").

The link model's *levels* are off by errors that all changes share at one (run, k, layer):
the drift of the unchanged run after k (the curvature rising or falling, a plateau escape),
which a model of the change at fixed curvature treats as stationary. Its *differences between
changes* are what it knows. So, per layer and window j ≥ 1 after k, with ``ref`` the
*reference plan* (the run's lr, momentum and method at step k − 1 held from k on: no change
and no scheduled event; for a constant schedule, the run itself):

.. math::

    \hat\rho_j(c) = \hat\rho^{\rm base}_j + [\rho^{\rm model}_j(c) - \rho^{\rm model}_j(\mathrm{ref})],
    \qquad
    \widehat{\|g\|}_j(c) = \widehat{\|g\|}^{\rm base}_j \sqrt{E\|g\|^2_{{\rm model},j}(c) \,/\,
                                                             E\|g\|^2_{{\rm model},j}(\mathrm{ref})},

and the update:parameter ratio (log10) as the correlation, with ½ log10 of the model's
E‖Δθ‖² ratio. A change the schedule makes by itself (``scheduled`` with a decay due at k) is
an effect against the reference like any other. The base forecast (the unchanged run), from
the measured windows before k (window 0 = [k − W, k), and up to ``n_trend`` − 1 before it):

- ``base="persistence"``: window 0's value, carried forward;
- ``base="trend"``: window 0's value plus the trend of the last ``n_trend`` windows (least
  squares slope of ρ, of log ‖g‖ and of the log10 update ratio against the windows' flow
  time), continued to window j: :math:`y^{\rm base}_j = y_0 + s\,(\bar\tau_j - \bar\tau_0)`.
  With no drift (s = 0) it is persistence; with one window only, persistence.

*Clock.* τ = Σ α_t/(1 − β_t), the gradient-flow time (docs/theory.md §3;
:func:`experiments.whatif.curvature.flow_time`), each window at the mean τ of its steps, and
after k the τ of the *changed* plan: the drift of the unchanged run is assumed to be a motion
along the flow its optimizer follows (the curvature's progressive sharpening, the loss
decreasing; Cohen et al. 2021, 2024 "central flow"), which a larger lr or momentum runs
through faster and a decay slower. In steps, a decay ×0.1 would keep the drift's pace; in
flow time it slows it tenfold. Before k the two clocks agree up to a constant factor wherever
the lr and momentum were constant over the fitted windows.

Assumptions: (1) the effect of a change is *additive* on the correlation scale and
*multiplicative* on the norm (and on the update size), and the same whatever the unchanged
run does meanwhile (no interaction of the change with the drift beyond the clock); (2) the
unchanged run's trend over the last ``n_trend`` windows is stationary over the next windows
(log-linear in the norm, linear in ρ; a plateau escape that has not begun by k is not
foreseen); (3) the model's effect at fixed curvature is the change's effect.

The decomposition is the differences-in-differences idea (the treated unit's outcome = the
control's outcome + the treatment effect, estimated as a difference of differences; Card &
Krueger 1994; Angrist & Pischke 2009, ch. 5) with the control forecast by persistence or a
local trend (Hyndman & Athanasopoulos, *Forecasting: Principles and Practice*, 3rd ed.,
§5.2 "naive" and "drift" methods), and the effect a ratio of model outputs, which cancels
the model's level error to first order (the "delta method" of scenario forecasting: a model
is trusted for the difference between scenarios, not their level).
"""

import functools

import numpy as np

from experiments.linking.core import run_method
from experiments.whatif.core import ANCHORED, measure_windows, nqm_predictor
from experiments.whatif.curvature import flow_time

BASES = ("persistence", "trend")
N_TREND = 3  # windows before k in the trend fit (window 0 and the two before it)


def reference_plan(p, at):
    """``p`` (a plan: per-step lr, momentum, method) with step ``at − 1``'s values held from ``at`` on."""
    out = {k: np.array(v, copy=True) for k, v in p.items()}
    for k in out:
        out[k][at:] = out[k][at - 1]
    return out


def window_clock(p, windows):
    """Mean flow time τ of each window's steps under plan ``p`` (windows [a, b))."""
    tau = flow_time(np.asarray(p["lr"], dtype=float), np.asarray(p["momentum"], dtype=float))
    return np.array([tau[a:b].mean() for a, b in windows])


def base_forecast(tau_past, y_past, tau_new, base="persistence"):
    r"""The unchanged run's forecast of one quantity from its last windows (module docstring).

    ``tau_past`` (n,) ascending, ``y_past`` (n, ...) the measured values (the last = window 0),
    ``tau_new`` (m,): (m, ...) forecasts :math:`y_0 + s(\tau - \tau_0)`, s the least-squares
    slope of y on τ (``base="trend"``; 0 for ``"persistence"``, for one window, and where a
    past value is not finite)."""
    if base not in BASES:
        raise ValueError(f"base={base!r} is unknown; valid: {', '.join(BASES)}")
    tau_past, y_past, tau_new = np.asarray(tau_past, float), np.asarray(y_past, float), np.asarray(tau_new, float)
    y0 = y_past[-1]
    slope = np.zeros_like(y0)
    if base == "trend" and tau_past.size >= 2 and np.ptp(tau_past) > 0:
        dt = tau_past - tau_past.mean()
        dy = y_past - y_past.mean(axis=0)
        s = np.tensordot(dt, dy, axes=(0, 0)) / (dt @ dt)
        slope = np.where(np.all(np.isfinite(y_past), axis=0), s, 0.0)
    shape = (-1,) + (1,) * np.ndim(y0)
    return y0 + slope * (tau_new - tau_past[-1]).reshape(shape)


def combine(base_corr, base_norm, base_ratio, model, ref):
    """The prediction from the base forecasts (arrays over (window, layer)) and the model's
    values for the change (``model``) and the reference plan (``ref``), each a mapping with
    ``grad_corr``, ``grad_sq``, ``update_sq`` over (window, layer): (corr, norm, ratio)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = base_corr + (np.asarray(model["grad_corr"]) - np.asarray(ref["grad_corr"]))
        norm = base_norm * np.sqrt(np.asarray(model["grad_sq"]) / np.asarray(ref["grad_sq"]))
        ratio = base_ratio + 0.5 * np.log10(np.asarray(model["update_sq"]) / np.asarray(ref["update_sq"]))
    return corr, norm, ratio


def delta_predictor(trace, config, at, plans, windows, base="persistence", n_trend=N_TREND, inner=None):
    """A predictor (:data:`experiments.whatif.predict.PREDICTOR`'s signature) returning the
    ``inner`` model's values (default :func:`experiments.whatif.core.nqm_predictor` with its
    default curvature) for ``plans`` and, in ``anchored_grad_corr`` / ``anchored_grad_norm`` /
    ``anchored_update_ratio``, the prediction of the module docstring, which
    :func:`experiments.whatif.predict.whatif` uses in place of its window-0 anchoring.
    ``trace``: the run before ``at`` (as :func:`whatif` passes it)."""
    if base not in BASES:
        raise ValueError(f"base={base!r} is unknown; valid: {', '.join(BASES)}")
    if int(n_trend) < 1:
        raise ValueError(f"n_trend={n_trend} is outside the valid range [1, inf)")
    inner = nqm_predictor if inner is None else inner
    ref = reference_plan(plans[0], at)
    model = inner(trace, config, at, list(plans) + [ref], windows)
    width = windows[0][1] - windows[0][0]
    n = max(1, min(int(n_trend), at // width))
    past = [(at - i * width, at - (i - 1) * width) for i in range(n, 0, -1)]
    method, momentum = run_method(config)
    meas = measure_windows(trace, past, method, momentum).sel(layer=model["layer"].values)
    tau_past = window_clock(plans[0], past)
    after = windows[1:]
    shape = (len(plans), len(windows), trace.sizes["layer"])
    out = {k: np.full(shape, np.nan) for k in ANCHORED}
    r = model.isel(change=-1)
    for c, p in enumerate(plans):
        tau_new = window_clock(p, after)
        b_corr = base_forecast(tau_past, meas["grad_corr"].values, tau_new, base)
        b_norm = np.exp(base_forecast(tau_past, np.log(meas["grad_norm"].values), tau_new, base))
        b_ratio = base_forecast(tau_past, meas["update_ratio"].values, tau_new, base)
        m = model.isel(change=c, window=slice(1, None))
        rr = r.isel(window=slice(1, None))
        corr, norm, ratio = combine(b_corr, b_norm, b_ratio, {k: m[k].values for k in ("grad_corr", "grad_sq",
                                    "update_sq")}, {k: rr[k].values for k in ("grad_corr", "grad_sq", "update_sq")})
        out["anchored_grad_corr"][c, 1:], out["anchored_grad_norm"][c, 1:] = corr, norm
        out["anchored_update_ratio"][c, 1:] = ratio
        w0 = meas.isel(window=-1)
        out["anchored_grad_corr"][c, 0] = w0["grad_corr"].values
        out["anchored_grad_norm"][c, 0] = w0["grad_norm"].values
        out["anchored_update_ratio"][c, 0] = w0["update_ratio"].values
    ds = model.isel(change=slice(0, len(plans)))
    for k, v in out.items():
        ds[k] = (("change", "window", "layer"), v)
    return ds


def predictor(base, **kw):
    """:func:`delta_predictor` with ``base`` (and keywords) bound: a PREDICTOR."""
    if base not in BASES:
        raise ValueError(f"base={base!r} is unknown; valid: {', '.join(BASES)}")
    return functools.partial(delta_predictor, base=base, **kw)


__all__ = ["BASES", "N_TREND", "base_forecast", "combine", "delta_predictor", "predictor", "reference_plan",
           "window_clock"]
