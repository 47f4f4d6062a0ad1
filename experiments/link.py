r"""The link: per-layer predictions of the noisy quadratic model (NQM), fed with what the
tracer measured, set beside what the tracer measured, and scored (DESIGN.md, data flow 3;
THEORY.md §2, §4, §5).

For every probe step :math:`p` and layer :math:`l` of a run:

- :math:`h_l = \alpha_p \lambda_{\max,l}` (the layer's top curvature times the lr in force
  at :math:`p`) and its ratio to the method's stability edge (2 for GD, :math:`2(1+\beta)`
  for HB, :math:`2(1+\beta)/(1+2\beta)` for NAG): ``edge_ratio`` ≥ 1 means the layer's top
  mode is past the edge of stability (Cohen et al. 2021, THEORY.md §5);
- the regime (monotone / ripple / flip / divergent) of the top mode (THEORY.md §2);
- the predicted successive-gradient correlation
  :math:`\rho = \sum_i E[g_{t,i} g_{t+1,i}] / \sum_i E[g_{t,i}^2]` and squared gradient
  norm :math:`\sum_i E[g_{t,i}^2]` of the NQM layer model
  (:func:`dynamics.stochastic.layer_prediction`), whose spectrum is summarised from the
  measured ``sharpness``, ``hessian_trace`` and ``n_params`` and whose noise is the
  measured ``grad_noise`` (trace of the mini-batch gradient covariance);
- the measured counterparts, smoothed over a window of W steps centred on the probe
  (:func:`measured_window`): the mean of ``grad_cos`` (cosine of successive gradients)
  and the mean of ``grad_norm**2``.

Agreement (:func:`agreement_scores`) pools layers × probe steps × runs.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from scipy import stats

from dynamics.nqm_layer import LayerSpectrum, layer_prediction
from dynamics.quadratic import regime, stability_edge
from experiments import store


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


# ---------------------------------------------------------------------------------------
# measured side


def measured_window(trace, probe_steps=None, window=None):
    r"""The measured successive-gradient correlation and squared gradient norm around each
    probe step, per layer.

    For probe step :math:`p` the window is the W optimizer steps
    :math:`p - \lfloor W/2 \rfloor \le t < p + \lceil W/2 \rceil` (clipped to the run);
    ``meas_grad_corr`` is the mean of ``grad_cos`` (cos of :math:`g_t` and
    :math:`g_{t-1}`) and ``meas_grad_sq_norm`` the mean of ``grad_norm**2`` over it,
    skipping non-finite entries (the first step's NaN cosine, steps after a divergence);
    ``meas_steps`` counts the steps used. Centring the window on the probe matches the
    measurement to the curvature the probe saw; W defaults to the spacing of the probe
    steps, so the windows tile the run.
    """
    probe_steps = np.asarray(trace["probe_step"].values if probe_steps is None else probe_steps)
    window = default_window(probe_steps) if window is None else int(window)
    if window < 1:
        raise ValueError(f"window={window} is outside the valid range [1, inf)")
    step = trace["step"]
    probe = xr.DataArray(probe_steps, dims="probe_step", coords={"probe_step": probe_steps})
    inside = (step >= probe - window // 2) & (step < probe + (window - window // 2))

    def window_mean(values):
        ok = inside & np.isfinite(values)
        return xr.where(ok, values, 0.0).sum("step") / ok.sum("step"), ok.sum("step")

    corr, count = window_mean(trace["grad_cos"])
    sq_norm, _ = window_mean(trace["grad_norm"] ** 2)
    return xr.Dataset({"meas_grad_corr": corr, "meas_grad_sq_norm": sq_norm, "meas_steps": count},
                      attrs={"window": window})


def default_window(probe_steps):
    """The smallest spacing of the probe steps (50 if there is only one probe)."""
    spacing = np.diff(np.unique(np.asarray(probe_steps)))
    return int(spacing.min()) if spacing.size else 50


# ---------------------------------------------------------------------------------------
# predicted side

LINK_FILE = "link.nc"
LINKED_METHODS = ("gd", "hb", "nag")


def predict_layers(method, lr, momentum, sharpness, hessian_trace, n_params, grad_noise, *,
                   noise_model="curvature", shape="power", on_unstable="exclude", spectra=None):
    r"""NQM predictions per (probe_step, layer) from the measured spectrum summary and noise.

    ``lr`` is a DataArray over ``probe_step``; ``sharpness``, ``hessian_trace`` and
    ``grad_noise`` over (probe_step, layer); ``n_params`` over ``layer``. Each layer's
    spectrum is :meth:`LayerSpectrum.from_summary` (``shape``, trace clipped into
    [λ_max, n·λ_max] since a one-sample Hutchinson estimate can leave it) unless
    ``spectra`` maps the layer name to a known :class:`LayerSpectrum` (e.g. the true
    Hessian of the quadratic network). A layer whose measured top eigenvalue is not
    positive (a saddle direction dominates the block) has no stationary NQM: NaN.
    ``on_unstable`` is passed to :func:`layer_prediction`: the default "exclude" sums over
    the modes below the stability edge and counts the others in ``pred_n_unstable``.
    """
    probe, layers = sharpness["probe_step"].values, sharpness["layer"].values
    shape2 = (probe.size, layers.size)
    names = ("grad_corr", "grad_sq_norm", "full_grad_sq_norm", "effective_dim", "n_unstable")
    out = {k: np.full(shape2, np.nan) for k in names}
    exponent = np.full(shape2, np.nan)
    lrs = np.asarray(lr.values, dtype=float)
    for j, layer in enumerate(layers):
        lam = sharpness.sel(layer=layer).values
        tr = hessian_trace.sel(layer=layer).values
        noise = grad_noise.sel(layer=layer).values
        n = int(n_params.sel(layer=layer))
        for i in range(probe.size):
            if spectra is not None and layer in spectra:
                spectrum = spectra[layer]
            elif np.isfinite(lam[i]) and lam[i] > 0 and np.isfinite(tr[i]):
                spectrum = LayerSpectrum.from_summary(lam[i], tr[i], n, shape=shape, clip_trace=True)
            else:
                continue
            if not (np.isfinite(noise[i]) and noise[i] >= 0 and np.isfinite(lrs[i]) and lrs[i] > 0):
                continue
            pred = layer_prediction(method, lrs[i], momentum, spectrum, noise[i],
                                    noise_model=noise_model, on_unstable=on_unstable)
            for k in names:
                out[k][i, j] = pred[k]
            exponent[i, j] = spectrum.exponent
    dims = ("probe_step", "layer")
    coords = {"probe_step": probe, "layer": layers}
    ds = xr.Dataset({f"pred_{k}": (dims, v) for k, v in out.items()}, coords=coords)
    ds["spectrum_exponent"] = (dims, exponent)
    return ds


def run_method(config):
    """(method, momentum) of a run config dict; the link covers SGD-type optimizers only."""
    method = config.get("opt")
    if method not in LINKED_METHODS:
        raise ValueError(f"opt={method!r} is not linked; valid: {', '.join(LINKED_METHODS)} "
                         f"(the NQM describes SGD with or without momentum)")
    return method, (0.0 if method == "gd" else float(config.get("momentum", 0.0)))


def link_trace(trace, config=None, *, window=None, noise_model="curvature", shape="power",
               on_unstable="exclude", spectra=None):
    """Predicted and measured per-layer oscillation and norm of one run, side by side.

    ``trace`` is a run's trace (``experiments.store.load_run`` puts the config in its
    attrs; or pass ``config``). Returns a Dataset over (probe_step, layer) with ``lr``,
    ``h`` = lr·sharpness, ``edge`` (the method's stability edge in h), ``edge_ratio`` = h/edge,
    ``regime`` of the top mode, the measured inputs (``sharpness``, ``hessian_trace``,
    ``grad_noise``, ``n_params``), ``pred_*`` (:func:`predict_layers`) and ``meas_*``
    (:func:`measured_window`); the options are in ``attrs``.
    """
    config = dict(trace.attrs.get("config", {}) if config is None else config)
    method, momentum = run_method(config)
    if "probe_step" not in trace.dims or trace.sizes["probe_step"] == 0:
        raise ValueError("the trace has no probe steps (run with probe_every > 0): the link needs "
                         "the measured sharpness, hessian_trace and grad_noise")
    probe = trace["probe_step"].values
    lr = trace["lr"].reindex(step=probe).rename(step="probe_step")
    h = lr * trace["sharpness"]
    edge = float(stability_edge(method, momentum))
    regime_top = xr.DataArray(np.where(np.isfinite(h) & (h > 0), regime(method, np.nan_to_num(h.values), momentum),
                                       "undefined"), dims=h.dims, coords=h.coords)
    pred = predict_layers(method, lr, momentum, trace["sharpness"], trace["hessian_trace"], trace["n_params"],
                          trace["grad_noise"], noise_model=noise_model, shape=shape,
                          on_unstable=on_unstable, spectra=spectra)
    meas = measured_window(trace, probe, window)
    ds = xr.merge([pred, meas.drop_attrs()])
    ds = ds.assign(lr=lr, h=h, edge=edge, edge_ratio=h / edge, regime=regime_top,
                   sharpness=trace["sharpness"], hessian_trace=trace["hessian_trace"],
                   grad_noise=trace["grad_noise"], n_params=trace["n_params"])
    ds.attrs = {"method": method, "momentum": momentum, "lr0": float(config.get("lr", np.nan)),
                "window": meas.attrs["window"], "noise_model": noise_model, "shape": shape,
                "on_unstable": on_unstable, "spectra": "given" if spectra else "summary"}
    return ds


def link_scores(ds, bins=10):
    """Agreement over every (run, probe_step, layer) of a link Dataset: for ``grad_corr``
    the scores of :func:`agreement_scores`; for ``grad_sq_norm`` the same on log10 (norms
    span decades across layers and runs; a ratio error is what matters)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"grad_corr": agreement_scores(ds["pred_grad_corr"], ds["meas_grad_corr"], bins=bins),
                "log10_grad_sq_norm": agreement_scores(np.log10(ds["pred_grad_sq_norm"]),
                                                       np.log10(ds["meas_grad_sq_norm"]), bins=bins)}
