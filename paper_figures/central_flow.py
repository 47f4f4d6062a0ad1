r"""Figure ``central_flow``: discrete GD / HB / NAG at the edge of stability beside their central
flow and the plain gradient flow (docs/theory_central_flow.md, dynamics.central_flow).

One row per method (GD; HB and NAG at β = 0.5, PyTorch's convention), five panels:

1. train loss: the discrete run (thin: every step; thick: a centred window mean, which
   averages the period-2 oscillation and its self-stabilisation bursts), the central flow's
   time-averaged loss :math:`L(\bar w) + \tfrac12 S^*\sigma^2`, the gradient flow's
   :math:`L(w(t))` (the first-order modified flow, dynamics.modified, = the stable flow);
2. sharpness :math:`\lambda_{max}` at the period-2-averaged iterate, the central flow's and the
   gradient flow's, against the method's edge :math:`S^*` (2/η, 2(1+β)/η, 2(1+β)/((1+2β)η));
3. the squared gradient norm (window mean; central flow :math:`\|\bar g\|^2 + S^{*2}\sigma^2`;
   gradient flow :math:`\|\nabla L\|^2`): it rises at the edge while the loss keeps falling;
4. σ²: the central flow's oscillation variance against the window mean of the discrete
   iterate's squared period-2 part along the top eigenvector at the averaged iterate;
5. per-block (per-layer) lag-1 correlation of successive gradients,
   :math:`\sum g_t\cdot g_{t-1}/\sqrt{\sum|g_t|^2\sum|g_{t-1}|^2}` over the window, against the
   central flow's, from window sums of its persistent and sign-flipping parts.

Tiny and quick mode: the toy loss :func:`dynamics.central_flow.sharpening_toy` with its sharp
curvature scaled to the method's edge (scale = S*/2, as tests/test_central_flow.py) at lr 0.02
(tiny) or 0.005 (quick); the discrete runs are :func:`dynamics.central_flow.discrete_run`
(jitter 1e-6 per step). Full mode: the real network of analyses/central_flow.py (MLP 8-8
tanh on 256 ``linreg`` examples, full batch, through the training loop; its ``STEPS`` steps, every
method's edge at its ``EDGE``), through its :func:`analyses.central_flow.one_run`; its series are
sampled at the probes (every 10 steps; σ² from the iterates' period-2 part along the flow's u).
"""

import numpy as np
from matplotlib.lines import Line2D

from dynamics import central_flow as cf
from dynamics import modified as md
from paper_figures import style
from paper_figures.registry import Figure

RUNS = (("gd", 0.0), ("hb", 0.5), ("nag", 0.5))
TOY_HORIZON = 30.0  # t = k·lr for GD; momentum moves 1/(1-β) faster, so (1-β)·30 for HB/NAG
BLOCK_COLOURS = (style.PALETTE[5], style.PALETTE[4], style.PALETTE[7])  # apart from the flows' colours


def window_mean(x, width):
    """Centred mean over ``width`` samples along axis 0 (NaN where the window leaves the series
    or holds a NaN)."""
    x = np.asarray(x, float)
    out = np.full_like(x, np.nan)
    if width < 1 or x.shape[0] < width:
        return out
    c = np.cumsum(np.concatenate([np.zeros((1,) + x.shape[1:]), x]), axis=0)
    lo = width // 2
    out[lo:lo + x.shape[0] - width + 1] = (c[width:] - c[:-width]) / width
    return out


