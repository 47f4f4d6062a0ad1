r"""The link: per-layer predictions of the noisy quadratic model (NQM), fed with what the
tracer measured, set beside what the tracer measured, and scored (DESIGN.md, data flow 3;
THEORY.md §2, §4, §5).

For every probe step :math:`p` and layer :math:`l` of a run:

- :math:`h_l = \alpha_p \lambda_{\max,l}` (the layer's top block curvature times the lr in
  force at :math:`p`) and its ratio to the method's stability edge (2 for GD,
  :math:`2(1+\beta)` for HB, :math:`2(1+\beta)/(1+2\beta)` for NAG): ``edge_ratio`` ≥ 1
  means the layer's top mode is past the edge of stability (Cohen et al. 2021, THEORY.md
  §5); ``edge_ratio_global`` is the same for the network's top eigenvalue;
- the regime (monotone / ripple / flip / divergent) of the layer's top mode (THEORY.md §2);
- the predicted successive-gradient correlation
  :math:`\rho = \sum_i E[g_{t,i} g_{t-1,i}] / \sum_i E[g_{t,i}^2]` and squared gradient
  norm :math:`\sum_i E[g_{t,i}^2]` of the NQM layer model (:mod:`dynamics.nqm_layer`),
  whose spectrum is rebuilt from the measured ``sharpness``, ``hessian_trace`` and
  ``n_params`` (power-law shape) with the network's top mode put in
  (:func:`with_global_mode`), whose noise is the measured ``grad_noise`` spread over the
  modes in proportion to curvature, and which is run through the run's lr sequence
  (:func:`schedule_predict_layers`; ``prediction="stationary"`` takes each probe's
  stationary state instead);
- the measured counterparts over a window of W steps centred on the probe
  (:func:`measured_window`).

Agreement (:func:`agreement_scores`, :func:`link_scores`) pools layers × probe steps × runs.

Optionally (``signal``, :func:`with_signal`) a mean-gradient part measured by the probe
(``grad_signal`` = ‖E g‖², less the NQM's own E‖Hx‖²) is mixed in, with the lag-1
correlation of the network top mode's stationary fluctuation ("fluct",
:func:`fluctuation_correlation`), of its dominant root ("root", :func:`mean_part_correlation`)
or +1 ("drift").

What the seed-CNN sweep says (12 runs, 672 layer-probe points;
``python -m paper_figures.link_scores`` → ``results/link_seed_cnn.json``). Spearman / sign
agreement of the correlation, probe on the step's 32 examples (``link_seed_cnn.toml``): the
plain per-layer model (diagonal block, stationary) 0.34 / 63 %; with the network's top mode
0.70 / 77 %; run through the lr schedule 0.74 / 78 %. Probed on 512 drawn examples with 8
Hutchinson vectors and 16 micro-batches (``link_seed_cnn_probe.toml``; default) 0.76 / 76 %
(Pearson 0.74 → 0.82, calibration error 0.086 → 0.059, log-norm error 0.42 → 0.32 decades).
Target (issue 7): 0.8 / 90 % — not reached. Which assumptions fail, in order of effect:

1. *Block-diagonal curvature.* The strongly negative correlations (down to −0.8) appear in
   every layer when the network's h = α λ_max(H) nears the edge, while every block's
   h_l stays below 0.34 of it: the oscillating direction spans layers. Putting that mode
   in each layer (its share estimated as λ_max,l / λ_max(H)) doubles the Spearman score.
2. *Stationarity.* Windows that straddle an lr decay, and the relaxation after it, need the
   NQM recursion through the schedule (probe 600: Spearman 0.52 → 0.81).
3. *Noise-driven fluctuations only.* Where every mode has small h (plateau at the start,
   after the decay) the NQM predicts |ρ| ≲ 0.05, but the measured ρ is +0.1 … +0.45. This
   is where the remaining misses are (h/edge < 0.05: Spearman 0.24, sign 65 %; where the
   model predicts |ρ| > 0.1: Spearman 0.82, sign 97 %). The suspect is the gradient's
   mean (signal) part, which the noise-driven model leaves out, but it cannot simply be
   added (``results/link_assumption_checks.py`` → ``.json``, a rerun of the 12 runs with extra
   probe measurements): the *exact* full-batch gradient at each probe (eval mode) carries
   a median of only 2–34 % of ‖g‖², and a drift term built from it,
   ρ' = (Σ lag1 + c·D)/(Σ E g² + D) with D = max(‖∇f_l‖² − E‖Hx‖²_NQM, 0), lowers the
   Spearman score to 0.50–0.57 (c = 1 … 0.5): near the edge the excess is oscillation,
   not drift. At fixed parameters (``--fixed-theta``) the two regimes separate: on the
   plateau and after the decay (HB, α = 0.02, β = 0.6; probes 100, 700) independent
   mini-batch gradients share a part (mean pairwise cosine −0.08 … +0.40, close to the
   measured ρ = 0.0 … +0.25), a mean gradient that persists because the parameters barely
   move; at the edge (NAG, α = 0.05, β = 0.9, probe 300) the shared part is larger still
   (signal fraction 0.8, pairwise cosine 0.85 in the conv layers) yet ρ = −0.48: the mean
   gradient itself flips sign from step to step. A signal term therefore needs the signal
   energy (not recorded by the tracer) *and* its lag-1 correlation per regime.
   Measuring each layer's share ‖v_l‖² of the network's top Ritz vector instead
   of estimating it by λ_max,l/λ_max(H) changes nothing (Spearman 0.738 vs 0.741): where
   the top mode matters the estimate is close to the measured share (same script).
4. *Noise model.* Curvature-proportional noise beats isotropic noise (Spearman 0.54).
5. *The signal term* (measured ‖E g‖² from the 512-example probe) fixes the small-h regime
   (h/edge < 0.05: Spearman 0.31 → 0.58, sign 60 → 78 % with "fluct") and raises the sign
   agreement overall (76 → 82 %), but lowers the Spearman score (0.76 → 0.72; "root" 0.65,
   "drift" 0.54), so it is not the default. Where 0.05 < h/edge the measured excess
   ‖E g‖² − E‖Hx‖² has a lag-1 correlation ≈ 0 (0.05–0.5) to −0.6 (> 0.5) (solved from the
   measurements), below what the top mode's dynamics give (fluct 1 − 2·h/edge for HB): the
   excess is not a persistent drift there. The mean gradient lies mostly along the layer's
   piece of the network's top Ritz vector (``grad_signal_top`` / ``grad_signal``: median 0.77
   where the signal is ≥ 20 % of the batch gradient's energy); giving that part the top
   mode's correlation and the rest +1 scored lower still (Spearman 0.63, "root"). A single
   probe's ‖Hx_p‖² is one draw, so max(excess, 0) is biased up even without any drift (on
   the quadratic network at 1 of 8 probes).

On the quadratic network (tests) the prediction matches the tracer within the Monte-Carlo
tolerance, for HB and NAG.
"""

