r"""Figure 4 — the seed CNN: per-layer gradient 2-norms over training under a step-decayed
learning rate, without and with a golden-section line search on the step, and what each
layer's sharpness and :math:`h_l = \alpha\lambda_{\max,l}` do meanwhile (docs/theory.md §5).

Runs: ``experiments/specs/seed_norm_growth.toml`` (seed CNN, 5 conv + 2 FC, leaky ReLU,
dropout; MNIST-1D; heavy ball, batch 32, lr ×0.1 every ``step_every`` steps; probes on),
``line_search`` ∈ {false, true}.

Measures (:func:`summarize`), per layer l, with ‖g_l‖ the raw mini-batch gradient norm:

- growth = median ‖g_l‖ over the last 10 % of steps / median over steps [10 %, 20 %)
  (the first 10 % are the escape from the initialisation, where every norm rises);
- within each lr phase: median over its last quarter / median over its first quarter;
- spread = standard deviation of log10 ‖g_l‖ over steps ≥ 10 % (decades), and the
  coefficient of variation std/mean of ‖g_l‖, with and without the line search; split into
  the trend (range, in decades, of the rolling median of log10 ‖g_l‖ -- the curves drawn)
  and the step-to-step fluctuation (sd of log10 ‖g_l‖ around that rolling median);
- sharpness λ_max,l and h_l / edge, edge = 2(1+β) for HB (docs/theory.md §1), at the first
  probe past 10 % and at the last probe.

``python -m paper_figures.seed_cnn`` runs the quick setting and writes
``results/phenomena_norm_growth.{csv,json}``, and the same measures for the runs of
``seed_norm_growth_settings.toml`` (constant / cosine lr, plain SGD, a second seed) to
``results/phenomena_norm_growth_settings.{csv,json}``.
"""

import numpy as np
import pandas as pd

from dynamics.quadratic import stability_edge
from paper_figures import style
from paper_figures._runs import layer_colours, load_runs, smooth, write_summary
from paper_figures.registry import Context, Figure

SPEC = "seed_norm_growth"
# tiny: seconds, for the smoke test (a narrow CNN, two probes, a 2-evaluation line search)
TINY = {"steps": 24, "step_every": 8, "probe_every": 12, "eval_every": 0, "line_search_evals": 2,
        "model_args": {"channels": 4, "hidden": 16}}
FULL = {"steps": 12000, "step_every": 4000, "probe_every": 500, "eval_every": 1000}
LABELS = {False: "HB, lr decay", True: "HB, lr decay + line search"}


def data(ctx):
    runs = load_runs(SPEC, ctx, ctx.pick(TINY, {}, FULL))
    keep = ["grad_norm", "lr", "loss", "sharpness"]  # lr: applied (schedule × line-search multiplier)
    return {config.line_search: (config, trace[keep]) for config, trace in runs}