def _toy_run(method, beta, lr, width):
    """Discrete run, central flow and gradient flow on sharpening_toy(scale=S*/2), as series
    over the steps."""
    edge = float(cf.edge_sharpness(method, lr, beta))
    loss = cf.sharpening_toy(scale=edge / 2)
    horizon = TOY_HORIZON * (1 - beta)
    flow = cf.solve_central_flow(loss, loss.w0, method, lr, beta, horizon)
    pred = cf.predict(loss, flow, loss.blocks)
    gf = md.solve_flow("first_order", loss, loss.w0, method, lr, beta, horizon).x
    xs = cf.discrete_run(loss, loss.w0, method, lr, beta, flow.t.size - 1)
    mean, osc = cf.period_two_split(xs)
    mean[0], mean[-1], osc[0], osc[-1] = xs[0], xs[-1], 0.0, 0.0
    top = [loss.top_eigs(w, 1) for w in mean]
    sharp = np.array([v[0] for v, _ in top])
    osc_u = np.einsum("ni,ni->n", osc, np.stack([u[:, 0] for _, u in top]))
    grads = loss.grad(xs)
    blocks = loss.blocks
    num = np.stack([(grads[1:, b] * grads[:-1, b]).sum(1) for b in blocks], 1)
    sq = np.stack([(grads[:, b] ** 2).sum(1) for b in blocks], 1)
    lag = np.vstack([np.full((1, len(blocks)), np.nan), window_mean(num, width) / np.sqrt(
        window_mean(sq[1:], width) * window_mean(sq[:-1], width))])
    lag_cf = cf.lag1_correlation(window_mean(pred.block_mean_sq, width), window_mean(pred.block_osc_sq, width))
    return {
        "step": np.arange(flow.t.size), "edge": edge, "lr": lr, "momentum": beta,
        "events": [t / lr for t, _, _ in flow.events], "blocks": [f"block {i}" for i in range(len(blocks))],
        "active": flow.active,
        "loss_raw": loss.value(xs), "loss": window_mean(loss.value(xs), width), "loss_cf": pred.loss,
        "loss_gf": loss.value(gf),
        "sharp": sharp, "sharp_cf": pred.sharpness, "sharp_gf": np.array([loss.top_eigs(w, 1)[0][0] for w in gf]),
        "gsq": window_mean((grads**2).sum(1), width), "gsq_cf": pred.grad_sq, "gsq_gf": (loss.grad(gf) ** 2).sum(1),
        "sigma2": window_mean(osc_u**2, width), "sigma2_cf": pred.sigma2, "lag": lag, "lag_cf": lag_cf,
    }


def _network_run(method, beta, steps):
    """analyses/central_flow.py's run on the real network, in this figure's series."""
    from analyses import central_flow as acf  # torch: imported only in full mode

    r = acf.one_run(method, beta, steps or acf.STEPS)
    s = {k: np.asarray(v, float) for k, v in r["series"].items()}
    nan = np.full(s["step"].size, np.nan)
    return {
        "step": s["step"], "edge": r["edge"], "lr": r["lr"], "momentum": beta, "events": r["events_step"],
        "blocks": [f"layer {i}" for i in range(s["lag1_measured"].shape[1])],
        "active": (s["sigma2"] > 0).astype(int),
        "loss_raw": nan, "loss": s["loss_measured"], "loss_cf": s["loss_flow"], "loss_gf": s["loss_gradient_flow"],
        "sharp": s["sharpness_measured"], "sharp_cf": s["sharpness_flow"], "sharp_gf": nan,
        "gsq": s["grad_sq_measured"], "gsq_cf": s["grad_sq_flow"], "gsq_gf": s.get("grad_sq_gradient_flow", nan),
        "sigma2": s.get("sigma2_measured", nan), "sigma2_cf": s["sigma2"], "lag": s["lag1_measured"],
        "lag_cf": s["lag1_flow"],
    }


def phase_ratio(r, key):
    """Mean of the discrete series over the central flow's edge phase, over the flow's mean there
    (NaN if the run never reaches the edge or the series was not measured)."""
    ph = (np.asarray(r["active"]) > 0) & np.isfinite(r[key])
    return float(np.mean(r[key][ph]) / np.mean(r[key + "_cf"][ph])) if ph.any() else np.nan


def data(ctx):
    if ctx.mode == "full":
        return {"setting": "MLP 8-8 tanh, linreg n=256, MSE, full batch",
                "runs": {m: _network_run(m, b, None) for m, b in RUNS}}
    lr = ctx.pick(0.02, 0.005, None)
    width = ctx.pick(40, 100, None)
    return {"setting": f"sharpening toy, lr {lr:g}, window {width} steps",
            "runs": {m: _toy_run(m, b, lr, width) for m, b in RUNS}}


def _with_flows(ax, k, r, key, colour):
    """The run's series ``key`` beside the central flow's (``key_cf``, dashed) and the gradient
    flow's (``key_gf``, dotted)."""
    ax.plot(k, r[key], color=colour)
    ax.plot(k, r[f"{key}_cf"], color=style.PALETTE[1], ls="--")
    ax.plot(k, r[f"{key}_gf"], color=style.PALETTE[2], ls=":")


