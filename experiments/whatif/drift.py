r"""The default's prediction with the unchanged run's *post-escape drift* of the gradient norm
(and the update:parameter ratio) added: a predictor option of :mod:`experiments.whatif.predict`
(docs/findings/whatif.md, "Sixth round"). With the flow clock on the plateau-escape forecast and
the sharpening after an lr decrease it is the predictor in use (:func:`experiments.whatif.predict.default_predictor`).

Most scored norm moves (54–71 %) are the unchanged run's own drift, which the default (the
link's NQM at fixed curvature, anchored on window 0) treats as stationary. The fourth round's
flow-time trend (:mod:`experiments.whatif.delta`) caught the drift but lost the correlation,
because it (a) continued ρ's slope, (b) through plateau escapes and (c) through slopes that
sampling noise alone makes. Here ρ, h/edge and the regime are the default's exactly, and per
layer l, change c and window j ≥ 1 after k

.. math::

    \widehat{\|g_l\|}_j(c) = \underbrace{\|g_l\|_{{\rm meas},0}
        \sqrt{E\|g\|^2_{{\rm model},j}(c) / E\|g\|^2_{{\rm model},0}}}_{\text{the default}}
        \; e^{\hat s_l\,(t_j(c) - t_0)},

which is :mod:`~experiments.whatif.delta`'s base × effect,
base_j × √(E_model,j(c)/E_model,j(ref)), with the base the default's own forecast of the
reference plan (window 0 × the model's motion of the unchanged plan, which the persistence base
of the fourth round lost) times the drift: the model's window 0 is the same for every plan
(the plans agree before k), so the ref terms cancel. The log10 update ratio gets
r̂_j(c) = r̂_j^default(c) + ŝ^r_l (t_j(c) − t_0) with its own slope, by the same argument: it
is a level (log |Δθ|/|θ|) whose drift in the unchanged run (the gradient it is made of, the
parameter norm it is divided by) is not the model's, and whose model effect is a ratio.
Where no drift is kept (ŝ = 0) the prediction is the default's, bit for bit.

The drift ŝ_l, from the windows of width W before k (window 0 = [k − W, k)):

(a) *Only after the plateau escape.* A window is *escaped* if its probes (those in [a, b);
    without one, the last probe ≤ a) all have λ_max ≥ SHARPENED (2) × the first probe's λ_max
    (the third round's definition of having left the initial plateau,
    :data:`experiments.whatif.curvature.SHARPENED`). The fit uses the unbroken run of escaped
    windows ending at window 0, at most the last :data:`N_FIT` = 3 (the link model's trailing
    mean, :data:`experiments.whatif.delta.N_TREND`); with fewer than 2, no drift (a run still on
    its plateau at k, or one that escaped within the last window: the jump is not a drift).
(b) *Only a slope sampling noise could not make.* ŝ is the least-squares slope of
    y_i = log ‖g_l‖ (window i) on the clock t_i; its standard error is the larger of two
    estimates: the sampling one, from each window's batch means (:data:`N_BATCH` = 10
    consecutive batches of W/10 steps: var(mean of ‖g‖²) ≈ var(batch means)/B, which holds for
    the per-step series' correlation time well below W/10 steps; δ-method σ_i = SE/(2 m_i)),
    var(ŝ) = Σ d_i² σ_i² / (Σ d_i²)², d_i = t_i − t̄; and, with three windows, the residual one,
    SSR/(n − 2)/Σ d_i², which also carries the slower fluctuations of the trajectory. The slope
    is kept where |ŝ|/SE ≥ :data:`T_KEEP` = 2 (the two-sided 5 % normal quantile, rounded; a
    hard threshold: a slope indistinguishable from noise predicts no drift, as the default) and
    set to 0 elsewhere. No constant here was fitted on any score.

The eighth round's options (docs/findings/whatif.md, "Eighth round"; the defaults above are the
sixth round's):

(a') ``gate="since_escape"``: the fit uses the unbroken run of windows ending at window 0 that start
     at or after the run's plateau escape (its first probe at λ ≥ 2 λ_0), or, in a run that never
     escaped, after its first window (the transient from the initialization)
     (:func:`since_escape_windows`); none where the run is on its plateau and leaving it at k (the
     plateau-escape forecast's rising fit, :func:`experiments.whatif.escape.fit_escape`: that
     motion is the escape forecast's, not a drift). Why: gate (a) keeps the drift off wherever
     λ_max falls back below 2 λ_0 after an early bump, or never reaches it (a network without a
     plateau, e.g. an MLP whose curvature falls as it fits the data), although its norm drifts
     (in the ReLU MLP on digits, 91 % of the scored norm moves are the unchanged run's own,
     ``analyses/whatif_ceilings.py``'s ``drift_share``).
(b') ``fit="batches"``: the slope is fitted on the :data:`N_BATCH` batch means per fitted window
     (log ½ of the batch's mean ‖g‖², at the batch's mean clock), with the residual standard
     error, SSR/(n − 2)/Σ d_i², as its SE (the batch means' scatter carries their sampling noise),
     so one window (10 points) is enough: a change early in a run (k = 2W) has one window after
     the first. Batch means of W/10 steps are not independent where the per-step series is
     correlated over more steps (momentum β: ~1/(1 − β) steps), which makes this SE optimistic
     by up to ~√2 at β = 0.9; the threshold T_KEEP is not changed for it (no constant fitted).

*Clock* t: ``"steps"`` (the window's mean step: the drift keeps its pace whatever the change)
or ``"flow"`` (the window's mean flow time τ = Σ α/(1 − β) under each change's own plan,
:func:`experiments.whatif.delta.window_clock`: a drift along the optimizer's flow runs twice as
fast after lr × 2 and ten times slower after a decay × 0.1). Before k the two agree up to a
factor wherever the lr and momentum were constant over the fitted windows.

Assumptions: the drift of log ‖g_l‖ after the escape is log-linear over the fitted windows
and the next ones (no new escape, no saturation within the horizon); the change's effect is
multiplicative and independent of the drift (as in :mod:`~experiments.whatif.delta`); the
model's own motion of the unchanged plan (NQM relaxation under the last probe's spectrum, a
scheduled decay) and the measured drift are separate (the model's spectrum is held fixed, so
the drift it lacks is the one measured). ``inner``: the model whose default anchoring is
used (default :func:`experiments.whatif.core.nqm_predictor`; the plateau-escape forecast,
:func:`experiments.whatif.escape.predictor`, acts only before the escape, the drift only
after it, so the two combine without overlap).
"""

