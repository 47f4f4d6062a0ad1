"""Figure style: two-column paper sizes, a colour-blind-safe palette (Okabe & Ito 2008),
and a saver that writes PDF + PNG with deterministic bytes."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Okabe-Ito palette, black last.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
METHOD_COLOURS = {"gd": "#000000", "hb": "#0072B2", "nag": "#D55E00"}
COLUMN_WIDTH = 3.4  # inches, one column of a two-column paper
PAGE_WIDTH = 7.0  # inches, both columns

RC = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 6.5,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "lines.linewidth": 1.0,
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
    "savefig.dpi": 200,
    "pdf.fonttype": 42,
    "svg.hashsalt": "optdyn",
    "path.simplify": False,
}


def new_figure(ncols=1, nrows=1, width=PAGE_WIDTH, height=None, **kwargs):
    """A figure with the paper's style; height defaults to 0.75 in per unit width share."""
    plt.rcParams.update(RC)
    height = height or max(1.9, 2.3 * nrows)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), layout="constrained", **kwargs)
    return fig, axes


def save(fig, out_dir, name):
    """Write ``name.pdf`` and ``name.png``; same figure -> same bytes on every rerun."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.pdf", out_dir / f"{name}.png"]
    fig.savefig(paths[0], metadata={"CreationDate": None, "ModDate": None, "Producer": "optdyn"})
    fig.savefig(paths[1], metadata={"Software": "optdyn"})
    plt.close(fig)
    return paths
