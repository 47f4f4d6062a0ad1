"""Figure ``modified_accuracy``: how accurate the modified-equation ODEs are, and where they break.

Columns 1-2 (HB, NAG), rows (a d = 100 quadratic with eigenvalues in [0.1, 1]; logistic
regression): the global error max_k ‖x_k − x(t_k)‖ over a fixed horizon against the lr
(log-log), for the first-order flow, the inertial ODE and the modified-loss flow, started on
the slow manifold (solid) or from zero momentum (dashed, PyTorch's default); fitted slopes in
the legend (docs/theory.md §3: 1, 2, 2; 1 from zero momentum). β = 0.9, h = lr·λ_max ≤ 0.15 h_c.

Column 3: the breakdown on f = x²/2 (β = 0.9, manifold start): relative global error over
three slow time constants (at least 30 steps) against h/h_c, h_c the critical damping where
the slow and fast roots merge ((1−√β)² for HB, ((1−β)/(1+β))² for NAG, from
dynamics.quadratic.ripple_band). The two first-order flows cannot ripple: their error is
O(1) once h passes h_c (their expansion parameter is h/(1−β)²). The inertial ODE, second
order in time, has complex roots itself past h ≈ (1−β)²/(2(1+β)) and follows the ripples
until h is O(1−β).
"""

import matplotlib.ticker
import numpy as np

from dynamics.modified import KINDS, global_error, logistic_loss, quadratic_loss
from dynamics.quadratic import ripple_band
from paper_figures import style
from paper_figures.registry import Figure

BETA = 0.9
METHODS = ("hb", "nag")
KIND_LABELS = {"first_order": "first-order flow", "inertial": "inertial ODE",
               "modified_loss": "modified loss"}
KIND_COLOURS = {"first_order": style.PALETTE[7], "inertial": style.PALETTE[2],
                "modified_loss": style.PALETTE[4]}
CURVES = (("first_order", "manifold"), ("inertial", "manifold"), ("inertial", "zero"),
          ("modified_loss", "manifold"), ("modified_loss", "zero"))


def problems(d, n_logistic=200, d_logistic=5):
    """(name, loss, x0, top curvature at x0): the d-dim quadratic and the logistic loss."""
    rng = np.random.default_rng(0)
    eig = np.linspace(0.1, 1.0, d)
    logistic = logistic_loss(n=n_logistic, d=d_logistic, seed=0)
    w0 = np.ones(d_logistic)
    return [("quadratic", quadratic_loss(eig, seed=0), rng.standard_normal(d) / np.sqrt(d), 1.0),
            ("logistic", logistic, w0, float(np.linalg.eigvalsh(logistic.hessian(w0))[-1]))]


def order_study(d, n_lr, h_ratio_max=0.15, span=8.0, horizon=0.5, methods=METHODS, beta=BETA,
                rtol=1e-9, atol=1e-12):
    """Global errors for every problem and method: dict (problem, method) -> ErrorStudy.

    lrs: n_lr log-spaced values up to h = h_ratio_max·h_c at the top curvature, over a factor
    ``span``; horizon 0.5 is five slow time constants (1-β)/λ of the top mode and half of the
    lowest one. The smallest error measured is ~1e-7·‖x0‖ (second order at h/(1-β)^2 ≈ 5e-3),
    so rtol 1e-9 keeps the solver's error below 1%. This is what the benchmark times."""
    out = {}
    for name, loss, x0, top in problems(d):
        for m in methods:
            h_c = float(ripple_band(m, beta)[0])
            lr_max = h_ratio_max * h_c / top
            lrs = np.geomspace(lr_max / span, lr_max, n_lr)
            out[name, m] = global_error(loss, x0, m, lrs, beta, horizon, kinds=KINDS, rtol=rtol, atol=atol)
    return out


def breakdown_study(n_h, beta=BETA, ratio_min=1e-2, ratio_max=1e2, time_constants=3.0, min_steps=30):
    """Relative global errors on f = x²/2 from the manifold, h/h_c from ratio_min to ratio_max,
    over ``time_constants`` slow time constants (1-β)/λ, or ``min_steps`` steps if longer."""
    out = {}
    for m in METHODS:
        h_c = float(ripple_band(m, beta)[0])
        ratios = np.geomspace(ratio_min, ratio_max, n_h)
        errors = np.empty((len(KINDS), n_h))
        for i, lr in enumerate(ratios * h_c):
            horizon = max(time_constants * (1 - beta), min_steps * lr)
            study = global_error(quadratic_loss([1.0]), np.ones(1), m, [lr], beta, horizon,
                                 starts=("manifold",))
            errors[:, i] = study.errors[:, 0, 0]
        out[m] = {"ratio": ratios, "h_c": h_c, "errors": dict(zip(KINDS, errors))}
    return out


