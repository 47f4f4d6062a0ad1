r"""What a change of lr, momentum or method at step k would do, predicted from the run's trace
and probes up to k (docs/theory.md §4, §5, §9).

A *change* (:class:`Change`) multiplies the lr from step k on (``lr_factor``; a decay
``--decay g`` is the factor g), and/or sets the momentum or the method; ``scheduled`` is no
change (the run's own schedule continues, e.g. its next step decay). Its *plan* is the lr,
momentum and method of every step 0..k+nW−1 (:func:`plan`).

The prediction per change, layer and window (window 0: the W steps before k, measured;
windows 1..n: [k+(j−1)W, k+jW)):

- the *link model* (:data:`PREDICTOR`; :func:`nqm_predictor` is the fixed-curvature core; the
  predictor in use, :func:`default_predictor`, takes ρ from the NQM with the plateau-escape
  forecast before a run's escape, the progressive sharpening after an lr decrease and the norm's
  post-escape drift after the escape, and E‖g‖² and E‖Δθ‖² from the NQM with the flow-time
  sharpening of the bulk and the noise, or in the small-loss regime the loss's own fall,
  :mod:`experiments.whatif.bulk`) gives model values of
  the successive-gradient correlation ρ, E‖g‖² and E‖Δθ‖² per window, for window 0 too;
- these are anchored on window 0's measurement: ρ̂_j = ρ_meas,0 + (ρ_j − ρ_0),
  ‖g‖̂_j = ‖g‖_meas,0·√(E‖g‖²_j / E‖g‖²_0), update ratio
  r̂_j = r_meas,0 + ½log₁₀(E‖Δθ‖²_j / E‖Δθ‖²_0) (the update:parameter ratio's
  log10(mean|Δθ|/mean|θ|), with mean|Δθ| ∝ ‖Δθ‖ and θ nearly constant over a window):
  the model supplies the change, the trace the level;
- h/edge and the regime of the network's top mode: α_new·λ'_max over the new method's edge
  (docs/theory.md §2), λ'_max the curvature forecast's (:mod:`experiments.whatif.curvature`:
  held at or below the edge, or the run's level where it sits at its stochastic edge, under the
  new lr and method; with the forecast off, the
  last probe's λ_max, assumed to persist); per layer the same for the layer's block top
  mode, scaled with it (``pred_h_edge_layer``, ``pred_regime_layer``).

Persistence, the baseline (§9), predicts window 0's measured values for every window. The *trend*
baseline (no theory either) carries window 0's measured norm and update ratio forward along the
run's own log-linear trend before k, the same for every change (``trend_*``;
:func:`experiments.whatif.drift.trend_forecast`), and window 0's ρ as persistence does: the norm
moves that a forecaster who extrapolates the run, and knows nothing of the change, gets right.

An improved link model plugs in as one function with :func:`nqm_predictor`'s signature:
``predictor(trace, config, at, plans, windows) -> Dataset (change, window, layer)`` with
``grad_corr``, ``grad_sq``, ``update_sq`` (model values; window 0 included) and optionally
``curvature_factor`` (change, window): the forecast λ'_max over the last probe's λ_max at
each window's first step (1 if absent), and optionally its own anchored predictions
``anchored_grad_corr`` / ``anchored_grad_norm`` / ``anchored_update_ratio`` (change, window,
layer), used in place of the window-0 anchoring above (:mod:`experiments.whatif.delta`: a
forecast of the unchanged run times the model's effect of the change).
"""

from dataclasses import dataclass

import numpy as np
import xarray as xr

from dynamics.quadratic import stability_edge
from experiments.linking.core import run_method
from experiments.linking.measure import default_window
from experiments.runs.optim import lr_factors
from experiments.whatif import bulk, delta, drift, escape, sharpen
from experiments.whatif.core import (ANCHORED, anchor_on_window0, defined_regime, diverged_step, measure_windows,
                                    nqm_predictor)

METHODS = ("gd", "hb", "nag")
LENGTH_SCHEDULES = ("cosine", "linear")  # their lr factors depend on the run's length (steps)


