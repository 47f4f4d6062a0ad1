r"""What every what-if predictor builds on (:mod:`experiments.whatif.predict` composes them):
the link's NQM run through each plan with the curvature held fixed (:func:`nqm_predictor`,
the model of docs/theory.md §4, §5, §9), the measured windows a prediction is anchored on and
scored against (:func:`measure_windows`), the regime label of a mode (:func:`defined_regime`) and
the step a run diverged at (:func:`diverged_step`).
The predictor options (:mod:`experiments.whatif.delta`, :mod:`experiments.whatif.escape`,
:mod:`experiments.whatif.drift`) wrap :func:`nqm_predictor`; the protocol a predictor follows is
in :mod:`experiments.whatif.predict`'s docstring.
"""

import numpy as np
import xarray as xr

from dynamics.nqm.schedule import schedule_prediction
from dynamics.quadratic import regime, stability_edge
from experiments.linking.core import run_method
from experiments.linking.measure import measured_window
from experiments.linking.predict import EDGE_MARGIN, layer_spectra
from experiments.whatif.curvature import below_edge, flow_time, held_by_lr

# The outputs by which a predictor anchors its own prediction (experiments.whatif.delta); whatif()
# then uses them in place of its window-0 anchoring.
ANCHORED = ("anchored_grad_corr", "anchored_grad_norm", "anchored_update_ratio")


def defined_regime(method, h, momentum):
    """The regime of a mode at h = lr·λ (:func:`dynamics.quadratic.regime`), or "undefined" where
    λ is not positive (a block whose measured top eigenvalue is ≤ 0, BatchNorm at initialisation,
    a saddle: the mode grows away, no regime of a stable quadratic) or not finite, as the link
    labels it (:func:`experiments.linking.core.link_trace`)."""
    return str(regime(method, h, momentum)) if np.isfinite(h) and h > 0 else "undefined"


def diverged_step(trace):
    """The step at which the run diverged (its first non-finite loss or gradient norm), or None:
    the run summary's ``diverged_step`` where ``attrs`` has it, else read off the trace."""
    summary = trace.attrs.get("summary")
    if isinstance(summary, dict) and "diverged_step" in summary:
        s = summary["diverged_step"]
        return None if s is None else int(s)
    bad = np.zeros(trace.sizes["step"], dtype=bool)
    for k in ("loss", "grad_norm_global"):
        if k in trace and trace[k].dims == ("step",):
            bad |= ~np.isfinite(trace[k].values)
    return int(np.argmax(bad)) if bad.any() else None


# --------------------------------------------------------------------------- the link model
# nqm_predictor's curvature forecast by default, chosen on the development settings
# (docs/findings/whatif.md, first two rounds): none, the curvature held fixed. The stochastic-edge
# cap (CurvatureForecast()) predicts the same there (no development run sits at its stochastic
# edge, and the method's edge does not bind), and the rule's tie goes to the simpler model; the
# flow-time sharpening fails the correlation floor. (The predictor in use,
# experiments.whatif.predict.default_predictor, passes the plateau-escape forecast and the
# sharpening after an lr decrease instead.)
FORECAST = None


