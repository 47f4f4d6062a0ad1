r"""Figure 5 — gradient oscillation per layer (Morchdi et al. 2023, docs/theory.md §5): the
successive-gradient cosine :math:`\cos(g_l(k), g_l(k-1))` of every layer over training, with
a large and a small learning rate, on two architectures (the seed CNN and a 5-layer MLP)
trained on MNIST-1D with plain SGD (``gd``), batch 32, constant lr.

Runs: ``experiments/specs/oscillation.toml`` (one ``[[runs]]`` entry per architecture and
lr). Measures (:func:`summarize`), per run and layer: the mean of ``grad_cos`` over the
steps after the first 10 % and over the last quarter (oscillation sets in at different
stages of training, Morchdi et al.'s finding (i)), the fraction of those steps with a
negative cosine, and the median over the probes of :math:`h_l = \alpha\lambda_{\max,l}`
(for plain SGD on a noisy quadratic the lag-1 gradient correlation of a mode is −h/2, so
h_l says how much oscillation the layer's top mode alone would give).

``python -m paper_figures.oscillation [SPEC]`` runs the quick setting and writes
``results/phenomena_oscillation.{csv,json}`` (``oscillation_seed1``: the same with seed 1).
"""

import numpy as np
import pandas as pd

from paper_figures import style
from paper_figures._runs import layer_colours, load_runs, smooth, write_summary
from paper_figures.registry import Context, Figure

SPEC = "oscillation"
# tiny: seconds, for the smoke test (the seed CNN narrowed; the MLP keeps its entry's widths)
TINY = {"steps": 20, "probe_every": 20, "eval_every": 0, "model_args": {"channels": 4, "hidden": 16}}
FULL = {"steps": 8000, "probe_every": 500, "eval_every": 1000}
MODEL_LABELS = {"seed-cnn": "seed CNN", "mlp": "MLP", "resnet": "ResNet"}


def data(ctx, spec=SPEC):
    runs = load_runs(spec, ctx, ctx.pick(TINY, {}, FULL))
    keep = ["grad_cos", "lr", "loss", "sharpness"]
    out = {}
    for config, trace in runs:
        out.setdefault(config.model, []).append((config, trace[keep]))
    for model in out:  # large lr first
        out[model].sort(key=lambda run: -run[0].lr)
    return out