def data(ctx):
    studies = order_study(d=ctx.pick(10, 100, 100), n_lr=ctx.pick(4, 8, 12),
                          h_ratio_max=ctx.pick(0.3, 0.15, 0.15), span=ctx.pick(3.0, 8.0, 16.0))
    orders = {}
    for key, s in studies.items():
        orders[key] = {"lrs": s.lrs, "nfev": s.nfev, "d": ctx.pick(10, 100, 100),
                       **{(k, st): s.error(k, st) for k, st in CURVES}}
    return {"orders": orders, "breakdown": breakdown_study(ctx.pick(6, 17, 33))}


def _fit(lrs, err):
    return np.polyfit(np.log(lrs), np.log(err), 1)[0]


def _room_for_legend(ax, values, share=0.8):
    """Extend the log y-range downwards by `share` of the data's decades: the legend sits there."""
    lo, hi = np.log10(np.nanmin(values)), np.log10(np.nanmax(values))
    ax.set_ylim(10 ** (lo - share * (hi - lo) - 0.2), 10 ** (hi + 0.2))


def plot(d, ctx):
    fig, axes = style.new_figure(ncols=3, nrows=2, height=4.6)
    no_minor_labels = matplotlib.ticker.NullFormatter()
    for row, problem in enumerate(("quadratic", "logistic")):
        for col, m in enumerate(METHODS):
            ax, res = axes[row, col], d["orders"][problem, m]
            for kind, start in CURVES:
                err = res[kind, start]
                ax.loglog(res["lrs"], err, marker="o", ms=2.5, color=KIND_COLOURS[kind],
                          ls="-" if start == "manifold" else "--",
                          label=f"{KIND_LABELS[kind]}{'' if start == 'manifold' else ', zero start'}: "
                                f"{_fit(res['lrs'], err):.2f}")
            _room_for_legend(ax, [res[c] for c in CURVES])
            name = f"quadratic, $d={res['d']}$" if problem == "quadratic" else "logistic regression"
            ax.set_title(f"{'HB' if m == 'hb' else 'NAG'}, {name}, $\\beta={BETA}$")
            ax.set_xlabel(r"learning rate $\alpha$")
            ax.set_ylabel(r"$\max_k \|x_k - x(k\alpha)\|$")
            ax.xaxis.set_minor_formatter(no_minor_labels)
            ax.legend(loc="lower right", frameon=False, fontsize=5.5, title="fitted order",
                      title_fontsize=5.5)
    for row, m in enumerate(METHODS):
        ax, res = axes[row, 2], d["breakdown"][m]
        for kind in KINDS:
            ax.loglog(res["ratio"], res["errors"][kind], marker="o", ms=2.5, color=KIND_COLOURS[kind],
                      label=KIND_LABELS[kind])
        ax.axvline(1.0, color=style.METHOD_COLOURS[m], ls=":", lw=0.8)
        ax.axvspan(1.0, res["ratio"][-1], color=style.METHOD_COLOURS[m], alpha=0.08, lw=0)
        crit = r"(1-\sqrt{\beta})^2" if m == "hb" else r"(\frac{1-\beta}{1+\beta})^2"
        ax.set_title(f"{'HB' if m == 'hb' else 'NAG'} breakdown, $h_c={crit}$")
        ax.set_xlabel(r"$h / h_c$,  $h = \alpha\lambda$")
        ax.set_ylabel(r"relative global error")
        ax.text(1.15, 0.04, "ripple", transform=ax.get_xaxis_transform(), fontsize=6,
                color=style.METHOD_COLOURS[m])
        ax.legend(loc="upper left", frameon=False, fontsize=5.5)
    return fig


FIGURE = Figure("modified_accuracy",
                "Global error of the modified-equation ODEs vs learning rate (orders 1, 2, 2; 1 from "
                "zero momentum) for HB and NAG, and their breakdown at critical damping.",
                data, plot, tags=("theory",))