def nqm_predictor(trace, config, at, plans, windows, smooth=3, signal=True, curvature=FORECAST):
    r"""The link's NQM (:mod:`experiments.linking.predict`) through each plan.

    Each layer's spectrum and noise are built as the link builds them
    (:func:`experiments.linking.predict.layer_spectra`: power-law spectrum from the block
    sharpness and trace, the network's top mode put in, curvature-proportional noise), from
    the probes at or before ``at`` (a trailing mean over ``smooth`` probes). The second-moment
    recursion (:func:`dynamics.nqm.schedule.schedule_prediction`) runs from the minimum at
    step 0 through each plan's per-step lr, momentum and method; step t takes the spectrum of
    the latest probe ≤ t, and from window 0 on that of the last probe ≤ ``at`` (the
    curvature and noise are assumed to persist, so the model's change between window 0
    and the windows after is the effect of the change alone), each mode
    held below the edge of the step's method and lr (:data:`EDGE_MARGIN`). Returns model
    ``grad_corr`` = Σ E[g_t·g_{t−1}] / √(Σ E‖g_t‖² Σ E‖g_{t−1}‖²), ``grad_sq`` (window mean
    of E‖g_t‖²) and ``update_sq`` (window mean of E‖Δθ_t‖²) over (change, window, layer).

    ``signal``: add to ``grad_sq`` the part of the probe's measured ‖E g‖² (``grad_signal``,
    same trailing mean) that the NQM's own E‖Hx‖² in window 0 under the run's own plan does
    not explain, D = max(‖E g‖² − E‖Hx‖²_NQM, 0), held constant: a mean gradient that the
    change does not touch (docs/findings/link.md, item 3).

    ``curvature``: a :class:`experiments.whatif.curvature.CurvatureForecast` (default
    :data:`FORECAST`, None: the curvature held fixed, as above). From step ``at`` on, each
    plan's spectra are multiplied by λ'_t / λ̄ (λ'_t the forecast λ_max, from λ̄, the smoothed λ_max the spectra were built
    from), and the per-mode noise too where the forecast's ``noise`` is on; λ'_t / λ_k (λ_k
    the last probe's) at each window's first step is returned as ``curvature_factor``
    (change, window), which :func:`whatif` applies to the last probe's λ_max in h/edge. A
    forecast whose ``factor`` returns None for a plan moves nothing there (the fixed curvature).
    """
    method, momentum = run_method(config)
    probes = trace["probe_step"].values
    keep = probes[probes <= at]
    if keep.size == 0:
        raise ValueError(f"at={at} is before the run's first probe (step {probes.min() if probes.size else 'none'})")
    sel = trace.sel(probe_step=keep)
    fed = {k: sel[k].rolling(probe_step=int(smooth), min_periods=1).mean()
           for k in ("sharpness", "hessian_trace", "grad_noise", "sharpness_global", "grad_signal") if k in sel}
    lr_probe = trace["lr"].reindex(step=keep).rename(step="probe_step")
    lr_probe = lr_probe.fillna(plans[0]["lr"][np.minimum(keep, len(plans[0]["lr"]) - 1)])
    built = layer_spectra(method, lr_probe, momentum, fed["sharpness"], fed["hessian_trace"], sel["n_params"],
                          fed["grad_noise"], sharpness_global=fed["sharpness_global"])
    horizon = windows[-1][1]
    kappa = np.ones((len(plans), horizon))  # on the spectra (their top: the smoothed probe)
    kappa_h = np.ones((len(plans), horizon))  # on the last probe's λ_max (h/edge)
    lam_g = sel["sharpness_global"].values if "sharpness_global" in sel else np.full(keep.size, np.nan)
    lam_fed = float(fed["sharpness_global"].values[-1]) if "sharpness_global" in fed else np.nan
    if curvature is not None and np.isfinite(lam_g[-1]) and lam_g[-1] > 0 and np.isfinite(lam_fed) and lam_fed > 0:
        # h/edge of each probe with the lr that brought the network there (step p - 1's; the
        # probe at ``at`` is taken before the change, and before a decay due at ``at``), from
        # λ_max and from the batch sharpness (NaN where the trace has none)
        lr_before = trace["lr"].values[np.clip(keep - 1, 0, trace.sizes["step"] - 1)]
        edge0 = float(stability_edge(method, momentum))
        h_probe = lr_before * lam_g / edge0
        bs = sel["batch_sharpness_global"].values if "batch_sharpness_global" in sel else np.full(keep.size, np.nan)
        h_batch = lr_before * bs / edge0
        tau = flow_time(trace["lr"].values, momentum)[np.clip(keep, 0, trace.sizes["step"])]
        rate = curvature.rate(tau, lam_g, below_edge(h_probe, h_batch, curvature.margin))
        h_run = float(np.nanmean(h_probe[-int(smooth):]))  # over the probes of lam_fed's trailing mean
        at_edge = held_by_lr(curvature.level, h_batch=h_batch[-int(smooth):], lam_first=lam_g[0], lam_now=lam_fed,
                             lr=lr_before[-1], momentum=momentum, window=windows[0][1] - windows[0][0],
                             margin=curvature.margin)
        for c, p in enumerate(plans):
            factor = curvature.factor(lam_fed, rate, at, {k: v[:horizon] for k, v in p.items()}, h_run, at_edge)
            if factor is None:  # the forecast moves nothing: the fixed curvature, h/edge included
                continue
            lam_f = lam_fed * factor
            kappa[c, at:], kappa_h[c, at:] = lam_f[at:] / lam_fed, lam_f[at:] / lam_g[-1]
    step = np.arange(horizon)
    which = np.clip(np.searchsorted(keep, step, side="right") - 1, 0, None)
    which[windows[0][0]:] = keep.size - 1  # from window 0 on: the last probe's curvature and noise
    layers = list(built)
    shape = (len(plans), len(windows), len(layers))
    out = {k: np.full(shape, np.nan) for k in ("grad_corr", "grad_sq", "update_sq", "full_sq")}
    for j, layer in enumerate(layers):
        rows = built[layer]
        valid = [i for i, (sp, _) in enumerate(rows) if sp is not None]
        if not valid:
            continue
        fill = [max([v for v in valid if v <= i], default=valid[0]) for i in range(len(rows))]
        lam = np.stack([rows[k][0].eigenvalues for k in fill])[which]
        s2 = np.stack([rows[k][0].weights * rows[k][0].noise_per_mode(rows[k][1], "curvature") for k in fill])[which]
        for c, p in enumerate(plans):
            edge = np.array([float(stability_edge(m, b)) for m, b in zip(p["method"], p["momentum"])])
            cap = edge * (1 - EDGE_MARGIN) / p["lr"][:horizon]
            k_lam = kappa[c][:, None]
            k_s2 = k_lam if curvature is not None and curvature.noise else 1.0
            pred = schedule_prediction(list(p["method"][:horizon]), p["lr"][:horizon], p["momentum"][:horizon],
                                       np.minimum(lam * k_lam, cap[:, None]), s2 * k_s2)
            g2, lag, u2 = pred["grad_sq"], np.nan_to_num(pred["lag1"]), pred["update_sq"]
            prev = np.concatenate([[np.nan], g2[:-1]])
            for w, (a, b) in enumerate(windows):
                a = max(a, 1)
                out["grad_corr"][c, w, j] = lag[a:b].sum() / np.sqrt(g2[a:b].sum() * prev[a:b].sum())
                out["grad_sq"][c, w, j] = g2[a:b].mean()
                out["update_sq"][c, w, j] = u2[a:b].mean()
                out["full_sq"][c, w, j] = pred["full_grad_sq"][a:b].mean()
        if signal and "grad_signal" in fed:
            excess = float(fed["grad_signal"].sel(layer=layer).values[-1]) - out["full_sq"][0, 0, j]
            out["grad_sq"][:, :, j] += max(excess, 0.0) if np.isfinite(excess) else 0.0
    dims = ("change", "window", "layer")
    ds = xr.Dataset({k: (dims, v) for k, v in out.items()},
                    coords={"change": np.arange(len(plans)), "window": np.arange(len(windows)), "layer": layers})
    ds["curvature_factor"] = (("change", "window"), kappa_h[:, [a for a, _ in windows]])
    return ds