import inspect
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from dynamics.nqm_layer import LayerSpectrum, layer_prediction
from dynamics.nqm_schedule import schedule_prediction
from dynamics.quadratic import char_roots, regime, stability_edge
from dynamics.stochastic import stationary_state_covariance, state_space
from experiments import store
from experiments.scores import SCORES, agreement_scores, calibration_error  # noqa: F401 (re-exported)


ALIGNS = ("center", "after")  # where the measurement window sits relative to the probe


# ---------------------------------------------------------------------------------------
# measured side


def measured_window(trace, probe_steps=None, window=None, align="center"):
    r"""The measured successive-gradient correlation and squared gradient norm around each
    probe step, per layer.

    For probe step :math:`p` the window is the W optimizer steps
    :math:`p - \lfloor W/2 \rfloor \le t < p + \lceil W/2 \rceil` (``align="center"``) or
    :math:`p \le t < p + W` (``align="after"``), clipped to the run.
    Over it

    - ``meas_grad_corr`` :math:`= \sum_t g_t\cdot g_{t-1} \big/
      \sqrt{\sum_t \|g_t\|^2 \sum_t \|g_{t-1}\|^2}`, with :math:`g_t\cdot g_{t-1}` =
      ``grad_cos``·``grad_norm``(t)·``grad_norm``(t−1): the consistent estimator of the
      NQM's :math:`E[g_t\cdot g_{t+1}]/E\|g\|^2` in a stationary state;
    - ``meas_mean_cos``, the plain mean of ``grad_cos``. It estimates a different quantity,
      :math:`E[\cos]`: in a layer with few effective modes the norm fluctuates and large,
      differently aligned gradients weigh as much as small ones. On the quadratic network
      (spectrum 1/i, d = 20; HB, lr·λ_max = 1.2, β = 0.5, batch 32) the mean cosine is −0.083,
      the norm-weighted mean :math:`\sum g_t\cdot g_{t-1}/\sum\|g_t\|\|g_{t-1}\|` −0.16,
      and the estimator above −0.144, which the NQM predicts (−0.142);
    - ``meas_grad_sq_norm``, the mean of ``grad_norm**2``;
    - ``meas_steps``, the number of steps used.

    Non-finite entries (the first step's NaN cosine, steps after a divergence) are skipped.
    Centring the window on the probe matches the measurement to the curvature the probe saw;
    "after" keeps it inside one lr when the schedule changes lr at probe steps (the lr in
    force at the probe is the one the model is fed). W defaults to the spacing of the probe
    steps, so the windows tile the run.
    """
    probe_steps = np.asarray(trace["probe_step"].values if probe_steps is None else probe_steps)
    window = default_window(probe_steps) if window is None else int(window)
    if window < 1:
        raise ValueError(f"window={window} is outside the valid range [1, inf)")
    step = trace["step"]
    probe = xr.DataArray(probe_steps, dims="probe_step", coords={"probe_step": probe_steps})
    if align not in ALIGNS:
        raise ValueError(f"align={align!r} is unknown; valid: {', '.join(ALIGNS)}")
    start = probe - window // 2 if align == "center" else probe
    inside = (step >= start) & (step < start + window)
    norm = trace["grad_norm"]
    prev = norm.shift(step=1)
    dot = trace["grad_cos"] * norm * prev

    def window_sum(values, mask):
        return xr.where(mask, values, 0.0).sum("step")

    pair_ok = inside & np.isfinite(dot)
    cos_ok = inside & np.isfinite(trace["grad_cos"])
    sq_ok = inside & np.isfinite(norm)
    return xr.Dataset({
        "meas_grad_corr": window_sum(dot, pair_ok) / np.sqrt(window_sum(norm**2, pair_ok)
                                                             * window_sum(prev**2, pair_ok)),
        "meas_mean_cos": window_sum(trace["grad_cos"], cos_ok) / cos_ok.sum("step"),
        "meas_grad_sq_norm": window_sum(norm**2, sq_ok) / sq_ok.sum("step"),
        "meas_steps": pair_ok.sum("step"),
    }, attrs={"window": window})