@dataclass(frozen=True)
class Change:
    """A change at step k: lr × ``lr_factor`` from k on, ``momentum`` / ``method`` if given."""

    label: str
    lr_factor: float = 1.0
    momentum: float = None
    method: str = None

    def __post_init__(self):
        if not (np.isfinite(self.lr_factor) and self.lr_factor > 0):
            raise ValueError(f"lr_factor={self.lr_factor!r} is outside the valid range (0, inf)")
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise ValueError(f"momentum={self.momentum!r} is outside the valid range [0, 1)")
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is unknown; valid: {', '.join(METHODS)}")

    def new_method(self, method):
        """The method from k on for a run of ``method``: the one given, else the run's; a momentum
        > 0 set on a gd run makes it heavy ball (PyTorch's SGD with that momentum), not gd with
        the momentum dropped."""
        if self.method is not None:
            return self.method
        return "hb" if method == "gd" and self.momentum is not None and self.momentum > 0 else method

    def fork_overrides(self, config):
        """RunConfig fields of the fork that makes this change (``config``: the parent's dict)."""
        out = {}
        if self.lr_factor != 1.0:
            out["lr"] = config["lr"] * self.lr_factor
        if self.momentum is not None:
            out["momentum"] = self.momentum
        if self.new_method(config["opt"]) != config["opt"]:
            out["opt"] = self.new_method(config["opt"])
        return out


SCHEDULED = Change("scheduled")


def changes_from(lr_factors=(), decays=(), momenta=(), methods=(), scheduled=True):
    """The list of changes the CLI's flags ask for (``scheduled`` first)."""
    for g in decays:
        if not 0 < g <= 1:
            raise ValueError(f"decay={g!r} is outside the valid range (0, 1] (a larger factor: --lr-factor)")
    out = [SCHEDULED] if scheduled else []
    out += [Change(f"lr×{f:g}", lr_factor=f) for f in lr_factors]
    out += [Change(f"decay×{g:g}", lr_factor=g) for g in decays]
    out += [Change(f"momentum={m:g}", momentum=m) for m in momenta]
    out += [Change(f"method={m}", method=m) for m in methods]
    return out


def plan(config, at, change, horizon):
    """Per-step (lr, momentum, method) for steps 0..horizon−1 under ``change`` made at ``at``:
    the run's schedule (from its config) before, the changed one after."""
    if config["schedule"] in LENGTH_SCHEDULES and horizon > config["steps"]:
        raise ValueError(f"horizon={horizon} is outside the valid range [1, steps={config['steps']}]: the "
                         f"{config['schedule']} schedule's lr depends on the run's length, so it is not defined "
                         f"past the run's end (a change at {at} with windows ending at step {horizon})")
    steps = max(horizon, config["steps"])
    f = lr_factors(config["schedule"], steps, warmup_steps=config.get("warmup_steps", 0),
                   step_every=config.get("step_every", 0), step_gamma=config.get("step_gamma", 0.1),
                   final_lr_factor=config.get("final_lr_factor", 0.0))[:horizon]
    method, momentum = run_method(config)
    lrs = config["lr"] * f
    lrs[at:] *= change.lr_factor
    mom = np.full(horizon, momentum)
    meth = np.array([method] * horizon, dtype=object)
    new_method = change.new_method(method)
    mom[at:] = 0.0 if new_method == "gd" else (momentum if change.momentum is None else change.momentum)
    meth[at:] = new_method
    return {"lr": lrs, "momentum": mom, "method": meth}


def window_bounds(at, window, n_windows):
    """[start, stop) of window 0 (before ``at``) and windows 1..n after it."""
    return [(at - window, at)] + [(at + j * window, at + (j + 1) * window) for j in range(n_windows)]


def default_predictor(trace, config, at, plans, windows):
    """The predictor in use (:data:`PREDICTOR`), chosen by the sixteenth round's rule
    (docs/findings/whatif.md, "Sixteenth round"; ``bulk_mix_power_held`` in
    ``analyses/whatif_forecast_choice.py``): the fifteenth round's *top held, bulk sharpening,
    blended with the run's trend when the loss is small* (:func:`experiments.whatif.bulk.bulk_predictor`,
    ``combine="level"``, ``rate="loss_level"``, ``level="blend_small_loss"``; ``--base
    bulk-trend-blend``) with model averaging over the bulk's future (``mix=("power_trace", "held")``).
    ρ, h/edge and the regime are :data:`experiments.whatif.bulk.TOP`'s: the plateau-escape forecast,
    the progressive sharpening after an lr decrease capped at the run's level, and the unchanged
    run's post-escape norm drift in flow time. The norm is the equal-weight geometric mean of the
    NQM's norms under three forecasts of the bulk's curvature after k, each anchored on window 0:
    the flow-time sharpening at its rate since the first probe, the power of τ with the summed
    trace's exponent (a slowing rate), and the curvature held at k; the log10 update ratio is their
    mean. No weight is fitted (Bates & Granger 1969; Smith & Wallis 2009). In the small-loss regime
    of cross-entropy (the window's mean loss below 0.2 nats and falling) the unchanged run's level
    is the geometric mean of the loss's forecast and the run's own log-linear trend (set on the
    mix), and each change's effect over it is the mix's."""
    return bulk.bulk_predictor(trace, config, at, plans, windows, combine="level", rate="loss_level",
                               level="blend_small_loss", mix=("power_trace", "held"))


