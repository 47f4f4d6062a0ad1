r"""Figure 8 — global vs per-layer gradient clipping (docs/theory.md §6), in one comparison: the
seed CNN on MNIST-1D with plain SGD at the large learning rate of figure 5, unclipped, with
global-norm clipping (one factor min(1, c/‖g‖) for all layers) and with per-layer clipping
(each layer's own min(1, c_l/‖g_l‖)), showing per layer the raw gradient norm, what clipping
multiplied it by, the DL4J update:parameter ratio log10(mean|Δθ|/mean|θ|) (healthy near −3,
above −2 unstable, below −4 too slow), and the training loss.

Runs: ``experiments/specs/clipping.toml``. The thresholds are chosen from the unclipped run
(see the spec): global c at about half its median global norm, per-layer c_l = c/√L (L = 7
layers), i.e. the same total budget split evenly. Measures (:func:`summarize`), per clip mode
and layer, over the steps after the first 10 %: median raw ‖g_l‖, median applied norm
‖g_l‖·(clip factor), mean clip factor, fraction of steps clipped, median update ratio; and
per mode the mean loss over the last 10 % of steps, final train loss and test accuracy.

``python -m paper_figures.clipping`` runs the quick setting and writes
``results/phenomena_clipping.{csv,json}``.
"""

import numpy as np
import pandas as pd

from paper_figures import style
from paper_figures._runs import load_runs, smooth, write_summary
from paper_figures.registry import Context, Figure

SPEC = "clipping"
# tiny: seconds, for the smoke test (a narrow CNN, no probes)
TINY = {"steps": 20, "probe_every": 0, "eval_every": 0, "model_args": {"channels": 4, "hidden": 16}}
FULL = {"steps": 8000, "probe_every": 500, "eval_every": 1000}
MODES = ("none", "global", "layer")
LABELS = {"none": "no clipping", "global": "global-norm clipping", "layer": "per-layer clipping"}
COLOURS = {"none": style.PALETTE[7], "global": style.PALETTE[0], "layer": style.PALETTE[3]}


def data(ctx):
    runs = load_runs(SPEC, ctx, ctx.pick(TINY, {}, FULL))
    keep = ["grad_norm", "clip_factor", "update_ratio", "loss"]
    return {config.clip: (config, trace[keep]) for config, trace in runs}


def summarize(data):
    rows, meta = [], {}
    for mode in MODES:
        config, trace = data[mode]
        n = trace.sizes["step"]
        settled = trace.isel(step=slice(n // 10, None))
        applied = settled.grad_norm * settled.clip_factor
        ratio = settled.update_ratio.where(np.isfinite(settled.update_ratio))
        for layer in trace.layer.values:
            rows.append({
                "clip": mode, "clip_value": config.clip_value if mode != "none" else np.nan, "layer": layer,
                "median_grad_norm": float(settled.grad_norm.sel(layer=layer).median()),
                "median_applied_norm": float(applied.sel(layer=layer).median()),
                "mean_clip_factor": float(settled.clip_factor.sel(layer=layer).mean()),
                "frac_clipped": float((settled.clip_factor.sel(layer=layer) < 1).mean()),
                "median_update_ratio": float(ratio.sel(layer=layer).median()),
            })
        summary = trace.attrs.get("summary", {})
        meta[mode] = {"config": config.to_dict(), "summary": summary,
                      "mean_loss_last_10pct": float(trace.loss.isel(step=slice(n - n // 10, None)).mean()),
                      "final_loss": summary.get("final_loss"), "test_accuracy": summary.get("test_accuracy")}
    return pd.DataFrame(rows), {"runs": meta}


def plot(data, ctx):
    fig, axes = style.new_figure(ncols=2, nrows=2, width=style.COLUMN_WIDTH * 1.5, height=4.0)
    (a_loss, a_norm), (a_factor, a_ratio) = axes
    table, _ = summarize(data)
    layers = list(data["none"][1].layer.values)
    x = range(len(layers))
    for mode in MODES:
        _, trace = data[mode]
        a_loss.plot(trace.step, smooth(trace.loss, max(1, trace.sizes["step"] // 30), "mean"),
                    color=COLOURS[mode], label=LABELS[mode])
        part = table[table["clip"] == mode].set_index("layer").loc[layers]
        kw = dict(color=COLOURS[mode], marker="o", ms=3, label=LABELS[mode])
        a_norm.plot(x, part.median_grad_norm, **kw)
        a_factor.plot(x, part.mean_clip_factor, **kw)
        a_ratio.plot(x, part.median_update_ratio, **kw)
    a_loss.set(xlabel="step $k$", ylabel="training loss (rolling mean)", title="loss")
    a_loss.legend()
    a_norm.set(yscale="log", ylabel=r"median raw $\|g_l\|_2$", title="gradient norm per layer")
    a_factor.set(yscale="log", ylabel=r"mean clip factor $\|g_l^{\rm clipped}\|/\|g_l\|$",
                 title="what clipping did per layer")
    a_ratio.axhspan(-4, -2, color="0.92", lw=0)
    a_ratio.axhline(-3, color="k", ls="--", lw=0.8)
    a_ratio.set(ylabel=r"median $\log_{10}(\overline{|\Delta\theta|}/\overline{|\theta|})$",
                title="DL4J update:parameter ratio")
    for ax in (a_norm, a_factor, a_ratio):
        ax.set_xticks(list(x), layers, rotation=45)
    return fig


FIGURE = Figure(
    name="clipping",
    summary="Global vs per-layer gradient clipping on the seed CNN (SGD, large lr): loss, "
            "per-layer gradient norms, clip factors and DL4J update:parameter ratios.",
    data=data,
    plot=plot,
    tags=("empirical",),
)


def main():
    import torch

    torch.set_num_threads(1)
    table, meta = summarize(data(Context(mode="quick")))
    meta["command"] = "python -m paper_figures.clipping"
    for path in write_summary("phenomena_clipping", table, meta):
        print(path)
    print(table.round(3).to_string())
    print({m: {k: v for k, v in d.items() if k not in ("config", "summary")} for m, d in meta["runs"].items()})


if __name__ == "__main__":
    main()