# --------------------------------------------------------------------------- measured windows
def measure_windows(trace, windows, method, momentum, after=None):
    """Measured per window and layer: ``grad_corr`` (the link's norm-weighted estimator),
    ``grad_norm`` (√ of the mean ‖g‖²), ``update_ratio`` (mean of the log10 ratio),
    ``h_edge`` (mean over the window's probes of lr·λ_max(H)/edge) and ``regime`` (of the
    network's top mode at the window's first probe; "" without a probe), and per layer
    ``h_edge_layer`` / ``regime_layer`` the same for the layer's block top mode. ``after``:
    use only probes after that step for these (the probe at the change's step is an input of
    the prediction, not a measurement of its outcome)."""
    ratio = trace["update_ratio"]
    L = trace.sizes["layer"]
    width = {b - a for a, b in windows}
    if len(width) != 1:
        raise ValueError(f"windows={windows!r} must all have one width")
    # the link's estimators over [a, a + W): the norm-weighted lag-1 correlation and E||g||^2
    link_meas = measured_window(trace, [a for a, _ in windows], width.pop(), align="after").transpose(
        "probe_step", "layer")
    corr = link_meas["meas_grad_corr"].values
    gnorm = np.sqrt(link_meas["meas_grad_sq_norm"].values)
    upd = np.full((len(windows), L), np.nan)
    h_edge, reg = np.full(len(windows), np.nan), np.array([""] * len(windows), dtype=object)
    h_layer, reg_layer = np.full((len(windows), L), np.nan), np.full((len(windows), L), "", dtype=object)
    edge = float(stability_edge(method, momentum))
    probes = trace["probe_step"].values if "probe_step" in trace.dims else np.array([], dtype=int)
    for w, (a, b) in enumerate(windows):
        s = slice(max(a, 0), min(b, trace.sizes["step"]))
        with np.errstate(invalid="ignore", divide="ignore"):
            r = ratio.values[s]
            upd[w] = np.nanmean(np.where(np.isfinite(r), r, np.nan), axis=0) if len(r) else np.nan
        inside = probes[(probes >= a) & (probes < b) & (probes > (-1 if after is None or w == 0 else after))]
        if inside.size:
            h = trace["lr"].values[inside] * trace["sharpness_global"].sel(probe_step=inside).values / edge
            h_edge[w] = float(np.mean(h))
            reg[w] = defined_regime(method, h[0] * edge, momentum)
            hl = trace["lr"].values[inside, None] * trace["sharpness"].sel(probe_step=inside).values
            h_layer[w] = hl.mean(0) / edge
            reg_layer[w] = [defined_regime(method, x, momentum) for x in hl[0]]
    dims = ("window", "layer")
    return xr.Dataset({"grad_corr": (dims, corr), "grad_norm": (dims, gnorm), "update_ratio": (dims, upd),
                       "h_edge": ("window", h_edge), "regime": ("window", reg),
                       "h_edge_layer": (dims, h_layer), "regime_layer": (dims, reg_layer.astype(str))},
                      coords={"window": np.arange(len(windows)), "layer": trace["layer"].values})


def anchor_on_window0(meas0, model):
    r"""The model's values anchored on window 0's measurement (``meas0``: :func:`measure_windows`
    of window 0; ``model``: a predictor's output over (change, window, layer)):
    ρ̂_j = ρ_meas,0 + (ρ_j − ρ_0), ‖g‖̂_j = ‖g‖_meas,0·√(E‖g‖²_j / E‖g‖²_0),
    r̂_j = r_meas,0 + ½log₁₀(E‖Δθ‖²_j / E‖Δθ‖²_0) (:mod:`experiments.whatif.predict`'s docstring).
    Returns (corr, norm, ratio)."""
    m0 = model.isel(window=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = meas0["grad_corr"] + (model["grad_corr"] - m0["grad_corr"])
        norm = meas0["grad_norm"] * np.sqrt(model["grad_sq"] / m0["grad_sq"])
        ratio = meas0["update_ratio"] + 0.5 * np.log10(model["update_sq"] / m0["update_sq"])
    return corr, norm, ratio
