r"""The predicted side of the link (:mod:`experiments.linking.core`): per (probe step, layer) the NQM
layer model fed with the measured spectrum summary and gradient noise, with the network's top
mode put in each layer (:func:`with_global_mode`), stationary (:func:`predict_layers`) or run
through the run's lr sequence (:func:`schedule_predict_layers`)."""

import numpy as np
import xarray as xr

from dynamics.nqm.layer import LayerSpectrum, layer_prediction
from dynamics.nqm.schedule import schedule_prediction
from dynamics.quadratic import stability_edge


EDGE_MARGIN = 0.05  # the network's top mode is capped at (1 - EDGE_MARGIN) x the stability edge


def predict_layers(method, lr, momentum, sharpness, hessian_trace, n_params, grad_noise, *,
                   noise_model="curvature", shape="power", on_unstable="exclude", spectra=None,
                   sharpness_global=None, edge_margin=EDGE_MARGIN, built=None):
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

    With ``sharpness_global`` (over probe_step) each layer also carries the network's top
    mode, see :func:`with_global_mode`. ``built``: :func:`layer_spectra` of these arguments,
    if the caller has it already.
    """
    probe, layers = sharpness["probe_step"].values, sharpness["layer"].values
    shape2 = (probe.size, layers.size)
    names = ("grad_corr", "grad_sq_norm", "full_grad_sq_norm", "effective_dim", "n_unstable")
    out = {k: np.full(shape2, np.nan) for k in names}
    exponent = np.full(shape2, np.nan)
    lrs = np.asarray(lr.values, dtype=float)
    if built is None:
        built = layer_spectra(method, lr, momentum, sharpness, hessian_trace, n_params, grad_noise, shape=shape,
                              spectra=spectra, sharpness_global=sharpness_global, edge_margin=edge_margin)
    for j, layer in enumerate(layers):
        for i, (spectrum, noise) in enumerate(built[layer]):
            if spectrum is None:
                continue
            pred = layer_prediction(method, lrs[i], momentum, spectrum, noise,
                                    noise_model=noise_model, on_unstable=on_unstable)
            for k in names:
                out[k][i, j] = getattr(pred, k)
            exponent[i, j] = spectrum.exponent
    dims = ("probe_step", "layer")
    coords = {"probe_step": probe, "layer": layers}
    ds = xr.Dataset({f"pred_{k}": (dims, v) for k, v in out.items()}, coords=coords)
    ds["spectrum_exponent"] = (dims, exponent)
    return ds


def layer_spectra(method, lr, momentum, sharpness, hessian_trace, n_params, grad_noise, *, shape="power",
                  spectra=None, sharpness_global=None, edge_margin=EDGE_MARGIN, top_mode_shares=None):
    """{layer: [(LayerSpectrum or None, noise_total) per probe step]}: the spectra the
    predictions use (see :func:`predict_layers`); None where the measured summary, noise
    or lr admit no stationary NQM. ``top_mode_shares`` (probe_step, layer): each layer's
    measured share of the network's top eigenvector, used by :func:`with_global_mode`
    instead of its estimate."""
    probe, layers = sharpness["probe_step"].values, sharpness["layer"].values
    for name, values, option in (("grad_noise", grad_noise, "noise_microbatches >= 2"),
                                 ("hessian_trace", None if spectra else hessian_trace, "hutchinson_samples >= 1")):
        if values is not None and values.size and not np.isfinite(np.asarray(values, dtype=float)).any():
            raise ValueError(f"{name} is not finite at any probe (run with {option}): the NQM's layer spectra "
                             f"and noise are built from it")
    lrs = np.asarray(lr.values, dtype=float)
    edge = float(stability_edge(method, momentum))
    out = {}
    for layer in layers:
        lam = sharpness.sel(layer=layer).values
        tr = hessian_trace.sel(layer=layer).values
        noise = grad_noise.sel(layer=layer).values
        n = int(n_params.sel(layer=layer))
        out[layer] = []
        for i in range(probe.size):
            spectrum = None
            usable = np.isfinite(noise[i]) and noise[i] >= 0 and np.isfinite(lrs[i]) and lrs[i] > 0
            if usable and spectra is not None and layer in spectra:
                spectrum = spectra[layer]
            elif usable and np.isfinite(lam[i]) and lam[i] > 0 and np.isfinite(tr[i]):
                spectrum = LayerSpectrum.from_summary(lam[i], tr[i], n, shape=shape, clip_trace=True)
                if sharpness_global is not None:
                    share = None if top_mode_shares is None else float(top_mode_shares.sel(layer=layer).values[i])
                    spectrum = with_global_mode(spectrum, float(sharpness_global.values[i]),
                                                edge * (1 - edge_margin) / lrs[i], share=share)
            out[layer].append((spectrum, float(noise[i])))
    return out


def schedule_predict_layers(method, lrs, momentum, probe_steps, built, window, align="center",
                            noise_model="curvature", edge_margin=EDGE_MARGIN, return_full=False):
    r"""Non-stationary predictions: the NQM second-moment recursion
    (:func:`dynamics.nqm.schedule.schedule_prediction`) run through the whole run, step by
    step with the lr actually used (``lrs``, the trace's ``lr``), each step taking the
    spectrum and noise of the nearest probe (of the latest probe for ``align="after"``),
    from the minimum (x₀ = 0). The window of each probe then gets
    :math:`\sum_t E[g_t\cdot g_{t-1}] / \sqrt{\sum_t E\|g_t\|^2 \sum_t E\|g_{t-1}\|^2}` and the
    mean of :math:`E\|g_t\|^2` over the same steps as :func:`experiments.linking.measure.measured_window`, so an lr
    decay inside a window, and the slow relaxation after it (the excess variance of the
    old lr decays over ~1/h' steps, the gradient meanwhile keeping its direction), are in
    the prediction. A mode of multiplicity w and noise σ² has the moments of w modes when
    the recursion starts from zero (they are linear in σ²), so a weight that changes
    between probes enters as w·σ². As in the stationary model, a mode is held below the edge
    of stability (at (1 − ``edge_margin``)·edge/α_t, now with the lr of each step: a probe's
    spectrum measured just before an lr decay would otherwise be unstable under the old lr).
    Returns (grad_corr, grad_sq_norm), arrays (probe, layer), and with ``return_full`` the
    window mean of E‖Hx_t‖² (``full_grad_sq``) third.
    """
    probe_steps = np.asarray(probe_steps)
    T = lrs.size
    step = np.arange(T)
    if align == "center":
        mid = (probe_steps[1:] + probe_steps[:-1]) / 2
        which = np.searchsorted(mid, step, side="right")
    else:
        which = np.clip(np.searchsorted(probe_steps, step, side="right") - 1, 0, None)
    start = probe_steps - window // 2 if align == "center" else probe_steps
    inside = (step[None, :] >= start[:, None]) & (step[None, :] < start[:, None] + window) & (step[None, :] >= 1)
    layers = list(built)
    corr = np.full((probe_steps.size, len(layers)), np.nan)
    sq = np.full_like(corr, np.nan)
    full = np.full_like(corr, np.nan)
    for j, layer in enumerate(layers):
        rows = built[layer]
        valid = [i for i, (sp, _) in enumerate(rows) if sp is not None]
        if not valid:
            continue
        fill = [min(valid, key=lambda v: abs(v - i)) for i in range(len(rows))]  # nearest usable probe
        lam = np.stack([rows[k][0].eigenvalues for k in fill])
        s2 = np.stack([rows[k][0].weights * rows[k][0].noise_per_mode(rows[k][1], noise_model) for k in fill])
        lr_steps = np.nan_to_num(lrs)
        with np.errstate(divide="ignore"):
            cap = float(stability_edge(method, momentum)) * (1 - edge_margin) / lr_steps
        pred = schedule_prediction(method, lr_steps, momentum, np.minimum(lam[which], cap[:, None]), s2[which])
        g2, lag = pred["grad_sq"], np.nan_to_num(pred["lag1"])
        prev = np.concatenate([[np.nan], g2[:-1]])
        with np.errstate(invalid="ignore", over="ignore"):
            corr[:, j] = (inside * lag).sum(1) / np.sqrt((inside * g2).sum(1) * (inside * np.nan_to_num(prev)).sum(1))
            sq[:, j] = (inside * g2).sum(1) / inside.sum(1)
            full[:, j] = (inside * pred["full_grad_sq"]).sum(1) / inside.sum(1)
    return (corr, sq, full) if return_full else (corr, sq)


def with_global_mode(spectrum, lam_global, lam_cap=np.inf, share=None):
    r"""The layer's spectrum with its top mode replaced by the network's top mode.

    The tracer's ``sharpness`` is the top eigenvalue of the layer's *diagonal block*
    :math:`H_{ll}`; the optimizer, though, moves along eigenvectors of the full Hessian,
    and the top one, :math:`v` with eigenvalue :math:`\lambda_G` (``sharpness_global``),
    spans several layers. If it dominates every block's top eigenvalue,
    :math:`H_{ll} \approx \lambda_G v_l v_l^\top + \dots` and :math:`\lambda_{\max,l}
    \approx \lambda_G \|v_l\|^2`: the layer holds the fraction
    :math:`s_l = \lambda_{\max,l}/\lambda_G` of a mode whose curvature, as the optimizer
    sees it, is :math:`\lambda_G`. So the top mode (λ_max,l, weight 1) becomes
    (λ_G, weight s_l); the trace is unchanged (λ_G s_l = λ_max,l), and so is the noise
    the curvature model puts on it. Where λ_G ≤ λ_max,l (estimation noise) the spectrum is
    returned as it is.

    At the edge of stability the network's top mode sits at (or, between probes, beyond)
    the edge, where the stationary NQM has no solution; Cohen et al. (2021) observe that
    it is held there by non-quadratic effects. λ_G is therefore capped at ``lam_cap``
    (a fixed margin below the edge, :data:`EDGE_MARGIN`), which keeps the mode's
    amplification finite and its lag-1 correlation that of a mode at the edge.

    ``share``: the layer's measured ‖v_l‖² instead of the estimate s_l.
    """
    lam_top = spectrum.eigenvalues[0]
    lam_g = min(lam_global, lam_cap) if np.isfinite(lam_global) else np.nan
    if not (np.isfinite(lam_g) and lam_g > lam_top and spectrum.weights[0] == 1):
        return spectrum
    eig, w = spectrum.eigenvalues.copy(), spectrum.weights.copy()
    eig[0], w[0] = lam_g, lam_top / lam_g if share is None else share
    return LayerSpectrum(eig, w, shape=f"{spectrum.shape}+global", exponent=spectrum.exponent)
