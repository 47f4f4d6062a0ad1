"""One figure per run: the per-layer dashboard of a trace (``optdyn plot RUN``).

Six panels against the step: per-layer gradient norm (log scale); successive-gradient cosine
(rolling mean over ``smooth`` steps); update:parameter ratio log10(mean|Δθ|/mean|θ|) with
DL4J's bands (−2: too large, unstable; −3: healthy; −4: too slow); at the probes h/edge =
lr·sharpness over the method's stability edge (docs/theory.md §2, §5; the line at 1 is the
edge; raw sharpness when the optimizer is not SGD-type); the lr; the loss.

Many layers. At most ``max_layers`` layers get a colour and a legend entry: the ones named in
``layers`` (exact names, or shell patterns such as ``"features.*"``), else ``max_layers``
picked evenly over depth (first and last included). Every layer, shown or not, is inside the
grey band: the minimum-to-maximum envelope over all layers. So 5 and 50 layers read alike.

Deterministic: the same trace gives the same bytes (no dates in the PDF, a fixed PNG
``Software`` entry, Agg rendering).
"""

import fnmatch
import io
import warnings
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from experiments import store
from experiments.viewers.export import h_edge

PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
DL4J_BANDS = {-2.0: "−2 unstable", -3.0: "−3 healthy", -4.0: "−4 too slow"}
PANELS = ("grad_norm", "grad_cos", "update_ratio", "h_edge", "lr", "loss")


def select_layers(names, layers=None, max_layers=8):
    """The layers that get a colour: matches of ``layers`` (names or fnmatch patterns, in
    trace order), else ``max_layers`` spread evenly over depth."""
    names = [str(n) for n in names]
    if not (isinstance(max_layers, int) and 1 <= max_layers <= len(PALETTE)):
        raise ValueError(f"max_layers={max_layers!r} is outside the valid range: integers 1..{len(PALETTE)}")
    if layers:
        picked = [n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in layers)]
        if not picked:
            raise ValueError(f"layers={list(layers)!r} match no layer; valid: {names}")
        if len(picked) > max_layers:
            raise ValueError(f"layers={list(layers)!r} match {len(picked)} layers; valid: at most "
                             f"max_layers={max_layers}")
        return picked
    if len(names) <= max_layers:
        return names
    return [names[i] for i in np.unique(np.linspace(0, len(names) - 1, max_layers).round().astype(int))]