PREDICTOR = default_predictor  # the one function an improved link model replaces

# The unchanged run's level by name (``optdyn whatif --base``), each a predictor with
# :data:`PREDICTOR`'s signature.
BASES = {
    "window0": nqm_predictor,  # the fixed-curvature model anchored on window 0
    "persistence": delta.predictor("persistence"),
    "trend": delta.predictor("trend"),
    "escape": escape.predictor(),
    "drift-steps": drift.predictor("steps"),
    "drift-flow": drift.predictor("flow"),
    # the eighth round's best, not chosen (docs/findings/whatif.md, "Eighth round")
    "since-escape": drift.predictor("flow", inner=sharpen.predictor("run"), gate="since_escape", fit="batches"),
    "sharpen-decay": bulk.TOP,  # the predictor in use from the seventh round to the eleventh
    "bulk-sharpening": bulk.predictor("level"),  # the predictor in use from the eleventh round to the fourteenth
    "bulk-loss-level": bulk.predictor("level", rate="loss_level"),  # in use in the fourteenth round
    # in use in the fifteenth round
    "bulk-trend-blend": bulk.predictor("level", rate="loss_level", level="blend_small_loss"),
}


# --------------------------------------------------------------------------- whatif
def whatif(trace, at, changes, *, window=None, n_windows=2, predictor=None, config=None):
    """Predictions of each change at step ``at`` from the trace and probes before it.

    Returns a Dataset over (change, window, layer) (window 0: measured before ``at``):
    ``pred_grad_corr``, ``pred_grad_norm``, ``pred_update_ratio``, ``pred_h_edge``,
    ``pred_regime`` (model, anchored as in the module docstring), ``persist_*`` (window 0's
    measured value), ``trend_*`` (the trend baseline of the module docstring), ``model_*`` (the
    predictor's raw values) and ``meas0_*``; the change
    labels in the ``label`` coordinate. ``window`` defaults to the probe spacing.

    Where the model does not apply, a ValueError says why: a method the NQM does not describe
    (Adam, :func:`experiments.linking.core.run_method`), a line search (the step is rescaled
    every step), a trace without the probes' sharpness, trace or noise, ``at`` past the run's
    divergence (:func:`diverged_step`), windows past the end of a length-dependent schedule
    (:func:`plan`). A clip that binds in window 0 and weight decay are noted in
    ``attrs["note"]`` (the model takes the unclipped update and the probed H without wd).
    """
    config = dict(trace.attrs.get("config", {}) if config is None else config)
    method, momentum = run_method(config)
    if config.get("line_search"):
        raise ValueError("line_search=True is not predicted (valid: False): the step is rescaled every step by a "
                         "line search on the batch loss, so a change of lr is not the change of the step that the "
                         "NQM's lr sequence describes")
    steps = trace.sizes["step"]
    probes = trace["probe_step"].values if "probe_step" in trace.dims else np.array([])
    if probes.size == 0:
        raise ValueError("the trace has no probe steps (run with probe_every > 0): whatif needs the probes")
    given = window is not None
    window = default_window(probes) if window is None else int(window)
    div = diverged_step(trace)
    if div is not None and not window <= at <= div:
        valid = (f"the valid range [{window}, {div}]" if window <= div else
                 f"every step (none is: a window of {window} steps does not fit before step {div})")
        raise ValueError(f"at={at} is outside {valid}: the run diverged at step {div} (non-finite loss or "
                         f"gradient), and a prediction needs a finite window before at")
    if not 1 <= at <= steps:
        raise ValueError(f"at={at} is outside the valid range [{window}, {steps}] (window .. steps done)")
    if not 1 <= window <= at:
        raise ValueError(f"window={window} is outside the valid range [1, at={at}]"
                         + ("" if given else " (default: the probe spacing; give --window)"))
    if int(n_windows) < 1:
        raise ValueError(f"n_windows={n_windows} is outside the valid range [1, inf)")
    if not changes:
        raise ValueError("changes is empty; give at least one change")
    windows = window_bounds(at, window, int(n_windows))
    horizon = windows[-1][1]
    plans = [plan(config, at, ch, horizon) for ch in changes]
    before = trace.isel(step=slice(0, at)).sel(probe_step=probes[probes <= at])
    model = (predictor or PREDICTOR)(before, config, at, plans, windows)
    meas0 = measure_windows(before, windows[:1], method, momentum).isel(window=0, drop=True)
    corr, norm, ratio = anchor_on_window0(meas0, model)
    if all(k in model for k in ANCHORED):  # the predictor anchors itself (experiments.whatif.delta)
        corr, norm, ratio = (model[k] for k in ANCHORED)
    lam_top = float(before["sharpness_global"].values[-1])
    lam_layer = before["sharpness"].isel(probe_step=-1).values
    kappa = model["curvature_factor"].values if "curvature_factor" in model else np.ones((len(changes), len(windows)))
    h_edge = np.full((len(changes), len(windows)), np.nan)
    h_layer = np.full((len(changes), len(windows), lam_layer.size), np.nan)
    reg = np.empty((len(changes), len(windows)), dtype=object)
    reg_layer = np.empty(h_layer.shape, dtype=object)
    for c, p in enumerate(plans):
        for w, (a, b) in enumerate(windows):
            m, beta, lr = p["method"][a], p["momentum"][a], p["lr"][a]
            edge, k = float(stability_edge(m, beta)), kappa[c, w]
            h_edge[c, w] = lr * k * lam_top / edge
            reg[c, w] = defined_regime(m, lr * k * lam_top, beta)
            h_layer[c, w] = lr * k * lam_layer / edge
            reg_layer[c, w] = [defined_regime(m, lr * k * x, beta) for x in lam_layer]
    persist = lambda v: meas0[v].expand_dims(change=model.change, window=model.window)  # noqa: E731
    trend_norm, trend_ratio = (v.assign_coords(window=model.window).expand_dims(change=model.change)
                               for v in drift.trend_forecast(before, at, windows, meas0))
    ds = xr.Dataset({
        "pred_grad_corr": corr, "pred_grad_norm": norm, "pred_update_ratio": ratio,
        "pred_h_edge": (("change", "window"), h_edge), "pred_regime": (("change", "window"), reg.astype(str)),
        "pred_h_edge_layer": (("change", "window", "layer"), h_layer),
        "pred_regime_layer": (("change", "window", "layer"), reg_layer.astype(str)),
        "persist_grad_corr": persist("grad_corr"), "persist_grad_norm": persist("grad_norm"),
        "persist_update_ratio": persist("update_ratio"),
        "trend_grad_corr": persist("grad_corr"),
        "trend_grad_norm": trend_norm, "trend_update_ratio": trend_ratio,
        "model_grad_corr": model["grad_corr"], "model_grad_sq": model["grad_sq"],
        "model_update_sq": model["update_sq"],
    })
    ds = ds.transpose("change", "window", "layer").assign_coords(label=("change", [ch.label for ch in changes]),
                          start=("window", [a for a, _ in windows]), stop=("window", [b for _, b in windows]))
    ds["persist_h_edge_layer"] = ("layer", lr_at(trace, at - 1) * lam_layer / float(stability_edge(method, momentum)))
    ds.attrs = {"at": int(at), "window": int(window), "n_windows": int(n_windows), "method": method,
                "momentum": momentum, "persist_h_edge": float(lr_at(trace, at - 1) * lam_top
                                                                / float(stability_edge(method, momentum)))}
    notes = [clip_note(before, config, windows[0]), decay_note(config, lam_top)]
    if any(notes):
        ds.attrs["note"] = "\n".join(n for n in notes if n)
    return ds


