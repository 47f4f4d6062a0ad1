r"""Figure ``phase_diagram``: the (h, β) phase diagram of heavy ball and Nesterov on a
quadratic (docs/theory.md §2).

Heatmap: the spectral radius ρ (asymptotic rate per step; cividis, colour-blind safe),
grey where ρ ≥ 1. Lines: the ripple band, where the roots are complex and ρ = √(c₀)
(HB: h = (1∓√β)²; NAG: h = ((1−β)/(1+β))² and h = 1, from its discriminant
(1−h)[(1+β)²(1−h) − 4β]), and the stability edge (HB 2(1+β), NAG 2(1+β)/(1+2β)).
Labels name the regimes of :func:`dynamics.quadratic.regime`.
"""

import numpy as np

from dynamics.quadratic import REGIMES, ripple_band, spectral_radius, stability_edge
from paper_figures import style
from paper_figures.registry import Figure

METHODS = ("hb", "nag")
H_MAX = {"hb": 4.1, "nag": 2.1}
BETA_MAX = 0.99


def data(ctx):
    n_h, n_b = ctx.pick((60, 40), (600, 400), (1600, 1000))
    beta = np.linspace(0.0, BETA_MAX, n_b)
    beta_line = np.linspace(0.0, BETA_MAX, 400)
    out = {}
    for m in METHODS:
        h = np.linspace(0.0, H_MAX[m], n_h)
        rho, code = spectral_radius(m, h[None, :], beta[:, None], return_regime=True)
        lo, hi = ripple_band(m, beta_line)
        # where to print each regime's name: the median (h, β) of its points, and ρ there
        hh, bb = np.broadcast_arrays(h[None, :], beta[:, None])
        labels = {}
        for c in np.unique(code):
            x, y = float(np.median(hh[code == c])), float(np.median(bb[code == c]))
            if x < 0.1 * h[-1]:  # a thin region along h = 0 (HB monotone): go where it is widest
                y = float(np.quantile(bb[code == c], 0.2))
            labels[REGIMES[c]] = (x, y, float(spectral_radius(m, x, y)))
        out[m] = {"h": h, "beta": beta, "rho": rho, "beta_line": beta_line, "lo": lo, "hi": hi,
                  "edge": stability_edge(m, beta_line), "labels": labels}
    return out


def plot(d, ctx):
    fig, axes = style.new_figure(ncols=2, width=style.PAGE_WIDTH, height=2.6, sharey=True)
    cmap = style.plt.get_cmap("cividis").with_extremes(bad="0.85")  # masked: rho >= 1
    for ax, m in zip(axes, METHODS):
        p = d[m]
        rho = np.ma.masked_where(p["rho"] >= 1.0, p["rho"])
        mesh = ax.pcolormesh(p["h"], p["beta"], rho, cmap=cmap, vmin=0.0, vmax=1.0,
                             shading="nearest", rasterized=True)
        ax.plot(p["lo"], p["beta_line"], color="white", ls="--", lw=0.9, label="ripple band")
        ax.plot(p["hi"], p["beta_line"], color="white", ls="--", lw=0.9)
        ax.plot(p["edge"], p["beta_line"], color="black", lw=1.2, label="stability edge")
        for name, (x, y, r) in p["labels"].items():
            near_axis = x < 0.1 * p["h"][-1]  # a thin region along h = 0: start the text there
            ax.text(0.02 * p["h"][-1] if near_axis else x, y, name, fontsize=6.5, va="center",
                    ha="left" if near_axis else "center", color="black" if r > 0.55 else "white")
        ax.set(xlim=(0, p["h"][-1]), ylim=(0, BETA_MAX), xlabel=r"$h = \alpha\lambda$",
               title=f"{'heavy ball' if m == 'hb' else 'Nesterov'}: spectral radius $\\rho$")
    axes[0].set_ylabel(r"momentum $\beta$")
    axes[1].legend(loc="upper right", facecolor="0.45", labelcolor="white", framealpha=0.9)
    fig.colorbar(mesh, ax=axes, label=r"$\rho$ (grey: $\rho \geq 1$)", shrink=0.9)
    return fig


FIGURE = Figure(
    name="phase_diagram",
    summary="Phase diagram of heavy ball and Nesterov over (h, momentum): spectral radius, "
            "monotone / ripple / flip regimes and the stability edge.",
    data=data,
    plot=plot,
    tags=("theory",),
)