def _settled(trace):
    return trace.isel(step=slice(max(1, trace.sizes["step"] // 10), None))


def summarize(data):
    """One row per (model, lr, layer); depth = layer index / (number of layers − 1)."""
    rows, meta = [], {}
    for model, runs in data.items():
        for size, (config, trace) in zip(("large", "small"), runs):
            cos = _settled(trace).grad_cos
            last = trace.grad_cos.isel(step=slice(trace.sizes["step"] * 3 // 4, None))
            h = (trace.lr.sel(step=trace.probe_step) * trace.sharpness).isel(probe_step=slice(1, None))
            layers = list(trace.layer.values)
            for i, layer in enumerate(layers):
                rows.append({
                    "model": model, "lr_size": size, "lr": config.lr, "layer": layer,
                    "depth": i / max(1, len(layers) - 1),
                    "mean_grad_cos": float(cos.sel(layer=layer).mean()),
                    "mean_grad_cos_last_quarter": float(last.sel(layer=layer).mean()),
                    "frac_negative": float((cos.sel(layer=layer) < 0).mean()),
                    "median_h": float(h.sel(layer=layer).median()) if h.sizes["probe_step"] else np.nan,
                })
            meta[f"{model} lr={config.lr:g}"] = {"config": config.to_dict(),
                                                  "summary": trace.attrs.get("summary", {})}
    table = pd.DataFrame(rows)
    checks = {}
    for model, part in table.groupby("model", sort=False):
        large, small = part[part.lr_size == "large"], part[part.lr_size == "small"]
        checks[model] = {
            "large_lr_max_mean_cos": float(large.mean_grad_cos.max()),
            "large_lr_max_mean_cos_last_quarter": float(large.mean_grad_cos_last_quarter.max()),
            "small_lr_input_minus_output_mean_cos": float(small.mean_grad_cos.iloc[0] - small.mean_grad_cos.iloc[-1]),
            "small_lr_input_minus_output_last_quarter": float(small.mean_grad_cos_last_quarter.iloc[0]
                                                              - small.mean_grad_cos_last_quarter.iloc[-1]),
            "small_lr_spearman_depth_vs_cos_last_quarter": float(
                small[["depth", "mean_grad_cos_last_quarter"]].corr("spearman").iloc[0, 1]),
        }
    return table, {"runs": meta, "checks": checks}


def plot(data, ctx):
    models = list(data)
    fig, axes = style.new_figure(ncols=3, nrows=len(models), height=2.1 * len(models))
    axes = np.atleast_2d(axes)
    table, _ = summarize(data)
    for row, model in zip(axes, models):
        runs = data[model]
        colours = layer_colours(runs[0][1].layer.values)
        for ax, (config, trace) in zip(row[:2], runs):
            window = max(1, trace.sizes["step"] // 20)
            for layer, colour in colours.items():
                ax.plot(trace.step, smooth(trace.grad_cos.sel(layer=layer), window, "mean"), color=colour, label=layer)
            ax.axhline(0.0, color="k", lw=0.6)
            ax.set(xlabel="step $k$", ylabel=r"$\cos(g_l(k), g_l(k-1))$",
                   title=f"{MODEL_LABELS.get(model, model)}, SGD, $\\alpha$ = {config.lr:g}", ylim=(-1, 1))
        row[0].legend(ncols=4, fontsize=5.5, loc="upper right", handlelength=1.0, columnspacing=0.8)
        ax = row[2]
        part = table[table.model == model]
        for (size, lr), colour, marker in zip(part.groupby(["lr_size", "lr"], sort=False).groups,
                                              (style.PALETTE[3], style.PALETTE[0]), ("o", "s")):
            sel = part[(part.lr_size == size) & (part.lr == lr)]
            ax.plot(range(len(sel)), sel.mean_grad_cos, marker=marker, ms=3, color=colour, label=f"$\\alpha$ = {lr:g}, steps $\\geq$ 10%")
            ax.plot(range(len(sel)), sel.mean_grad_cos_last_quarter, marker=marker, ms=3, color=colour, ls="--",
                    mfc="none", label=f"$\\alpha$ = {lr:g}, last 25%")
        ax.axhline(0.0, color="k", lw=0.6)
        layers = list(colours)
        ax.set_xticks(range(len(layers)), layers, rotation=45)
        ax.set(ylabel="mean cosine", title="per layer, input → output", ylim=(-1, 1))
        ax.legend()
    return fig


FIGURE = Figure(
    name="oscillation",
    summary="Gradient oscillation per layer: successive-gradient cosine over training with a "
            "large and a small learning rate (SGD), for the seed CNN and an MLP on MNIST-1D, "
            "and its per-layer mean from input to output.",
    data=data,
    plot=plot,
    tags=("empirical",),
)


def main(argv=None):
    """``python -m paper_figures.oscillation [SPEC]``: quick-mode runs of SPEC (default the
    figure's) → results/phenomena_oscillation[_SPEC-suffix].{csv,json}."""
    import sys

    import torch

    torch.set_num_threads(1)
    spec = (sys.argv[1:] if argv is None else argv) or [SPEC]
    spec = spec[0]
    table, meta = summarize(data(Context(mode="quick"), spec))
    meta["command"] = "python -m paper_figures.oscillation" + ("" if spec == SPEC else f" {spec}")
    meta["spec"] = f"experiments/specs/{spec}.toml"
    for path in write_summary("phenomena_" + spec, table, meta):
        print(path)
    print(table.round(3).to_string())
    print(meta["checks"])


if __name__ == "__main__":
    main()
