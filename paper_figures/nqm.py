"""Figure ``nqm``: the noisy quadratic model's predicted gradient oscillation and norm.

Rows 1-2: stationary lag-1 correlation of successive stochastic gradients and stationary
E g²/σ² against h = αλ for GD, HB and NAG at several momenta: closed forms (lines,
docs/theory.md §4) and a Monte-Carlo simulation started from the stationary law (markers),
stability edges dotted. Row 3: a layer (power-law spectrum) trained with HB through a
step-decay schedule: predicted E‖g_t‖² with a fixed spectrum (it only falls at each decay;
Monte-Carlo markers) and with a sharpness that rises after each decay towards the new
stability edge (progressive sharpening, noise ∝ curvature), where the norm grows; and the
successive-gradient correlation through both.
"""

import numpy as np

from dynamics.nqm.layer import LayerSpectrum
from dynamics.nqm.schedule import schedule_prediction
from dynamics.schedules import lr_schedule
from dynamics.nqm.montecarlo import monte_carlo
from dynamics.quadratic import stability_edge
from dynamics.nqm.stationary import gradient_autocorrelation, mode_factors
from paper_figures import style
from paper_figures.registry import Figure

METHODS = ("gd", "hb", "nag")
MOMENTA = {"gd": (0.0,), "hb": (0.5, 0.9), "nag": (0.5, 0.9)}
BETA_COLOURS = {0.0: style.PALETTE[7], 0.5: style.PALETTE[2], 0.9: style.PALETTE[0]}
LAYER = {"method": "hb", "momentum": 0.9, "lam_max": 10.0, "trace": 150.0, "top_h": 0.6,
         "gamma": 0.1, "noise_total": 1.0, "sharpening": 0.9}


def _stationary_curves(ctx, seed=0):
    n_line, n_mark = 200, ctx.pick(5, 12, 16)
    chains, steps = ctx.pick(60, 400, 2000), ctx.pick(200, 1500, 6000)
    out = {}
    for m in METHODS:
        for b in MOMENTA[m]:
            edge = float(stability_edge(m, b))
            h = np.linspace(0.005, 0.995, n_line) * edge
            v, rho = mode_factors(m, h, b)
            hm = np.linspace(0.04, 0.96, n_mark) * edge
            sim = monte_carlo(m, hm, 1.0, b, 1.0, steps=steps, chains=chains, seed=seed)
            out[m, b] = {"edge": edge, "h": h, "corr": gradient_autocorrelation(m, h, b),
                         "grad_sq": 1 + v, "h_sim": hm, "corr_sim": sim["lag1"] / sim["grad_sq"],
                         "grad_sq_sim": sim["grad_sq"]}
    return out


def _sharpening(lrs, lam0, edge, frac, tau):
    """Top eigenvalue relaxing (time constant tau steps) towards frac * edge / lr_t."""
    s = np.empty_like(lrs)
    s[0] = lam0
    for t in range(1, lrs.size):
        s[t] = s[t - 1] + (max(frac * edge / lrs[t], lam0) - s[t - 1]) / tau
    return s