def _per_layer(ax, x, values, names, shown, label_band):
    """Envelope of all layers (grey) and a line per shown layer. ``values`` (len(x), layers)."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows (cosine at step 0)
        finite = np.where(np.isfinite(values), values, np.nan)
        lo, hi = np.nanmin(finite, axis=1), np.nanmax(finite, axis=1)
    if len(names) > len(shown):
        ax.fill_between(x, lo, hi, color="0.85", lw=0, label=label_band)
    for k, name in enumerate(shown):
        ax.plot(x, finite[:, names.index(name)], color=PALETTE[k], lw=0.9, label=name,
                marker="o" if len(x) < 30 else None, ms=2.5)


def dashboard(trace, *, layers=None, max_layers=8, smooth=10, title=None):
    """The dashboard figure of a trace (module docstring); returns (figure, {panel: axes})."""
    if not (isinstance(smooth, int) and smooth >= 1):
        raise ValueError(f"smooth={smooth!r} is outside the valid range: integers >= 1")
    names = [str(n) for n in trace.layer.values]
    shown = select_layers(names, layers, max_layers)
    band = f"all {len(names)} layers (range)"
    steps = trace.step.values
    with matplotlib.rc_context({"font.size": 7, "axes.titlesize": 8, "legend.fontsize": 6,
                                "axes.spines.top": False, "axes.spines.right": False}):
        fig, grid = plt.subplots(3, 2, figsize=(7.2, 7.0), sharex=True, layout="constrained")
        ax = dict(zip(PANELS, grid.ravel()))
        _per_layer(ax["grad_norm"], steps, trace.grad_norm.values, names, shown, band)
        ax["grad_norm"].set(yscale="log", title="gradient norm ‖g_l‖")
        cos = trace.grad_cos.rolling(step=smooth, min_periods=1).mean().values
        _per_layer(ax["grad_cos"], steps, cos, names, shown, band)
        ax["grad_cos"].axhline(0, color="0.5", lw=0.5)
        ax["grad_cos"].set(ylim=(-1.05, 1.05), title=f"successive-gradient cosine (mean of {smooth})")
        _per_layer(ax["update_ratio"], steps, trace.update_ratio.values, names, shown, band)
        for level, text in DL4J_BANDS.items():
            ax["update_ratio"].axhline(level, color="0.4", lw=0.6, ls="--")
            ax["update_ratio"].annotate(text, (1, level), xycoords=("axes fraction", "data"),
                                        ha="right", va="bottom", fontsize=5.5, color="0.3")
        ax["update_ratio"].set(title="update:parameter ratio log10(mean|Δθ|/mean|θ|)")
        _probe_panel(ax["h_edge"], trace, names, shown, band)
        lr = trace["lr_layer"].values if "lr_layer" in trace else None
        if lr is not None:
            _per_layer(ax["lr"], steps, lr, names, shown, band)
        else:
            ax["lr"].plot(steps, trace.lr.values, color=PALETTE[7], lw=0.9)
            ax["lr"].ticklabel_format(axis="y", useOffset=False)
        ax["lr"].set(title="learning rate")
        loss = trace.loss.values
        ax["loss"].plot(steps, loss, color=PALETTE[7], lw=0.6)
        finite = loss[np.isfinite(loss)]
        if len(finite) and finite.min() > 0 and finite.max() > 30 * finite.min():
            ax["loss"].set(yscale="log")
        else:
            ax["loss"].ticklabel_format(axis="y", useOffset=False)
        ax["loss"].set(title="training loss")
        for a in (ax["lr"], ax["loss"]):
            a.set(xlabel="step")
        handles, labels = ax["grad_norm"].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), frameon=False)
        if title:
            fig.suptitle(title, fontsize=8)
    return fig, ax


def _probe_panel(ax, trace, names, shown, band):
    if trace.sizes.get("probe_step", 0) == 0:
        ax.text(0.5, 0.5, "no probes (probe_every = 0)", ha="center", va="center", transform=ax.transAxes)
        ax.set(title="sharpness at probes")
        return
    x = trace.probe_step.values
    he = h_edge(trace)
    if he is None:
        _per_layer(ax, x, trace.sharpness.transpose("probe_step", "layer").values, names, shown, band)
        network, = ax.plot(x, trace.sharpness_global.values, color="k", lw=1.2, ls=":", label="network")
        ax.set(yscale="log", title="sharpness λ_max at probes")
        ax.legend(handles=[network], loc="center right", frameon=False)
        return
    _per_layer(ax, x, he[0].transpose("probe_step", "layer").values, names, shown, band)
    network, = ax.plot(x, he[1].values, color="k", lw=1.2, ls=":", label="network")
    ax.axhline(1.0, color="#D55E00", lw=0.8, ls="--")
    ax.annotate("edge of stability", (0.01, 1.0), xycoords=("axes fraction", "data"), va="bottom",
                fontsize=5.5, color="#D55E00")
    ax.set(title="h/edge = lr·λ_max / edge at probes")
    ax.legend(handles=[network], loc="center right", frameon=False)


def save_dashboard(fig, out):
    """Save as PNG or PDF (by the suffix) atomically and byte-stably; closes the figure."""
    out = Path(out)
    fmt = out.suffix.lstrip(".").lower()
    if fmt not in ("png", "pdf"):
        raise ValueError(f"out={str(out)!r}: format {fmt!r} is unknown; valid: .png, .pdf")
    buf = io.BytesIO()
    metadata = {"CreationDate": None, "ModDate": None, "Producer": "optdyn"} if fmt == "pdf" \
        else {"Software": "optdyn"}
    fig.savefig(buf, format=fmt, dpi=150, metadata=metadata)
    plt.close(fig)
    store.atomic_write_bytes(out, buf.getvalue())
    return out