def _window(trace):
    return max(1, trace.sizes["step"] // 60)


def _after(trace, frac):
    return trace.isel(step=slice(int(frac * trace.sizes["step"]), None))


def growth_rows(config, trace):
    """The per-layer measures of one run (see the module docstring), one dict per layer."""
    n = trace.sizes["step"]
    g = trace.grad_norm
    early = g.isel(step=slice(n // 10, n // 5)).median("step")
    late = g.isel(step=slice(n - n // 10, None)).median("step")
    settled = _after(trace, 0.1).grad_norm
    log_norm = np.log10(settled)
    trend = smooth(log_norm, _window(trace))
    edge = stability_edge(config.opt, config.momentum)
    probes = trace.probe_step.values
    first_probe = probes[probes >= n // 10][0] if (probes >= n // 10).any() else probes[0]
    rows = []
    for layer in trace.layer.values:
        row = {"layer": layer,
               "median_early": float(early.sel(layer=layer)), "median_late": float(late.sel(layer=layer)),
               "growth_late_over_early": float(late.sel(layer=layer) / early.sel(layer=layer)),
               "sd_log10_grad_norm": float(np.log10(settled.sel(layer=layer)).std()),
               "cv_grad_norm": float(settled.sel(layer=layer).std() / settled.sel(layer=layer).mean()),
               "trend_range_decades": float(trend.sel(layer=layer).max() - trend.sel(layer=layer).min()),
               "fluct_sd_log10": float((log_norm - trend).sel(layer=layer).std())}
        for p, (a, b) in enumerate(_phases(config, n)):
            q = max(1, (b - a) // 4)
            phase = g.sel(layer=layer).isel(step=slice(a, b))
            row[f"phase{p}_rise"] = float(phase[-q:].median() / phase[:q].median())
        for tag, k in (("first", first_probe), ("last", probes[-1])):
            lam = float(trace.sharpness.sel(layer=layer, probe_step=k))
            row[f"sharpness_{tag}"] = lam
            row[f"h_over_edge_{tag}"] = float(trace.lr.sel(step=k)) * lam / edge
        rows.append(row)
    return rows


def summarize(runs):
    """Per-layer table (one row per layer and line-search setting) and the runs' facts."""
    rows = [{"line_search": line_search, **row}
            for line_search, (config, trace) in sorted(runs.items()) for row in growth_rows(config, trace)]
    meta = {LABELS[line_search]: {"config": config.to_dict(), "summary": trace.attrs.get("summary", {})}
            for line_search, (config, trace) in sorted(runs.items())}
    return pd.DataFrame(rows), {"runs": meta}


def _phases(config, n):
    """(start, end) step ranges of constant scheduled lr (the line search's multiplier aside)."""
    if config.schedule != "step" or not config.step_every:
        return [(0, n)]
    return [(a, min(a + config.step_every, n)) for a in range(0, n, config.step_every)]


def plot(data, ctx):
    fig, axes = style.new_figure(ncols=3, nrows=2, height=4.2)
    (a_plain, a_ls, a_spread), (a_sharp, a_h, a_lr) = axes
    config, plain = data[False]
    colours = layer_colours(plain.layer.values)
    drops = [a for a, _ in _phases(config, plain.sizes["step"])[1:]]
    for ax, line_search in ((a_plain, False), (a_ls, True)):
        _, trace = data[line_search]
        for layer, colour in colours.items():
            g = smooth(trace.grad_norm.sel(layer=layer), _window(trace))
            ax.plot(trace.step, g, color=colour, label=layer)
        ax.set_yscale("log")
        ax.vlines(drops, 0, 1, transform=ax.get_xaxis_transform(), colors="0.6", linestyles=":")
        ax.set(xlabel="step $k$", ylabel=r"$\|g_l\|_2$ (rolling median)", title=LABELS[line_search])
    a_ls.sharey(a_plain)
    a_plain.legend(ncols=2, loc="lower right")

    table, _ = summarize(data)
    layers = list(colours)
    for line_search, marker in ((False, "o"), (True, "s")):
        part = table[table.line_search == line_search].set_index("layer").loc[layers]
        colour = style.METHOD_COLOURS["hb"] if not line_search else style.PALETTE[1]
        a_spread.plot(range(len(layers)), part.trend_range_decades, marker=marker, ms=3, color=colour,
                      label=f"{LABELS[line_search]}: trend range")
        a_spread.plot(range(len(layers)), part.fluct_sd_log10, marker=marker, ms=3, color=colour, ls="--",
                      mfc="none", label="step-to-step sd")
    a_spread.set_xticks(range(len(layers)), layers, rotation=45)
    a_spread.set(ylabel=r"decades of $\|g_l\|$ (steps $\geq$ 10%)", title="variation of the norm")
    a_spread.set_ylim(0, 1.6 * table[["trend_range_decades", "fluct_sd_log10"]].to_numpy().max())
    a_spread.legend(fontsize=5.5, loc="upper right")

    edge = stability_edge(config.opt, config.momentum)
    probed = plain.isel(probe_step=slice(1, None))  # at step 0 (the initialisation) λ is near 0
    lr_at_probe = probed.lr.sel(step=probed.probe_step)
    for layer, colour in colours.items():
        lam = probed.sharpness.sel(layer=layer)
        a_sharp.plot(probed.probe_step, lam, color=colour, marker=".", ms=3)
        a_h.plot(probed.probe_step, lr_at_probe * lam / edge, color=colour, marker=".", ms=3)
    a_sharp.set(yscale="log", xlabel="step $k$", ylabel=r"sharpness $\lambda_{\max,l}$",
                title=f"per-layer sharpness ({LABELS[False]})")
    a_h.axhline(1.0, color="k", ls="--", lw=0.8)
    a_h.set(yscale="log", xlabel="step $k$", ylabel=r"$h_l / 2(1+\beta)$, $h_l = \alpha\lambda_{\max,l}$",
            title="distance to the HB stability edge")
    for line_search, colour in ((False, style.METHOD_COLOURS["hb"]), (True, style.PALETTE[1])):
        _, trace = data[line_search]
        a_lr.plot(trace.step, smooth(trace.lr, _window(trace)), color=colour, label=LABELS[line_search])
    a_lr.set(yscale="log", xlabel="step $k$", ylabel=r"applied lr $\alpha_k$ (rolling median)",
             title="step size: schedule vs line search")
    a_lr.legend(loc="lower left")
    return fig


FIGURE = Figure(
    name="seed_cnn",
    summary="The seed CNN on MNIST-1D (HB, batch 32, step lr decay): per-layer gradient 2-norms "
            "over training without and with a golden-section line search, with per-layer "
            "sharpness and h_l = lr·λ_max,l against the HB stability edge.",
    data=data,
    plot=plot,
    tags=("empirical",),
)


def settings_table(ctx):
    """Growth per layer across the settings of ``seed_norm_growth_settings.toml``, and each
    run's summary."""
    runs = load_runs(SPEC + "_settings", ctx)
    rows = [{"opt": c.opt, "lr": c.lr, "momentum": c.momentum, "schedule": c.schedule, "seed": c.seed,
             "line_search": c.line_search, **row}
            for c, trace in runs for row in growth_rows(c, trace)]
    label = lambda c: f"{c.opt} lr={c.lr:g} {c.schedule} seed={c.seed}" + (" line search" if c.line_search else "")  # noqa: E731
    meta = {label(c): {"config": c.to_dict(), "summary": t.attrs.get("summary", {})} for c, t in runs}
    return pd.DataFrame(rows), meta


def main():
    """Quick-mode runs (computed if missing) → results/phenomena_norm_growth{,_settings}.*"""
    import torch

    torch.set_num_threads(1)
    ctx = Context(mode="quick")
    table, meta = summarize(data(ctx))
    meta["command"] = "python -m paper_figures.seed_cnn"
    meta["spec"] = f"experiments/specs/{SPEC}.toml"
    for path in write_summary("phenomena_norm_growth", table, meta):
        print(path)
    print(table.round(3).to_string())
    settings, runs = settings_table(ctx)
    meta = {"command": "python -m paper_figures.seed_cnn", "spec": f"experiments/specs/{SPEC}_settings.toml",
            "runs": runs}
    for path in write_summary("phenomena_norm_growth_settings", settings, meta):
        print(path)
    print(settings[["opt", "schedule", "seed", "line_search", "layer", "growth_late_over_early", "phase1_rise", "phase2_rise",
                    "sharpness_first", "sharpness_last", "h_over_edge_first", "h_over_edge_last"]]
          .round(3).to_string())


if __name__ == "__main__":
    main()
