r"""Figure 7 — per-layer sharpness against the edge of stability over training.

For the seed-CNN link sweep (``experiments/specs/link_seed_cnn_probe.toml``, shared with figure 6),
at its middle learning rate: one panel per (method, momentum), with each layer's block
sharpness :math:`\lambda_{\max,l}` (top eigenvalue of the layer's diagonal Hessian block),
the network's sharpness :math:`\lambda_{\max}` (dashed, black) and the edge of stability
:math:`2(1+\beta)/\alpha_k` (HB) or :math:`2(1+\beta)/((1+2\beta)\alpha_k)` (NAG) at the lr
in force (docs/theory.md §2, §5; Cohen et al. 2021), which jumps up where the lr is decayed.
Log scale.
"""

import numpy as np

from dynamics.quadratic import stability_edge
from experiments import store
from paper_figures import style
from paper_figures._runs import layer_colours
from paper_figures.link_scores import run_dirs
from paper_figures.registry import Figure

KEEP = ["sharpness", "sharpness_global", "lr"]


def data(ctx):
    """[(config dict, trace with the probe quantities)] for the middle lr of the sweep."""
    runs = []
    for d in run_dirs(ctx):
        trace = store.load_run(d)
        runs.append((trace.attrs["config"], trace[KEEP]))
    lrs = sorted({c["lr"] for c, _ in runs})
    middle = lrs[len(lrs) // 2]
    chosen = [(c, t) for c, t in runs if c["lr"] == middle]
    return sorted(chosen, key=lambda run: (run[0]["opt"], run[0]["momentum"]))


def edge_sharpness(method, momentum, lr):
    """The sharpness at which lr·λ reaches the method's stability edge: edge(β)/lr."""
    return stability_edge(method, momentum) / np.asarray(lr, dtype=float)


def plot(data, ctx):
    n = len(data)
    ncols = min(n, 2)
    nrows = -(-n // ncols)
    fig, axes = style.new_figure(ncols=ncols, nrows=nrows, height=2.1 * nrows, squeeze=False, sharey=True)
    for ax, (config, trace) in zip(axes.ravel(), data):
        colours = layer_colours(trace.layer.values)
        probe = trace.probe_step.values
        for layer, colour in colours.items():
            ax.plot(probe, trace.sharpness.sel(layer=layer), color=colour, marker=".", ms=2, label=layer)
        ax.plot(probe, trace.sharpness_global, color="k", ls="--", label="network")
        method, beta = config["opt"], config["momentum"]
        ax.plot(trace.step, edge_sharpness(method, beta, trace.lr), color="k", lw=1.4, label="edge")
        ax.set(yscale="log", xlabel="step $k$", ylabel=r"sharpness $\lambda_{\max}$",
               title=f"{method.upper()}, $\\alpha_0$ = {config['lr']:g}, $\\beta$ = {beta:g}")
    for ax in axes.ravel()[n:]:
        ax.set_axis_off()
    axes.ravel()[0].legend(ncols=3, fontsize=5.5, loc="lower right")
    return fig


FIGURE = Figure(
    name="sharpness_eos",
    summary="Per-layer and network sharpness over training against the edge of stability "
            "2(1+β)/α (HB) and 2(1+β)/((1+2β)α) (NAG), seed CNN on MNIST-1D.",
    data=data,
    plot=plot,
    tags=("empirical",),
)
