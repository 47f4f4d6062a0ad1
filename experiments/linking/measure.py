r"""The measured side of the link (:mod:`experiments.linking.core`): the successive-gradient
correlation and squared gradient norm of each layer over a window of steps around each probe,
from the tracer's per-step ``grad_norm`` and ``grad_cos``."""

import numpy as np
import xarray as xr


ALIGNS = ("center", "after")  # where the measurement window sits relative to the probe


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


def split_half_windows(trace, probe_steps=None, window=None, align="center"):
    """The measured correlation over two halves of the window of :func:`measured_window`, on the
    same ``probe_step`` coordinates: ``meas_half1_grad_corr`` over its first ⌊W/2⌋ steps,
    ``meas_half2_grad_corr`` over the rest; ``meas_alt1_grad_corr`` / ``meas_alt2_grad_corr`` over
    its even / odd steps t (the pair t−1, t). Each split covers exactly the full window's step pairs.
    ``meas_{half,alt}{1,2}_grad_sq_norm``: the mean squared gradient norm over the same steps (the
    noise floor of the norm's error, :func:`experiments.linking.scores.error_floor`).
    Their agreement across points is the split-half reliability of the full window's estimate
    (:func:`experiments.linking.scores.noise_ceiling`). The two splits fail in opposite directions:
    the state's change within the window separates the first and second halves (understating the
    reliability) but not the alternating ones, whose estimates share every gradient between them
    (correlated errors, overstating it)."""
    probe_steps = np.asarray(trace["probe_step"].values if probe_steps is None else probe_steps)
    window = default_window(probe_steps) if window is None else int(window)
    if window < 2:
        raise ValueError(f"window={window} is outside the valid range [2, inf) for split halves")
    if align not in ALIGNS:
        raise ValueError(f"align={align!r} is unknown; valid: {', '.join(ALIGNS)}")
    step = trace["step"]
    probe = xr.DataArray(probe_steps, dims="probe_step", coords={"probe_step": probe_steps})
    start = probe - window // 2 if align == "center" else probe
    inside = (step >= start) & (step < start + window)
    first = inside & (step < start + window // 2)
    parts = {"half1": first, "half2": inside & ~first,
             "alt1": inside & (step % 2 == 0), "alt2": inside & (step % 2 == 1)}
    out = {f"meas_{k}_grad_corr": _corr_over(trace, m) for k, m in parts.items()}
    norm_sq = trace["grad_norm"] ** 2
    for k, m in parts.items():
        ok = m & np.isfinite(norm_sq)
        out[f"meas_{k}_grad_sq_norm"] = xr.where(ok, norm_sq, 0.0).sum("step") / ok.sum("step")
    return xr.Dataset(out)


def _corr_over(trace, mask):
    """``meas_grad_corr`` of :func:`measured_window` over the steps where ``mask`` holds."""
    norm = trace["grad_norm"]
    prev = norm.shift(step=1)
    dot = trace["grad_cos"] * norm * prev
    ok = mask & np.isfinite(dot)
    total = lambda values: xr.where(ok, values, 0.0).sum("step")  # noqa: E731
    return total(dot) / np.sqrt(total(norm**2) * total(prev**2))
