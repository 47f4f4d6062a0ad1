r"""``optdyn diagnose``: a per-layer diagnosis of a run, each statement produced by a named rule
and printed with the numbers it rests on (docs/theory.md §2, §4, §5, §6).

The diagnosis looks at the last ``last`` steps of the trace (default: the last quarter), the
*window*, and at its two halves (early, late) for trends. Per layer:

- ``ratio.unstable`` / ``ratio.healthy`` / ``ratio.slow``: DL4J's update:parameter ratio
  r = log10(mean|Δθ|/mean|θ|) (median over the window) above −2 / in [−4, −2] (healthy
  near −3) / below −4 (§6).
- ``grad.exploding``: ‖g_l‖ grows more than ×2 per window (least-squares slope of
  log10‖g_l‖), or a non-finite gradient; ``grad.vanishing``: the layer's mean |g| is below
  1e-2 × the median layer's (or below 1e-8) and not rising; ``grad.ok`` otherwise. Printed
  with the trend and min/mean/max |g_i|.
- ``edge.at`` / ``edge.near`` / ``edge.far``: h/edge of the network's top mode,
  lr·λ_max(H)/edge(method, β) at the window's probes (max), ≥ 0.9 / ≥ 0.5 / below, with
  the regime of that mode and of the layer's own block top mode (§2, §5).
- ``osc.oscillating`` (measured correlation ρ ≤ −0.2) / ``osc.persistent`` (ρ ≥ 0.2) /
  ``osc.none``, with the model's reason: the stationary NQM ρ_g of one mode at the
  network's h (§4; ρ_g → −1 at the edge, ≈ h(2β−1)/(2(1−β)) > 0 for small h and β > ½).
- ``growth.growing`` (late/early ‖g_l‖ > 1.1) with its cause from the link model's terms
  E‖g‖² ≈ σ² + E‖Hx‖²: ``noise`` (the probe's tr Cov rose most), ``sharpness`` (the layer's
  λ_max rose most), ``oscillation`` (the network's top mode at h/edge ≥ 0.5 with ρ ≤ −0.2);
  ``lr_decay`` is noted when the lr fell inside the window; ``growth.none`` otherwise.
- ``clip.global_other`` (a global clip at c would scale the layer in ≥ 10 % of the steps
  although its own norm is below c: other layers' norms set its step — a per-layer clip
  leaves it alone) / ``clip.global_scales`` / ``clip.none``: the fraction of steps and the
  mean factor for global (min(1, c/‖g‖)) and per-layer (min(1, c/‖g_l‖)) clipping, and the
  predicted update ratio r + log10(mean factor) (the update is linear in the gradient and
  momentum averages the factor over steps).
"""

from dataclasses import dataclass, field

import numpy as np

from dynamics.nqm.stationary import gradient_autocorrelation
from dynamics.quadratic import regime, stability_edge
from experiments.whatif.core import diverged_step

RATIO_UNSTABLE, RATIO_HEALTHY, RATIO_SLOW = -2.0, -3.0, -4.0
EXPLODE_PER_WINDOW = np.log10(2.0)
VANISH_RELATIVE, VANISH_ABSOLUTE = 1e-2, 1e-8
EDGE_AT, EDGE_NEAR = 0.9, 0.5
OSC, PERSIST = -0.2, 0.2
GROWTH = 1.1
CLIP_STEPS = 0.1


@dataclass
class Finding:
    layer: str
    rule: str
    statement: str
    numbers: dict = field(default_factory=dict)


@dataclass
class Diagnosis:
    findings: list
    series: dict  # what the figure draws
    info: dict