def _layer_schedule(ctx, seed=1):
    p = LAYER
    steps, n = ctx.pick(150, 3000, 6000), ctx.pick(40, 300, 1000)
    spec = LayerSpectrum.from_summary(p["lam_max"], p["trace"], n)
    edge = float(stability_edge(p["method"], p["momentum"]))
    lr0 = p["top_h"] * edge / p["lam_max"]
    lrs = lr_schedule("step", lr0, steps, milestones=[steps // 3, 2 * steps // 3], gamma=p["gamma"])
    lam, w = spec.eigenvalues, spec.weights
    out = {"step": np.arange(steps), "lr": lrs}
    for model in ("additive", "curvature"):
        s2 = spec.noise_per_mode(p["noise_total"], model)
        pred = schedule_prediction(p["method"], lrs, p["momentum"], lam, s2, x0_var=1.0,
                                   weights=w)
        sim = monte_carlo(p["method"], lam, lrs, p["momentum"], s2, steps=steps,
                          chains=ctx.pick(20, 100, 400), seed=seed, start="given", x0=1.0,
                          average="chains")
        out[model] = {"grad_sq": pred["grad_sq"], "grad_corr": pred["grad_corr"],
                      "grad_sq_sim": sim["grad_sq"] @ w,
                      "grad_corr_sim": (sim["lag1"] @ w) / np.sqrt(
                          (sim["grad_sq"] @ w) * np.concatenate([[np.nan], sim["grad_sq"][:-1] @ w]))}
    # Rising sharpness: the whole spectrum scales with its top eigenvalue; noise ∝ curvature
    # with tr Σ ∝ tr H (Σ ≈ H / batch), so σ_i² = noise_total * λ_i(t) / trace(0).
    top = _sharpening(lrs, p["lam_max"], edge, p["sharpening"], tau=max(steps // 30, 1))
    lam_t = lam[None, :] * (top / p["lam_max"])[:, None]
    s2_t = p["noise_total"] * lam_t / spec.trace
    pred = schedule_prediction(p["method"], lrs, p["momentum"], lam_t, s2_t, x0_var=1.0, weights=w)
    out["rising"] = {"grad_sq": pred["grad_sq"], "grad_corr": pred["grad_corr"], "top": top}
    # Same sharpening with the noise held fixed: h returns to its old value, so the norm only
    # climbs back to (about) its pre-decay level.
    s2_fixed = spec.noise_per_mode(p["noise_total"], "curvature")
    pred = schedule_prediction(p["method"], lrs, p["momentum"], lam_t, s2_fixed, x0_var=1.0,
                               weights=w)
    out["rising_fixed_noise"] = {"grad_sq": pred["grad_sq"], "grad_corr": pred["grad_corr"]}
    return out


def data(ctx):
    return {"stationary": _stationary_curves(ctx), "layer": _layer_schedule(ctx)}


def plot(d, ctx):
    fig, axes = style.new_figure(ncols=3, nrows=3, height=6.4)
    for j, m in enumerate(METHODS):
        ax_c, ax_n = axes[0, j], axes[1, j]
        for b in MOMENTA[m]:
            c = d["stationary"][m, b]
            col = BETA_COLOURS[b]
            lab = "GD" if m == "gd" else rf"$\beta={b:g}$"
            ax_c.plot(c["h"], c["corr"], color=col, label=lab)
            ax_c.plot(c["h_sim"], c["corr_sim"], ls="none", marker="o", ms=2.5, color=col)
            ax_n.plot(c["h"], c["grad_sq"], color=col, label=lab)
            ax_n.plot(c["h_sim"], c["grad_sq_sim"], ls="none", marker="o", ms=2.5, color=col)
            for ax in (ax_c, ax_n):
                ax.axvline(c["edge"], color=col, ls=":", lw=0.8)
        ax_c.axhline(0.0, color="0.6", lw=0.5)
        ax_c.set(title=f"{m.upper()}: lag-1 gradient correlation", xlabel=r"$h = \alpha\lambda$",
                 ylabel=r"$\rho_g$", ylim=(-1.05, 1.05))
        ax_n.set(title=f"{m.upper()}: stationary gradient norm", xlabel=r"$h = \alpha\lambda$",
                 ylabel=r"$E g^2 / \sigma^2$", yscale="log")
        ax_c.legend(loc="lower left", frameon=False)
    lay, p = d["layer"], LAYER
    t, k = lay["step"], max(len(lay["step"]) // 60, 1)
    ax_a, ax_b, ax_r = axes[2]
    for i, model in enumerate(("additive", "curvature")):
        col = style.PALETTE[i]
        ax_a.plot(t, lay[model]["grad_sq"], color=col, label=f"fixed spectrum, {model} noise")
        ax_a.plot(t[::k], lay[model]["grad_sq_sim"][::k], ls="none", marker="o",
                  ms=2, color=col)
    ax_a.set(yscale="log", xlabel="step $t$", ylabel=r"$E\|g_t\|^2$",
             title="HB, step decay, fixed spectrum")
    ax_a.legend(frameon=False)
    ax_b.plot(t, lay["rising"]["grad_sq"], color=style.PALETTE[3],
              label=r"rising sharpness, $\Sigma \propto H$")
    ax_b.plot(t, lay["rising_fixed_noise"]["grad_sq"], color=style.PALETTE[4],
              label="rising sharpness, fixed noise")
    ax_b.plot(t, lay["curvature"]["grad_sq"], color=style.PALETTE[1], ls="--",
              label="fixed spectrum")
    ax_b.set(yscale="log", xlabel="step $t$", ylabel=r"$E\|g_t\|^2$",
             title=r"HB, $\lambda_{max}\to%.1f\,$edge$/\alpha_t$ after decays" % p["sharpening"])
    ax_b.legend(frameon=False)
    ax_r.plot(t, lay["curvature"]["grad_corr"], color=style.PALETTE[1], label="fixed spectrum")
    ax_r.plot(t[::k], lay["curvature"]["grad_corr_sim"][::k], ls="none",
              marker="o", ms=2, color=style.PALETTE[1])
    ax_r.plot(t, lay["rising"]["grad_corr"], color=style.PALETTE[3], label="rising sharpness")
    ax_r.axhline(0.0, color="0.6", lw=0.5)
    ax_r.set(xlabel="step $t$", ylabel=r"$E[g_t\cdot g_{t-1}]/E\|g\|^2$",
             title="successive-gradient correlation", ylim=(-1.05, 1.05))
    ax_r.legend(frameon=False)
    return fig


FIGURE = Figure(
    name="nqm",
    summary="Noisy quadratic model: predicted vs simulated lag-1 gradient correlation and "
            "gradient norm against h for GD/HB/NAG, and a layer's gradient norm through a "
            "step-decay schedule (falls with a fixed spectrum, grows with rising sharpness).",
    data=data,
    plot=plot,
    tags=("theory",),
)