def plot(d, ctx):
    fig, axes = style.new_figure(ncols=5, nrows=len(RUNS), height=5.4)
    for row, (m, b) in zip(axes, RUNS):
        r = d["runs"][m]
        k, col = r["step"], style.METHOD_COLOURS[m]
        name = "GD" if m == "gd" else f"{m.upper()} β={b:g}"
        ax_l, ax_s, ax_g, ax_v, ax_c = row
        ax_l.plot(k, r["loss_raw"], color=col, lw=0.3, alpha=0.35)
        _with_flows(ax_l, k, r, "loss", col)
        ax_l.set(ylabel=f"{name}\ntrain loss", yscale="log")
        _with_flows(ax_s, k, r, "sharp", col)
        ax_s.axhline(r["edge"], color="0.4", lw=0.7, ls="-.")
        ax_s.annotate(f"$S^*$={r['edge']:.4g}", (0.97, 0.03), xycoords="axes fraction", ha="right", fontsize=6)
        ax_s.set(ylabel=r"$\lambda_{max}$")
        _with_flows(ax_g, k, r, "gsq", col)
        ax_g.set(ylabel=r"$\|\nabla L\|^2$", yscale="log")
        ax_v.plot(k, r["sigma2"], color=col)
        ax_v.plot(k, r["sigma2_cf"], color=style.PALETTE[1], ls="--")
        ax_v.set(ylabel=r"$\sigma^2$")
        for j, blk in enumerate(r["blocks"]):
            ax_c.plot(k, r["lag"][:, j], color=BLOCK_COLOURS[j % len(BLOCK_COLOURS)])
            ax_c.plot(k, r["lag_cf"][:, j], color=BLOCK_COLOURS[j % len(BLOCK_COLOURS)], ls="--", lw=0.8)
        ax_c.set(ylabel="lag-1 corr. (--: flow)", ylim=(-1.05, 1.05))
        # the discrete run's edge-phase mean over the central flow's (where there is space)
        for ax, key, (x, y, ha, va) in ((ax_l, "loss", (0.03, 0.03, "left", "bottom")),
                                        (ax_s, "sharp", (0.97, 0.14, "right", "bottom")),
                                        (ax_g, "gsq", (0.03, 0.03, "left", "bottom")),
                                        (ax_v, "sigma2", (0.97, 0.97, "right", "top"))):
            ratio = phase_ratio(r, key)
            if np.isfinite(ratio):
                ax.annotate(f"edge phase ×{ratio:.3f}", (x, y), xycoords="axes fraction", ha=ha, va=va,
                            fontsize=5.5)
        for ax in row:
            for e in r["events"]:
                ax.axvline(e, color="0.75", lw=0.5)
    titles = ("train loss", "sharpness vs edge", "squared gradient norm", "oscillation variance",
              "lag-1 correlation")
    for ax, title in zip(axes[0], titles):
        ax.set_title(title)
    for ax in axes[-1]:
        ax.set_xlabel("step $k$")
    # one legend row under the figure: the curve kinds (colour of the discrete run: its row)
    kinds = [Line2D([], [], color="0.3", label="discrete (window mean)"),
             Line2D([], [], color=style.PALETTE[1], ls="--", label="central flow"),
             Line2D([], [], color=style.PALETTE[2], ls=":", label="gradient flow"),
             Line2D([], [], color="0.4", lw=0.7, ls="-.", label="edge $S^*$ of the method")]
    kinds += [Line2D([], [], color=BLOCK_COLOURS[j % len(BLOCK_COLOURS)], label=blk)
              for j, blk in enumerate(d["runs"][RUNS[0][0]]["blocks"])]
    fig.legend(handles=kinds, loc="outside lower center", ncols=4, frameon=False)
    fig.suptitle(d["setting"], fontsize=7)
    return fig


FIGURE = Figure(
    name="central_flow",
    summary="Central flows at the edge of stability: discrete GD/HB/NAG vs the central flow and "
            "the gradient flow — loss, sharpness held at each method's edge, squared gradient "
            "norm rising while the loss falls, σ² vs the measured oscillation, per-block lag-1 "
            "gradient correlation.",
    data=data,
    plot=plot,
    tags=("theory",),
)