def decay_note(config, lam_top):
    """A line saying that weight decay wd (coupled, as SGD adds it) shifts every curvature by wd,
    H + wd·I, which the probed H and so the model's h/edge leave out; "" without weight decay."""
    wd = float(config.get("weight_decay", 0.0) or 0.0)
    if wd <= 0:
        return ""
    rel = f"{wd / lam_top:.2g}" if np.isfinite(lam_top) and lam_top > 0 else "unknown"
    return (f"note: weight decay {wd:g} adds {wd:g} to every curvature (H + wd I); the probed H, and the model's "
            f"h/edge, leave it out (wd / network λ_max = {rel})")


CLIP_STEPS = 0.1  # a clip that scales at least this fraction of window 0's steps is noted (diagnose's clip.* rule)


def clip_note(trace, config, window0):
    """A line saying that gradient clipping scaled at least :data:`CLIP_STEPS` of window 0's steps
    (the model takes the unclipped update: the NQM is linear in the gradient, a clip is not), or ""."""
    if config.get("clip", "none") == "none" or "clip_factor_global" not in trace:
        return ""
    f = trace["clip_factor_global"].values[max(window0[0], 0):window0[1]]
    f = f[np.isfinite(f)]
    if not f.size or np.mean(f < 1) < CLIP_STEPS:
        return ""
    return (f"note: the {config['clip']} clip at {config.get('clip_value', float('nan')):g} scaled "
            f"{100 * np.mean(f < 1):.0f}% of window 0's steps (mean global factor {np.mean(f):.2f}); the model "
            f"takes the unclipped update (the NQM is linear in the gradient), only the levels measured in window 0 "
            f"include the clip")