def default_window(probe_steps):
    """The smallest spacing of the probe steps (50 if there is only one probe)."""
    spacing = np.diff(np.unique(np.asarray(probe_steps)))
    return int(spacing.min()) if spacing.size else 50


# ---------------------------------------------------------------------------------------
# predicted side

LINK_FILE = "link.nc"
EDGE_MARGIN = 0.05  # the network's top mode is capped at (1 - EDGE_MARGIN) x the stability edge
LINKED_METHODS = ("gd", "hb", "nag")
# the mean-gradient (signal) term (with_signal): none (plain NQM, default), its lag-1 correlation
# that of the network top mode's stationary fluctuation (fluct), of its dominant root (root), +1 (drift)
SIGNALS = ("none", "fluct", "root", "drift")


def predict_layers(method, lr, momentum, sharpness, hessian_trace, n_params, grad_noise, *,
                   noise_model="curvature", shape="power", on_unstable="exclude", spectra=None,
                   sharpness_global=None, edge_margin=EDGE_MARGIN):
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
    mode, see :func:`with_global_mode`.
    """
    probe, layers = sharpness["probe_step"].values, sharpness["layer"].values
    shape2 = (probe.size, layers.size)
    names = ("grad_corr", "grad_sq_norm", "full_grad_sq_norm", "effective_dim", "n_unstable")
    out = {k: np.full(shape2, np.nan) for k in names}
    exponent = np.full(shape2, np.nan)
    lrs = np.asarray(lr.values, dtype=float)
    built = layer_spectra(method, lr, momentum, sharpness, hessian_trace, n_params, grad_noise, shape=shape,
                          spectra=spectra, sharpness_global=sharpness_global, edge_margin=edge_margin)
    for j, layer in enumerate(layers):
        for i, (spectrum, noise) in enumerate(built[layer]):
            if spectrum is None:
                continue
            pred = layer_prediction(method, lrs[i], momentum, spectrum, noise,
                                    noise_model=noise_model, on_unstable=on_unstable)
            for k in names:
                out[k][i, j] = pred[k]
            exponent[i, j] = spectrum.exponent
    dims = ("probe_step", "layer")
    coords = {"probe_step": probe, "layer": layers}
    ds = xr.Dataset({f"pred_{k}": (dims, v) for k, v in out.items()}, coords=coords)
    ds["spectrum_exponent"] = (dims, exponent)
    return ds


def layer_spectra(method, lr, momentum, sharpness, hessian_trace, n_params, grad_noise, *, shape="power",
                  spectra=None, sharpness_global=None, edge_margin=EDGE_MARGIN):
    """{layer: [(LayerSpectrum or None, noise_total) per probe step]}: the spectra the
    predictions use (see :func:`predict_layers`); None where the measured summary, noise
    or lr admit no stationary NQM."""
    probe, layers = sharpness["probe_step"].values, sharpness["layer"].values
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
                    spectrum = with_global_mode(spectrum, float(sharpness_global.values[i]),
                                                edge * (1 - edge_margin) / lrs[i])
            out[layer].append((spectrum, float(noise[i])))
    return out


def schedule_predict_layers(method, lrs, momentum, probe_steps, built, window, align="center",
                            noise_model="curvature", edge_margin=EDGE_MARGIN, return_full=False):
    r"""Non-stationary predictions: the NQM second-moment recursion
    (:func:`dynamics.nqm_schedule.schedule_prediction`) run through the whole run, step by
    step with the lr actually used (``lrs``, the trace's ``lr``), each step taking the
    spectrum and noise of the nearest probe (of the latest probe for ``align="after"``),
    from the minimum (x₀ = 0). The window of each probe then gets
    :math:`\sum_t E[g_t\cdot g_{t-1}] / \sqrt{\sum_t E\|g_t\|^2 \sum_t E\|g_{t-1}\|^2}` and the
    mean of :math:`E\|g_t\|^2` over the same steps as :func:`measured_window`, so an lr
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


def mean_part_correlation(method, h, momentum):
    r"""Successive correlation of the deterministic part of a mode's gradient,
    :math:`\cos\arg z_1 = \mathrm{Re}\,z_1/|z_1|` with :math:`z_1` the dominant root of the
    method's characteristic polynomial at ``h`` (THEORY.md §2). Without noise a mode's gradient
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
    covariance (:func:`dynamics.stochastic.stationary_state_covariance`) and A the mode's
    state matrix; it depends on h only (HB: :math:`1 - h/(1+\beta)`, THEORY.md §4). ≈ 1 at
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

    The probe measures ``signal`` = ‖E g‖² at θ (:func:`experiments.sharpness.microbatch_moments`),
    which is :math:`\|m + Hx\|^2`; the NQM's own full-batch part :math:`F = E\|Hx\|^2`
    (``pred_full_sq``) is taken out so nothing is counted twice:
    :math:`\|m\|^2 = \max(\text{signal} - F, 0)`. Missing signal: no term.
    Returns (corr, grad_sq_norm, ‖m‖²)."""
    mean_sq = (signal.clip(min=0) - pred_full_sq.fillna(0.0)).clip(min=0).fillna(0.0)
    corr = (pred_corr * pred_sq + rho_mean * mean_sq) / (pred_sq + mean_sq)
    return corr, pred_sq + mean_sq, mean_sq


def with_global_mode(spectrum, lam_global, lam_cap=np.inf):
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
    """
    lam_top = spectrum.eigenvalues[0]
    lam_g = min(lam_global, lam_cap) if np.isfinite(lam_global) else np.nan
    if not (np.isfinite(lam_g) and lam_g > lam_top and spectrum.weights[0] == 1):
        return spectrum
    eig, w = spectrum.eigenvalues.copy(), spectrum.weights.copy()
    eig[0], w[0] = lam_g, lam_top / lam_g
    return LayerSpectrum(eig, w, shape=f"{spectrum.shape}+global", exponent=spectrum.exponent)


def run_method(config):
    """(method, momentum) of a run config dict; the link covers SGD-type optimizers only."""
    method = config.get("opt")
    if method not in LINKED_METHODS:
        raise ValueError(f"opt={method!r} is not linked; valid: {', '.join(LINKED_METHODS)} "
                         f"(the NQM describes SGD with or without momentum)")
    return method, (0.0 if method == "gd" else float(config.get("momentum", 0.0)))


def link_trace(trace, config=None, *, window=None, align="center", noise_model="curvature", shape="power",
               on_unstable="exclude", smooth=3, global_mode=True, prediction="schedule", signal="none",
               spectra=None):
    """Predicted and measured per-layer oscillation and norm of one run, side by side.

    ``trace`` is a run's trace (``experiments.store.load_run`` puts the config in its
    attrs; or pass ``config``). The probe's estimates are noisy (one Hutchinson vector, four
    micro-batches: a single probe's trace can even be negative), so the model is fed their
    centred rolling mean over ``smooth`` probes (1: raw); ``sharpness`` etc. in the output
    stay raw, and ``h``, ``edge_ratio`` and ``regime`` use the raw sharpness.
    ``prediction``: "schedule" (default) runs the NQM through the run's actual lr sequence
    (:func:`schedule_predict_layers`), "stationary" takes each probe's stationary state
    (:func:`predict_layers`; its ``pred_effective_dim`` and ``pred_n_unstable`` are kept in
    both cases). ``global_mode`` puts the network's top mode in every layer
    (:func:`with_global_mode`).
    Returns a Dataset over (probe_step, layer) with ``lr``,
    ``h`` = lr·sharpness, ``edge`` (the method's stability edge in h), ``edge_ratio`` = h/edge,
    ``edge_ratio_global`` (the same for the network's sharpness),
    ``regime`` of the top mode, the measured inputs (``sharpness``, ``hessian_trace``,
    ``grad_noise``, ``n_params``, ``sharpness_global``), ``pred_*`` and ``meas_*``
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
    if int(smooth) < 1:
        raise ValueError(f"smooth={smooth} is outside the valid range [1, inf)")
    fed = {k: trace[k].rolling(probe_step=int(smooth), center=True, min_periods=1).mean()
           for k in ("sharpness", "hessian_trace", "grad_noise", "sharpness_global")}
    pred = predict_layers(method, lr, momentum, fed["sharpness"], fed["hessian_trace"], trace["n_params"],
                          fed["grad_noise"], noise_model=noise_model, shape=shape,
                          on_unstable=on_unstable, spectra=spectra,
                          sharpness_global=fed["sharpness_global"] if global_mode else None)
    meas = measured_window(trace, probe, window, align)
    if prediction == "schedule":
        built = layer_spectra(method, lr, momentum, fed["sharpness"], fed["hessian_trace"], trace["n_params"],
                              fed["grad_noise"], shape=shape, spectra=spectra,
                              sharpness_global=fed["sharpness_global"] if global_mode else None)
        corr, sq, full = schedule_predict_layers(method, trace["lr"].values, momentum, probe, built,
                                                 meas.attrs["window"], align, noise_model, return_full=True)
        pred["pred_grad_corr"] = (("probe_step", "layer"), corr)
        pred["pred_grad_sq_norm"] = (("probe_step", "layer"), sq)
        pred["pred_full_grad_sq_norm"] = (("probe_step", "layer"), full)
    elif prediction != "stationary":
        raise ValueError(f"prediction={prediction!r} is unknown; valid: stationary, schedule")
    if signal not in SIGNALS:
        raise ValueError(f"signal={signal!r} is unknown; valid: {', '.join(SIGNALS)}")
    recorded = "grad_signal" in trace and signal != "none"
    if recorded:  # the signal raw: it changes between probes (0.65 vs 0.63 Spearman smoothed, "root")
        h_top = np.minimum(lr * trace["sharpness_global"], edge * (1 - EDGE_MARGIN))
        rho_mean = {"fluct": fluctuation_correlation, "root": mean_part_correlation}.get(
            signal, lambda *_: xr.ones_like(h_top))(method, h_top, momentum)
        corr, sq, mean_sq = with_signal(pred["pred_grad_corr"], pred["pred_grad_sq_norm"],
                                        pred["pred_full_grad_sq_norm"], trace["grad_signal"], rho_mean)
        pred = pred.assign(pred_grad_corr=corr, pred_grad_sq_norm=sq, pred_mean_sq_norm=mean_sq,
                           pred_mean_corr=rho_mean)
    ds = xr.merge([pred, meas.drop_attrs()])
    h_global = lr * trace["sharpness_global"]
    ds = ds.assign(lr=lr, h=h, edge=edge, edge_ratio=h / edge, regime=regime_top,
                   sharpness_global=trace["sharpness_global"], edge_ratio_global=h_global / edge,
                   sharpness=trace["sharpness"], hessian_trace=trace["hessian_trace"],
                   grad_noise=trace["grad_noise"], n_params=trace["n_params"])
    if "grad_signal" in trace:
        ds["grad_signal"] = trace["grad_signal"]
    ds.attrs = {"method": method, "momentum": momentum, "lr0": float(config.get("lr", np.nan)),
                "window": meas.attrs["window"], "align": align, "noise_model": noise_model, "shape": shape,
                "on_unstable": on_unstable, "smooth": int(smooth), "global_mode": int(bool(global_mode)),
                "prediction": prediction, "signal": signal, "signal_recorded": int(recorded),
                "spectra": "given" if spectra else "summary"}
    return ds


def link_scores(ds, bins=10):
    """Agreement over every (run, probe_step, layer) of a link Dataset: for ``grad_corr``
    the scores of :func:`agreement_scores`; for ``grad_sq_norm`` the same on log10 (norms
    span decades across layers and runs; a ratio error is what matters)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"grad_corr": agreement_scores(ds["pred_grad_corr"], ds["meas_grad_corr"], bins=bins),
                "log10_grad_sq_norm": agreement_scores(np.log10(ds["pred_grad_sq_norm"]),
                                                       np.log10(ds["meas_grad_sq_norm"]), bins=bins)}


# ---------------------------------------------------------------------------------------
# runs, sweeps, files

OPTIONS = ("window", "align", "noise_model", "shape", "on_unstable", "smooth", "global_mode", "prediction",
           "signal")


def link_run(run_dir, *, recompute=False, write=True, **options):
    """:func:`link_trace` of a finished run directory, written beside it as ``link.nc``
    (atomically, :mod:`experiments.store`). An existing ``link.nc`` made with the same
    options from the same trace is read instead unless ``recompute``."""
    run_dir = Path(run_dir)
    target = run_dir / LINK_FILE
    defaults = inspect.signature(link_trace).parameters
    wanted = {k: options.get(k, defaults[k].default) for k in OPTIONS}
    if not recompute and target.exists() and target.stat().st_mtime >= (run_dir / store.TRACE).stat().st_mtime:
        with xr.open_dataset(target, engine="scipy") as cached:
            ds = cached.load()
        if all(_same_option(ds.attrs.get(k), int(v) if isinstance(v, bool) else v)
               for k, v in wanted.items() if v is not None):
            return ds
    ds = link_trace(store.load_run(run_dir), **options)
    ds.attrs["run_id"] = run_dir.name
    if write:
        store.atomic_write_dataset(target, ds)
    return ds


def _same_option(saved, wanted):
    return saved is not None and str(saved) == str(wanted)


def run_dirs(source, root=None):
    """The finished run directories of ``source``: a run directory itself, a store root
    (every finished run in it), or a sweep spec (``.toml``; its runs under ``root`` or the
    spec's root)."""
    source = Path(source)
    if source.suffix == ".toml":
        from experiments.sweep import expand, load_spec, resolve_root, run_id

        spec = load_spec(source)
        base = resolve_root(spec, root)
        dirs = [base / run_id(c) for c in expand(spec)]
    elif store.is_done(source):
        return [source]
    elif source.is_dir():
        dirs = sorted(p for p in source.iterdir() if p.is_dir())
    else:
        raise ValueError(f"source={str(source)!r} is not a run directory, a store root or a sweep spec (.toml)")
    return [d for d in dirs if store.is_done(d)]


def link(source, *, root=None, recompute=False, write=True, **options):
    """The link of a run, or of every linkable finished run of a store root or sweep spec.

    One run: the Dataset of :func:`link_run` (dims probe_step, layer). Several: those
    stacked along a ``run`` dim (outer join: runs that diverged early have NaN after), with
    per-run coordinates ``opt``, ``lr0``, ``momentum``. Runs the NQM does not describe (Adam)
    or without probes are left out and named in ``attrs["skipped"]``.
    """
    dirs = run_dirs(source, root)
    if not dirs:
        raise ValueError(f"source={str(source)!r} has no finished runs")
    if len(dirs) == 1 and store.is_done(Path(source)):
        return link_run(dirs[0], recompute=recompute, write=write, **options)
    linked, skipped = [], []
    for d in dirs:
        try:
            linked.append(link_run(d, recompute=recompute, write=write, **options))
        except ValueError as err:
            skipped.append(f"{d.name}: {err}")
    if not linked:
        raise ValueError(f"source={str(source)!r}: no run could be linked; " + "; ".join(skipped[:3]))
    ds = stack_runs(linked)
    ds.attrs["skipped"] = "; ".join(skipped)
    return ds


def stack_runs(datasets):
    """Per-run link Datasets stacked along ``run`` (outer join over probe steps), with the
    run coordinates ``opt``, ``lr0``, ``momentum``."""
    return xr.concat([_run_coords(x) for x in datasets], dim="run", join="outer",
                     combine_attrs="drop_conflicts", data_vars="all")


def _run_coords(ds):
    a = ds.attrs
    ds = ds.expand_dims(run=[a["run_id"]])
    return ds.assign_coords(opt=("run", [a["method"]]), lr0=("run", [a["lr0"]]),
                            momentum=("run", [a["momentum"]]))


def layer_table(ds):
    """Per-layer summary of a link Dataset (pooled over runs and probe steps): median h/edge,
    the most frequent top-mode regime, mean predicted and measured correlation and squared
    norm, and the per-layer Spearman and sign agreement of the correlation."""
    rows = {}
    for layer in ds["layer"].values:
        x = ds.sel(layer=layer)
        pred, meas = x["pred_grad_corr"].values.ravel(), x["meas_grad_corr"].values.ravel()
        sc = agreement_scores(pred, meas)
        regimes = pd.Series(x["regime"].values.ravel()).dropna()
        rows[layer] = {
            "n": sc["n"], "h/edge": float(np.nanmedian(x["edge_ratio"])),
            "regime": regimes.mode().iloc[0] if len(regimes) else "",
            "pred_corr": float(np.nanmean(pred)) if sc["n"] else np.nan,
            "meas_corr": float(np.nanmean(meas)) if sc["n"] else np.nan,
            "spearman": sc["spearman"], "sign_agree": sc["sign_agreement"],
            "pred_|g|^2": float(np.nanmean(x["pred_grad_sq_norm"])),
            "meas_|g|^2": float(np.nanmean(x["meas_grad_sq_norm"])),
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def format_report(ds):
    """The per-layer table and the pooled scores, as printed by ``optdyn link``."""
    scores = link_scores(ds)
    lines = [layer_table(ds).to_string(float_format=lambda v: f"{v:.3g}"), ""]
    for what, sc in scores.items():
        lines.append(f"{what}: " + ", ".join(f"{k}={sc[k]:.3g}" if isinstance(sc[k], float) else f"{k}={sc[k]}"
                                              for k in SCORES))
    if ds.attrs.get("skipped"):
        lines.append(f"skipped: {ds.attrs['skipped']}")
    return "\n".join(lines)


def add_command(subparsers):
    p = subparsers.add_parser("link", help="predicted vs measured per-layer oscillation and norm, with scores",
                              description="Link a run (or every finished run of a store root or sweep "
                              "spec): NQM predictions from the measured per-layer sharpness, Hessian trace "
                              "and gradient noise, beside the measured successive-gradient correlation and "
                              "gradient norm. Writes link.nc beside each run; prints a per-layer table and "
                              "the agreement scores.")
    p.add_argument("source", help="a run directory, a store root, or a sweep spec (.toml)")
    p.add_argument("--root", help="store root when SOURCE is a spec (default: the spec's root)")
    p.add_argument("--window", type=int, help="measurement window in steps (default: probe spacing)")
    p.add_argument("--align", default="center", help="measurement window: center (default) or after the probe")
    p.add_argument("--noise-model", default="curvature", help="additive or curvature (default)")
    p.add_argument("--shape", default="power", help="spectrum shape from the summary: power (default), two-level")
    p.add_argument("--on-unstable", default="exclude", help="modes past the edge: exclude (default), nan")
    p.add_argument("--smooth", type=int, default=3, help="probes in the rolling mean of the probe estimates")
    p.add_argument("--prediction", default="schedule",
                   help="schedule (default: NQM run through the lr sequence) or stationary")
    p.add_argument("--signal", default="none", help="mean-gradient term from the probe's grad_signal: none "
                   "(default), fluct / root (lag-1 of the network top mode's fluctuation / dominant root), drift (+1)")
    p.add_argument("--block-only", action="store_true",
                   help="per-layer diagonal-block spectra only (no network top mode in each layer)")
    p.add_argument("--recompute", action="store_true", help="ignore existing link.nc files")
    p.add_argument("--json", help="also write the scores (and options) as JSON here")
    p.set_defaults(func=_link_main)


def _link_main(args):
    ds = link(args.source, root=args.root, recompute=args.recompute, window=args.window, align=args.align,
              noise_model=args.noise_model, shape=args.shape, on_unstable=args.on_unstable, smooth=args.smooth,
              global_mode=not args.block_only, prediction=args.prediction, signal=args.signal)
    print(format_report(ds))
    if args.json:
        store.atomic_write_json(args.json, {"scores": link_scores(ds), "options": {
            k: ds.attrs.get(k) for k in OPTIONS}, "source": str(args.source)})
    return 0