def diagnose(trace, *, clip=None, last=None, until=None, config=None):
    """The findings for every layer (see the module docstring for the rules); ``until``: look
    at the trace before that step only (default: all of it). A run that diverged (a non-finite
    loss or gradient at step s, :func:`experiments.whatif.core.diverged_step`) is diagnosed
    before s (``until`` at most s; ``info["diverged_step"]``); with fewer than two finite steps
    there is nothing to diagnose (ValueError)."""
    config = dict(trace.attrs.get("config", {}) if config is None else config)
    div = diverged_step(trace)
    blown = set()  # the layers whose gradient was non-finite at the divergence
    if div is not None:
        if div < trace.sizes["step"]:
            at_div = trace["grad_norm"].isel(step=div)
            blown = {str(la) for la, v in zip(trace["layer"].values, at_div.values) if not np.isfinite(v)}
        if div < 2:
            raise ValueError(f"the run diverged at step {div} (non-finite loss or gradient): fewer than 2 finite "
                             f"steps before it, nothing to diagnose")
        until = div if until is None else min(int(until), div)
    if until is not None:
        if not 2 <= int(until) <= trace.sizes["step"]:
            raise ValueError(f"until={until} is outside the valid range [2, {trace.sizes['step']}]")
        cut = {"step": trace["step"] < int(until)}
        if "probe_step" in trace.dims:
            cut["probe_step"] = trace["probe_step"] < int(until)
        trace = trace.sel(cut)
    method = config.get("opt", "hb")
    momentum = 0.0 if method == "gd" else float(config.get("momentum", 0.0))
    steps = trace.sizes["step"]
    last = max(steps // 4, 2) if last is None else int(last)
    if not 2 <= last <= steps:
        raise ValueError(f"last={last} is outside the valid range [2, {steps}] (steps in the trace)")
    win = trace.isel(step=slice(steps - last, steps))
    half = last // 2
    early, late = win.isel(step=slice(0, half)), win.isel(step=slice(half, last))
    g_global = win["grad_norm_global"].values
    c = float(np.nanmedian(g_global)) if clip is None else float(clip)
    if not (np.isfinite(c) and c > 0):
        raise ValueError(f"clip={clip!r} is outside the valid range (0, inf)")
    sgd = method in ("gd", "hb", "nag")
    edge = float(stability_edge(method, momentum)) if sgd else np.nan
    probes = _window_probes(trace, steps - last)
    net = _network_edge(trace, probes, edge) if sgd else {}
    median_abs = float(np.nanmedian(win["grad_abs_mean"].values))
    lr_drop = float(win["lr"].values[-1] / win["lr"].values[0]) if win["lr"].values[0] > 0 else np.nan
    findings = []
    for layer in trace["layer"].values:
        w, e, l8 = (x.sel(layer=layer) for x in (win, early, late))
        findings += [
            _ratio(layer, w),
            _gradients(layer, w, median_abs, last, div if str(layer) in blown else None),
        ]
        if sgd:
            findings.append(_edge(layer, trace, probes, net, method, momentum, edge))
            findings.append(_oscillation(layer, w, net, method, momentum, edge))
        findings.append(_growth(layer, e, l8, trace, probes, net, lr_drop, half, steps - last))
        findings.append(_clipping(layer, w, g_global, c))
    info = {"method": method, "momentum": momentum, "steps": steps, "last": last, "clip": c, "edge": edge,
            "network": net, "lr_change": lr_drop, "diverged_step": div}
    series = {"trace": trace, "start": steps - last}
    return Diagnosis(findings, series, info)


# --------------------------------------------------------------------------- rules
def _ratio(layer, w):
    r = float(np.nanmedian(np.where(np.isfinite(w["update_ratio"].values), w["update_ratio"].values, np.nan)))
    if r > RATIO_UNSTABLE:
        rule, text = "ratio.unstable", f"update:parameter ratio {r:.2f} > {RATIO_UNSTABLE:g}: steps too large (unstable)"
    elif r < RATIO_SLOW:
        rule, text = "ratio.slow", f"update:parameter ratio {r:.2f} < {RATIO_SLOW:g}: learning too slowly"
    else:
        rule, text = "ratio.healthy", (f"update:parameter ratio {r:.2f} in [{RATIO_SLOW:g}, {RATIO_UNSTABLE:g}] "
                                       f"(healthy near {RATIO_HEALTHY:g}; {r - RATIO_HEALTHY:+.2f} from it)")
    return Finding(str(layer), rule, text, {"ratio": r})


def _gradients(layer, w, median_abs, last, nonfinite_at=None):
    g = w["grad_norm"].values
    t = np.arange(g.size)
    ok = np.isfinite(g) & (g > 0)
    slope = np.polyfit(t[ok], np.log10(g[ok]), 1)[0] * last if ok.sum() >= 2 else np.nan  # decades per window
    lo, mean, hi = (float(np.nanmean(w[k].values)) for k in ("grad_abs_min", "grad_abs_mean", "grad_abs_max"))
    nums = {"slope_decades_per_window": float(slope), "abs_min": lo, "abs_mean": mean, "abs_max": hi,
            "relative_to_median_layer": mean / median_abs if median_abs > 0 else np.nan}
    detail = (f"|g| min/mean/max {lo:.2g}/{mean:.2g}/{hi:.2g}, {nums['relative_to_median_layer']:.2g}x the median "
              f"layer's mean; trend {slope:+.2f} decades per {last} steps")
    if nonfinite_at is not None:
        detail = f"non-finite at step {nonfinite_at}, where the run diverged; before it {detail}"
    if nonfinite_at is not None or not np.isfinite(g).all() or slope > EXPLODE_PER_WINDOW:
        return Finding(str(layer), "grad.exploding", f"exploding gradient (> x2 per window or non-finite): {detail}", nums)
    if (mean < VANISH_ABSOLUTE or nums["relative_to_median_layer"] < VANISH_RELATIVE) and not slope > 0:
        return Finding(str(layer), "grad.vanishing", f"vanishing gradient (< {VANISH_RELATIVE:g}x the median layer "
                                                     f"or < {VANISH_ABSOLUTE:g}, not rising): {detail}", nums)
    return Finding(str(layer), "grad.ok", f"neither vanishing nor exploding: {detail}", nums)


def _window_probes(trace, start):
    if "probe_step" not in trace.dims:
        return np.array([], dtype=int)
    p = trace["probe_step"].values
    return p[p >= start] if (p >= start).any() else p[-1:]


def _network_edge(trace, probes, edge):
    if probes.size == 0 or "sharpness_global" not in trace:
        return {}
    lr = trace["lr"].values[np.minimum(probes, trace.sizes["step"] - 1)]
    h = lr * trace["sharpness_global"].sel(probe_step=probes).values
    i = int(np.nanargmax(h)) if np.isfinite(h).any() else 0
    return {"h": float(h[i]), "h_edge": float(h[i] / edge), "probe": int(probes[i]), "lr": float(lr[i])}


def _edge(layer, trace, probes, net, method, momentum, edge):
    if not net:
        return Finding(str(layer), "edge.unknown", "no probes: h/edge unknown (run with probe_every > 0)")
    lr = trace["lr"].values[np.minimum(probes, trace.sizes["step"] - 1)]
    h_layer = float(np.nanmax(lr * trace["sharpness"].sel(layer=layer, probe_step=probes).values))
    r_net = str(regime(method, max(net["h"], 1e-12), momentum))
    r_layer = str(regime(method, max(h_layer, 1e-12), momentum))
    nums = {"h_edge_network": net["h_edge"], "h_edge_layer": h_layer / edge}
    tail = (f"network h/edge {net['h_edge']:.2f} ({r_net}) at probe {net['probe']}; "
            f"layer block h/edge {h_layer / edge:.2f} ({r_layer})")
    if net["h_edge"] >= EDGE_AT:
        return Finding(str(layer), "edge.at", f"at the edge of stability (>= {EDGE_AT:g}): {tail}", nums)
    if net["h_edge"] >= EDGE_NEAR:
        return Finding(str(layer), "edge.near", f"near the edge (>= {EDGE_NEAR:g}): {tail}", nums)
    return Finding(str(layer), "edge.far", f"far from the edge (< {EDGE_NEAR:g}): {tail}", nums)


def measured_corr(w):
    """Σ g_t·g_{t−1} / √(Σ‖g_t‖² Σ‖g_{t−1}‖²) over the window (the link's estimator)."""
    n, c = w["grad_norm"].values, w["grad_cos"].values
    prev = np.r_[np.nan, n[:-1]]
    dot = c * n * prev
    ok = np.isfinite(dot)
    return float(dot[ok].sum() / np.sqrt((n[ok] ** 2).sum() * (prev[ok] ** 2).sum())) if ok.any() else np.nan


def _model_corr(net, method, momentum, edge):
    if not net or not np.isfinite(net["h"]) or net["h"] <= 0:
        return np.nan
    h = min(net["h"], 0.95 * edge)
    return float(gradient_autocorrelation(method, h, momentum))


def _oscillation(layer, w, net, method, momentum, edge):
    rho = measured_corr(w)
    model = _model_corr(net, method, momentum, edge)
    nums = {"rho": rho, "rho_model_top_mode": model}
    if not net or not np.isfinite(model):
        reason = "no probe of the network's h: the model's ρ_g is unknown (run with probe_every > 0)"
    elif net["h_edge"] >= EDGE_NEAR:
        reason = (f"the network's top mode is at h/edge {net['h_edge']:.2f}, where one mode's ρ_g is {model:+.2f} "
                  f"(NQM, §4): it flips sign each step")
    elif momentum > 0.5:
        reason = (f"small h/edge {net.get('h_edge', np.nan):.2f} with momentum {momentum:g} > 0.5 gives ρ_g "
                  f"{model:+.2f} > 0 (§4)")
    else:
        reason = f"noise-driven fluctuation: one mode at the network's h gives ρ_g {model:+.2f} (§4)"
    if rho <= OSC:
        return Finding(str(layer), "osc.oscillating", f"oscillates: ρ = {rho:+.2f} <= {OSC:g}; model: {reason}", nums)
    if rho >= PERSIST:
        return Finding(str(layer), "osc.persistent", f"persistent gradient: ρ = {rho:+.2f} >= {PERSIST:g}; "
                                                     f"model: {reason}", nums)
    return Finding(str(layer), "osc.none", f"no oscillation: ρ = {rho:+.2f} in ({OSC:g}, {PERSIST:g})", nums)


def _probe_ratio(trace, name, layer, early_steps, late_steps):
    if "probe_step" not in trace.dims or name not in trace:
        return np.nan
    p = trace["probe_step"].values
    x = trace[name].sel(layer=layer).values
    a, b = x[np.isin(p, early_steps)], x[np.isin(p, late_steps)]
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    return float(np.mean(b) / np.mean(a)) if a.size and b.size and np.mean(a) > 0 else np.nan


def _growth(layer, e, l8, trace, probes, net, lr_drop, half, start):
    ge, gl = (float(np.sqrt(np.nanmean(x["grad_norm"].values ** 2))) for x in (e, l8))
    growth = gl / ge if ge > 0 else np.nan
    steps = trace.sizes["step"]
    p = trace["probe_step"].values if "probe_step" in trace.dims else np.array([])
    early_p, late_p = p[(p >= start) & (p < start + half)], p[(p >= start + half) & (p < steps)]
    if early_p.size == 0 and p[p < start + half].size:  # fall back on the last probe before
        early_p = p[p < start + half][-1:]
    sharp = _probe_ratio(trace, "sharpness", layer, early_p, late_p)
    noise = np.sqrt(_probe_ratio(trace, "grad_noise", layer, early_p, late_p))
    nums = {"growth": growth, "sharpness_factor": sharp, "noise_factor": noise, "lr_factor": lr_drop}
    if not growth > GROWTH:
        return Finding(str(layer), "growth.none", f"no norm growth: late/early ‖g‖ {growth:.2f} <= {GROWTH:g}", nums)
    rho = measured_corr(l8)
    terms = {"noise": noise, "sharpness": sharp}
    cause = max(terms, key=lambda k: terms[k] if np.isfinite(terms[k]) else -np.inf)
    if net and net["h_edge"] >= EDGE_NEAR and rho <= OSC:
        cause, why = "oscillation", (f"the network's top mode at h/edge {net['h_edge']:.2f} oscillates "
                                     f"(ρ {rho:+.2f}): E‖Hx‖² along it grows")
    elif np.isfinite(terms[cause]) and terms[cause] > GROWTH:
        why = {"noise": f"gradient noise √(tr Cov) rose {_times(noise)} (sharpness {_times(sharp)})",
               "sharpness": f"the layer's sharpness rose {_times(sharp)} (noise {_times(noise)}): "
                            f"E‖Hx‖² grows"}[cause]
    else:
        cause, why = "unexplained", (f"neither noise ({_times(noise)}) nor sharpness ({_times(sharp)}) rose by "
                                     f"{GROWTH:g}, no oscillation at the edge")
    decay = f"; the lr fell x{lr_drop:.3g} in the window" if np.isfinite(lr_drop) and lr_drop < 1 else ""
    nums["cause"] = cause
    return Finding(str(layer), f"growth.{cause}", f"norm grows x{growth:.2f} (late/early > {GROWTH:g}); "
                                                 f"cause: {why}{decay}", nums)


def _times(factor):
    """A probe ratio as "x1.23", or why there is none."""
    return f"x{factor:.2f}" if np.isfinite(factor) else "unmeasured: no probe in each half of the window"


def _clipping(layer, w, g_global, c):
    g = w["grad_norm"].values
    f_glob = np.minimum(1.0, c / g_global)
    f_layer = np.minimum(1.0, c / g)
    ratio = float(np.nanmedian(w["update_ratio"].values))
    frac_g, frac_l = float(np.mean(f_glob < 1)), float(np.mean(f_layer < 1))
    mean_g, mean_l = float(np.nanmean(f_glob)), float(np.nanmean(f_layer))
    nums = {"clip": c, "global_fraction": frac_g, "global_mean_factor": mean_g, "layer_fraction": frac_l,
            "layer_mean_factor": mean_l, "ratio": ratio, "ratio_global": ratio + np.log10(mean_g),
            "ratio_layer": ratio + np.log10(mean_l)}
    detail = (f"at c = {c:.3g}: global clip scales {100 * frac_g:.0f}% of steps (mean factor {mean_g:.2f}, "
              f"ratio {ratio:.2f} -> {nums['ratio_global']:.2f}); per-layer clip {100 * frac_l:.0f}% "
              f"(mean {mean_l:.2f}, ratio -> {nums['ratio_layer']:.2f})")
    if frac_g >= CLIP_STEPS and frac_l < CLIP_STEPS:
        return Finding(str(layer), "clip.global_other", "a global clip would slow this layer for other layers' "
                                                        f"norms; prefer per-layer: {detail}", nums)
    if frac_g >= CLIP_STEPS:
        return Finding(str(layer), "clip.global_scales", f"a clip would scale this layer's own large gradient: "
                                                         f"{detail}", nums)
    return Finding(str(layer), "clip.none", f"a clip at c would rarely act (< {100 * CLIP_STEPS:.0f}% of steps): "
                                            f"{detail}", nums)


# --------------------------------------------------------------------------- output
def format_diagnosis(d):
    """The findings, per layer, one line each: ``[rule] statement``."""
    i = d.info
    net = i["network"]
    if not np.isfinite(i["edge"]):
        h_edge = f"undefined ({i['method']}: the stability edge of GD/HB/NAG does not apply)"
    elif "h_edge" not in net:
        h_edge = "unknown (no probes: run with probe_every > 0)"
    else:
        h_edge = f"{net['h_edge']:.2f}"
    head = [f"diagnosis of the last {i['last']} of {i['steps']} steps ({i['method']}, momentum {i['momentum']:g}); "
            f"network h/edge {h_edge}; clip advice at c = {i['clip']:.3g}",
            "each line: [rule] statement with its numbers (rules: experiments/whatif/diagnose.py)"]
    if i.get("diverged_step") is not None:
        head.insert(0, f"the run diverged at step {i['diverged_step']} (non-finite loss or gradient); the diagnosis "
                       f"is of the {i['steps']} steps before it")
    out, current = head, None
    for f in d.findings:
        if f.layer != current:
            out += ["", f"{f.layer}"]
            current = f.layer
        out.append(f"  [{f.rule}] {f.statement}")
    return "\n".join(out)


def check_figure(path):
    """ValueError unless ``path`` ends with .png or .pdf (the formats :func:`plot_diagnosis`
    writes) and can be written."""
    from pathlib import Path

    from experiments import store

    fmt = Path(path).suffix.lstrip(".").lower()
    if fmt not in ("png", "pdf"):
        raise ValueError(f"figure={str(path)!r}: format {fmt!r} is unknown; valid: .png, .pdf")
    store.check_writable(path, "figure")


def plot_diagnosis(d, path):
    """One page: update ratio with DL4J's bands, gradient norms, h/edge, correlation, clip
    factors and the triggered rules; written atomically (PDF or PNG by the suffix)."""
    check_figure(path)
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments import store

    trace, start = d.series["trace"], d.series["start"]
    layers = [str(x) for x in trace["layer"].values]
    fig, ax = plt.subplots(3, 2, figsize=(7.0, 8.5), layout="constrained")
    step = trace["step"].values
    for k, layer in enumerate(layers):
        col = f"C{k % 10}"
        ax[0, 0].plot(step, trace["update_ratio"].sel(layer=layer), color=col, lw=0.6, label=layer)
        ax[0, 1].semilogy(step, trace["grad_norm"].sel(layer=layer), color=col, lw=0.6)
        cos = trace["grad_cos"].sel(layer=layer).rolling(step=25, min_periods=1).mean()
        ax[1, 1].plot(step, cos, color=col, lw=0.6)
    for y, lab in ((RATIO_UNSTABLE, "unstable"), (RATIO_HEALTHY, "healthy"), (RATIO_SLOW, "too slow")):
        ax[0, 0].axhline(y, color="k", ls=":", lw=0.7)
        ax[0, 0].text(step[0], y, lab, fontsize=6, va="bottom")
    ax[0, 0].set(title="update:parameter ratio (DL4J bands)", xlabel="step", ylabel="log10 mean|Δθ|/mean|θ|")
    ax[0, 0].legend(fontsize=5, ncol=2)
    ax[0, 1].set(title="gradient norm per layer", xlabel="step", ylabel="‖g_l‖")
    ax[1, 1].axhline(0, color="k", lw=0.5)
    ax[1, 1].set(title="successive-gradient cosine (25-step mean)", xlabel="step")
    if "probe_step" in trace.dims and d.info["edge"] == d.info["edge"]:
        p = trace["probe_step"].values
        lr = trace["lr"].values[np.minimum(p, trace.sizes["step"] - 1)]
        ax[1, 0].plot(p, lr * trace["sharpness_global"].values / d.info["edge"], "k-o", ms=2, label="network")
        for k, layer in enumerate(layers):
            ax[1, 0].plot(p, lr * trace["sharpness"].sel(layer=layer).values / d.info["edge"], color=f"C{k % 10}", lw=0.6)
        ax[1, 0].axhline(1, color="k", ls=":", lw=0.7)
        ax[1, 0].legend(fontsize=5)
    ax[1, 0].set(title="h/edge (network: black; layer blocks)", xlabel="probe step")
    clip = {f.layer: f.numbers for f in d.findings if f.rule.startswith("clip.")}
    x = np.arange(len(layers))
    ax[2, 0].bar(x - 0.2, [clip[la]["global_mean_factor"] for la in layers], 0.4, label="global clip")
    ax[2, 0].bar(x + 0.2, [clip[la]["layer_mean_factor"] for la in layers], 0.4, label="per-layer clip")
    ax[2, 0].set_xticks(x, layers, rotation=45, fontsize=6)
    ax[2, 0].set(title=f"mean clip factor at c = {d.info['clip']:.3g}", ylim=(0, 1.05))
    ax[2, 0].legend(fontsize=6)
    for a in (ax[0, 0], ax[0, 1], ax[1, 1]):
        a.axvspan(start, step[-1], color="0.9", zorder=0)
    rules = {}
    for f in d.findings:
        rules.setdefault(f.rule, []).append(f.layer)
    text = "\n".join(f"[{r}] {', '.join(ls)}" for r, ls in sorted(rules.items()))
    ax[2, 1].axis("off")
    ax[2, 1].text(0, 1, "rules triggered (shaded: the window)\n\n" + text, va="top", fontsize=6, family="monospace")
    buf = io.BytesIO()
    fmt = "png" if str(path).lower().endswith(".png") else "pdf"
    fig.savefig(buf, format=fmt, metadata={"Software": "optdyn"} if fmt == "png" else {"Producer": "optdyn",
                                                                                        "CreationDate": None})
    plt.close(fig)
    store.atomic_write_bytes(path, buf.getvalue())
    return path