def lr_at(trace, step):
    return float(trace["lr"].values[step])


def fork_config(parent, parent_id, at, change, horizon, data_seed=0):
    """The RunConfig dict of the fork making ``change`` at ``at``: the parent's config with the
    change, ``fork_from = parent_id@at``, no checkpoints, and (where the schedule's factors
    do not depend on the run's length: constant, step) only ``horizon`` steps. ``data_seed``
    (≥ 1): the fork's data order redrawn from ``at`` on (``RunConfig.fork_data_seed``)."""
    d = {**parent, **change.fork_overrides(parent), "fork_from": f"{parent_id}@{at}", "checkpoint_every": 0}
    if data_seed:
        d["fork_data_seed"] = int(data_seed)
    if parent["schedule"] in ("constant", "step"):
        d["steps"] = int(horizon)
    return d


__all__ = ["Change", "SCHEDULED", "changes_from", "defined_regime", "diverged_step", "fork_config",
           "measure_windows", "nqm_predictor", "plan", "whatif", "window_bounds", "PREDICTOR", "BASES", "default_predictor"]


def format_whatif(ds):
    """A per-change, per-window, per-layer table of the prediction (``pred``), persistence
    (``persist``) and, after ``--check``, the fork's measurement (``meas``). A value that is not
    a number is printed as its reason: ``diverged`` (the fork diverged before the window's end,
    ``meas_diverged_step``), ``no probe`` (no probe of the fork inside the window: no measured
    h/edge), ``undefined`` (the model has no value: the footnote says why)."""
    checked = "meas_grad_corr" in ds
    lines = [f"what if at step {ds.attrs['at']} ({ds.attrs['method']}, momentum {ds.attrs['momentum']:g}); "
             f"windows of {ds.attrs['window']} steps; persistence = window 0 (steps "
             f"{int(ds.start[0])}-{int(ds.stop[0]) - 1}) measured"]
    lines += [ds.attrs["note"]] if ds.attrs.get("note") else []
    cols = ("corr", "|g|", "u:p", "h/edge")
    head = f"  {'layer':<14}" + "".join(f"{c + ' ' + k:>15}" for c in cols
                                      for k in (("pred", "persist", "meas") if checked else ("pred", "persist")))
    undefined = False
    for c, label in enumerate(ds["label"].values):
        div = int(ds["meas_diverged_step"].values[c]) if "meas_diverged_step" in ds else -1
        for w in range(1, ds.sizes["window"]):  # u:p = log10 update:parameter ratio
            x = ds.isel(change=c, window=w)
            gone = 0 <= div < int(x.stop)
            h = f"h/edge {_cell(x.pred_h_edge, 'undefined')} ({x.pred_regime.item()})"
            if checked:
                h += f"; fork: diverged at step {div}" if gone else \
                    f"; fork: {float(x.meas_h_edge):.3g} ({x.meas_regime.item()})" if x.meas_regime.item() else \
                    "; fork: no probe"
            lines += ["", f"{label}: steps {int(x.start)}-{int(x.stop) - 1}; network top mode {h}", head]
            meas_why = "diverged" if gone else "n/a"
            for layer in ds["layer"].values:
                y = x.sel(layer=layer)
                cells = []
                for v in ("grad_corr", "grad_norm", "update_ratio"):
                    cells += [_cell(y[f"pred_{v}"], "undefined"), _cell(y[f"persist_{v}"], "n/a")]
                    cells += [_cell(y[f"meas_{v}"], meas_why)] if checked else []
                before = ds["persist_h_edge_layer"].sel(layer=layer).item()
                cells += [_cell(y["pred_h_edge_layer"], "undefined"), _cell(before, "n/a")]
                cells += [_cell(y["meas_h_edge_layer"], "diverged" if gone else "no probe")] if checked else []
                undefined |= "undefined" in cells
                lines.append(f"  {str(layer):<14}" + "".join(f"{x:>15}" for x in cells))
    if undefined:
        lines += ["", "undefined: the model gives no value there (no positive, finite probed curvature at or before "
                      "the change: of the layer's block, where its NQM spectrum or regime is not defined, or of the "
                      "network's top mode, for h/edge)"]
    return "\n".join(lines)


def _cell(v, why):
    v = float(v)
    return f"{v:.3g}" if np.isfinite(v) else why