import functools
import warnings

import numpy as np
import xarray as xr

from experiments.linking.core import run_method
from experiments.whatif.core import anchor_on_window0, measure_windows, nqm_predictor
from experiments.whatif.curvature import SHARPENED, flow_time
from experiments.whatif.delta import window_clock
from experiments.whatif.escape import fit_escape

CLOCKS = ("steps", "flow")
GATES = ("escaped", "since_escape")
FITS = ("windows", "batches")
N_FIT = 3  # at most this many escaped windows before k in the fit (delta.N_TREND, the link's trailing mean)
N_BATCH = 10  # batch means per window for the sampling standard error
T_KEEP = 2.0  # a slope is kept where |slope| / SE >= this


def past_windows(at, width):
    """The windows [a, b) of ``width`` steps that end at ``at`` and fit before it, ascending (the
    last is window 0 = [at − W, at)); one, possibly starting before step 0, if none fits."""
    return [(at - i * width, at - (i - 1) * width) for i in range(max(1, at // width), 0, -1)]


def escaped_windows(probe_steps, lam, past):
    """Of the windows ``past`` ([a, b), ascending, the last = window 0) the number of the last ones,
    unbroken, that are escaped (module docstring (a)): all of their probes at λ ≥ SHARPENED × the
    first probe's λ (without a probe inside: the last probe ≤ a)."""
    probe_steps, lam = np.asarray(probe_steps), np.asarray(lam, dtype=float)
    if probe_steps.size == 0 or not (np.isfinite(lam[0]) and lam[0] > 0):
        return 0
    n = 0
    for a, b in reversed(past):
        inside = (probe_steps >= a) & (probe_steps < b)
        if not inside.any():
            inside = probe_steps == probe_steps[probe_steps <= a].max(initial=-1)
        vals = lam[inside]
        if not (vals.size and np.all(np.isfinite(vals)) and np.all(vals >= SHARPENED * lam[0])):
            break
        n += 1
    return n


def since_escape_windows(probe_steps, lam, past, width):
    r"""Of the windows ``past`` ([a, b), ascending, the last = window 0) the number of the last ones,
    unbroken, that start at or after the run's plateau escape (its first probe at λ ≥
    :data:`~experiments.whatif.curvature.SHARPENED` (2) × the first probe's λ), or, for a run
    that has not escaped, at or after ``width`` (not the run's first window, which holds the
    transient from the initialization): the eighth round's gate (module docstring (a')). Unlike
    :func:`escaped_windows` a later fall of λ below 2 λ_0 does not end the count. 0 where the first
    probe's λ is not finite and positive."""
    probe_steps, lam = np.asarray(probe_steps), np.asarray(lam, dtype=float)
    if probe_steps.size == 0 or not (np.isfinite(lam[0]) and lam[0] > 0):
        return 0
    with np.errstate(invalid="ignore"):
        up = np.flatnonzero(lam[1:] >= SHARPENED * lam[0])
    start = int(probe_steps[1 + up[0]]) if up.size else int(width)
    return sum(a >= start for a, _ in past)  # ascending windows: those from start on are the last ones


def batch_se(x, n_batch=N_BATCH):
    """Standard error of the mean of ``x`` (steps, ...) from ``n_batch`` consecutive batch means
    (non-finite steps skipped); NaN where fewer than 2 batches hold a finite value."""
    x = np.asarray(x, dtype=float)
    parts = np.array_split(np.arange(x.shape[0]), int(n_batch))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN batches
        means = np.stack([np.nanmean(x[p], axis=0) for p in parts if p.size])
        k = np.sum(np.isfinite(means), axis=0)
        sd = np.nanstd(means, axis=0, ddof=1)
    return np.where(k >= 2, sd / np.sqrt(np.maximum(k, 1)), np.nan)


def fit_drift(t, y, sigma, t_keep=T_KEEP):
    r"""The kept slope ŝ (module docstring (b)) of ``y`` (n, L) on ``t`` (n,), ``sigma`` (n, L) the
    sampling standard errors of y; also returns the slope before the test and its SE. n < 2, a
    constant clock, or a non-finite value: ŝ = 0."""
    t, y, sigma = np.asarray(t, float), np.asarray(y, float), np.asarray(sigma, float)
    L = y.shape[1:]
    zero = np.zeros(L)
    if t.size < 2 or np.ptp(t) == 0:
        return zero, zero, np.full(L, np.inf)
    d = t - t.mean()
    dd = d @ d
    slope = np.tensordot(d, y - y.mean(axis=0), axes=(0, 0)) / dd
    var = np.tensordot(d**2, sigma**2, axes=(0, 0)) / dd**2
    if t.size >= 3:
        resid = y - y.mean(axis=0) - slope * d.reshape((-1,) + (1,) * len(L))
        var = np.maximum(var, np.sum(resid**2, axis=0) / (t.size - 2) / dd)
    se = np.sqrt(var)
    ok = np.all(np.isfinite(y), axis=0) & np.isfinite(se) & (se > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        keep = ok & (np.abs(slope) >= t_keep * se)
    return np.where(keep, slope, 0.0), np.where(ok, slope, 0.0), np.where(ok, se, np.inf)


def window_stats(trace, past):
    """Per past window (rows) and layer: log ‖g‖ (½ log of the mean ‖g‖²) and its batch-means SE,
    the mean log10 update ratio and its SE (module docstring (b))."""
    g2 = trace["grad_norm"].transpose("step", "layer").values.astype(float) ** 2
    r = trace["update_ratio"].transpose("step", "layer").values.astype(float)
    out = {k: [] for k in ("log_norm", "log_norm_se", "ratio", "ratio_se")}
    for a, b in past:
        x, u = g2[a:b], np.where(np.isfinite(r[a:b]), r[a:b], np.nan)
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN layers
            m = np.nanmean(x, axis=0)
            out["log_norm"].append(0.5 * np.log(m))
            out["log_norm_se"].append(batch_se(x) / (2 * m))
            out["ratio"].append(np.nanmean(u, axis=0))
            out["ratio_se"].append(batch_se(u))
    return {k: np.array(v) for k, v in out.items()}


def batch_stats(trace, past, n_batch=N_BATCH):
    """Per batch of ``n_batch`` consecutive batches in each window of ``past`` (rows, in order) and
    layer: log ‖g‖ and the mean log10 update ratio (:func:`window_stats` of the batches); and the
    batches' [a, b) (the eighth round's ``fit="batches"``, module docstring (b'))."""
    rows = [(int(p[0]), int(p[-1]) + 1) for a, b in past for p in np.array_split(np.arange(a, b), int(n_batch))
            if p.size]
    st = window_stats(trace, rows)
    return st["log_norm"], st["ratio"], rows


def trend_slopes(trace, at, width, n_fit=N_FIT, n_batch=N_BATCH):
    r"""The slopes of the *trend* baseline (no theory): per layer, ŝ of log ‖g_l‖ and ŝ^r of the
    log10 update ratio per step, fitted as the eighth round's ``fit="batches"`` (module docstring
    (b'): :data:`N_BATCH` batch means per window, the residual standard error, kept where
    |ŝ|/SE ≥ :data:`T_KEEP`) on the steps clock over the last ``n_fit`` windows [a, a + W) before
    ``at`` that start at or after ``width`` (the run's first window holds the transient from the
    initialization). It reads the measured trace only: no probe, no plateau, no model. Zeros
    where no window qualifies (``at`` < 2W). The baseline carries window 0's measurement forward
    along these slopes, the same for every change (:func:`experiments.whatif.predict.whatif`'s
    ``trend_*``): what a forecaster that extrapolates the run, and knows nothing of the change,
    predicts."""
    L = trace.sizes["layer"]
    past = [(a, b) for a, b in past_windows(at, width) if a >= width][-int(n_fit):]
    if not past:
        return np.zeros(L), np.zeros(L)
    y_norm, y_ratio, rows = batch_stats(trace, past, n_batch)
    t = np.array([(a + b - 1) / 2 for a, b in rows])
    return fit_drift(t, y_norm, np.zeros_like(y_norm))[0], fit_drift(t, y_ratio, np.zeros_like(y_ratio))[0]


def trend_forecast(trace, at, windows, meas0):
    """The trend baseline's forecast (no theory): window 0's measured norm and log10 update ratio
    (``meas0``, over layer) carried along :func:`trend_slopes` per step to each window's mid-step,
    over (window, layer) in ``meas0``'s layer order: ‖g‖̂_j = ‖g‖_0 e^{ŝ Δt_j}, r̂_j = r_0 + ŝ^r Δt_j."""
    s_norm, s_ratio = trend_slopes(trace, at, windows[0][1] - windows[0][0])
    mid0 = (windows[0][0] + windows[0][1]) / 2
    dt = xr.DataArray([(a + b) / 2 - mid0 for a, b in windows], dims="window")
    layers = meas0["layer"].values
    slope = lambda s: xr.DataArray(s, dims="layer", coords={"layer": trace["layer"].values}).sel(layer=layers)  # noqa: E731
    return meas0["grad_norm"] * np.exp(dt * slope(s_norm)), meas0["update_ratio"] + dt * slope(s_ratio)


def _clock(clock, plan, rows):
    """The clock of each row [a, b) under ``plan``: its mean flow time (``"flow"``,
    :func:`experiments.whatif.delta.window_clock`) or its mean step (``"steps"``)."""
    return window_clock(plan, rows) if clock == "flow" else np.array([(a + b - 1) / 2 for a, b in rows])


def drift_predictor(trace, config, at, plans, windows, clock="steps", inner=None, n_fit=N_FIT, gate="escaped",
                    fit="windows"):
    """A predictor (:data:`experiments.whatif.predict.PREDICTOR`'s signature): the ``inner``
    model's values for ``plans``, and in the ``anchored_*`` outputs the default's window-0
    anchoring of them with the kept drift of the module docstring on the norm and the update
    ratio (ρ untouched). ``trace``: the run before ``at`` (as :func:`whatif` passes it). The
    fitted slopes are in ``drift_norm`` / ``drift_ratio`` (layer; per unit of the clock)."""
    if clock not in CLOCKS:
        raise ValueError(f"clock={clock!r} is unknown; valid: {', '.join(CLOCKS)}")
    if int(n_fit) < 2:
        raise ValueError(f"n_fit={n_fit} is outside the valid range [2, inf)")
    if gate not in GATES:
        raise ValueError(f"gate={gate!r} is unknown; valid: {', '.join(GATES)}")
    if fit not in FITS:
        raise ValueError(f"fit={fit!r} is unknown; valid: {', '.join(FITS)}")
    inner = nqm_predictor if inner is None else inner
    model = inner(trace, config, at, plans, windows)
    method, momentum = run_method(config)
    meas0 = measure_windows(trace, windows[:1], method, momentum).isel(window=0, drop=True)
    corr, norm, ratio = anchor_on_window0(meas0, model)  # the default's anchoring (whatif), to the bit
    width = windows[0][1] - windows[0][0]
    past = past_windows(at, width)
    probes = trace["probe_step"].values
    lam = trace["sharpness_global"].values if "sharpness_global" in trace else np.full(probes.size, np.nan)
    if gate == "escaped":
        n = escaped_windows(probes, lam, past)
    else:  # a run on its plateau and leaving it at k: that motion is the escape forecast's
        tau_p = flow_time(trace["lr"].values, momentum)[np.clip(probes, 0, trace.sizes["step"])]
        n = 0 if fit_escape(tau_p, lam).rising else since_escape_windows(probes, lam, past, width)
    n = min(n, int(n_fit))
    L = trace.sizes["layer"]
    s_norm, s_ratio = np.zeros(L), np.zeros(L)
    dt = np.zeros((len(plans), len(windows)))
    fitted = n >= (2 if fit == "windows" else 1)
    if fitted:
        past = past[-n:]
        if fit == "windows":
            st = window_stats(trace, past)
            t_past = _clock(clock, plans[0], past)
            s_norm = fit_drift(t_past, st["log_norm"], st["log_norm_se"])[0]
            s_ratio = fit_drift(t_past, st["ratio"], st["ratio_se"])[0]
        else:  # the batch means' residual scatter is their standard error (no sampling term)
            y_norm, y_ratio, rows = batch_stats(trace, past)
            t_b = _clock(clock, plans[0], rows)
            s_norm = fit_drift(t_b, y_norm, np.zeros_like(y_norm))[0]
            s_ratio = fit_drift(t_b, y_ratio, np.zeros_like(y_ratio))[0]
        t0 = _clock(clock, plans[0], past[-1:])[0]
        for c, p in enumerate(plans):
            dt[c, 1:] = _clock(clock, p, windows[1:]) - t0
    dims = ("change", "window", "layer")
    dt = xr.DataArray(dt, dims=("change", "window"), coords={"change": model["change"], "window": model["window"]})
    s_n = xr.DataArray(s_norm, dims="layer", coords={"layer": trace["layer"].values})
    s_r = xr.DataArray(s_ratio, dims="layer", coords={"layer": trace["layer"].values})
    ds = model.copy()
    ds["anchored_grad_corr"] = corr.transpose(*dims)
    if fitted:  # else the default's outputs untouched (bit for bit)
        norm = norm * np.exp(dt * s_n)
        ratio = ratio + dt * s_r
    ds["anchored_grad_norm"] = norm.transpose(*dims)
    ds["anchored_update_ratio"] = ratio.transpose(*dims)
    ds["drift_norm"] = s_n.reindex(layer=model["layer"].values)
    ds["drift_ratio"] = s_r.reindex(layer=model["layer"].values)
    return ds


def predictor(clock="steps", **kw):
    """:func:`drift_predictor` with ``clock`` (and keywords) bound: a PREDICTOR."""
    if clock not in CLOCKS:
        raise ValueError(f"clock={clock!r} is unknown; valid: {', '.join(CLOCKS)}")
    return functools.partial(drift_predictor, clock=clock, **kw)


__all__ = ["CLOCKS", "FITS", "GATES", "N_BATCH", "N_FIT", "T_KEEP", "batch_se", "batch_stats", "drift_predictor",
           "escaped_windows", "fit_drift", "past_windows", "predictor", "since_escape_windows", "trend_forecast",
           "trend_slopes", "window_stats"]
