"""Shared by the empirical figures: run a sweep spec at the figure's size and load its runs.

A spec in ``experiments/specs/`` holds the quick-mode ("make figures") settings, so
``optdyn sweep experiments/specs/NAME.toml`` reproduces exactly what the quick figure shows.
A figure shrinks (tiny) or grows (full) it by overriding ``[base]`` keys; an axis key keeps
its axis values (the sweep's rule: the axis wins). Runs go to ``ctx.store/runs`` (the
sweeps' default pool), so identical configs are computed once across figures.
"""

import dataclasses
from pathlib import Path

from experiments import store
from experiments.runs.config import run_id
from experiments.sweeps import SPECS_DIR, expand, load_spec, run_sweep

SPECS = SPECS_DIR


def spec_for(name, ctx, overrides=None, grid=None):
    """The spec ``experiments/specs/NAME.toml`` with ``overrides`` (a dict) put into its base
    and, if given, ``grid`` in place of its grid."""
    spec = load_spec(SPECS / f"{name}.toml")
    base = {**spec.base, **(overrides or {})}
    if ctx.device != "cpu":
        base["device"] = ctx.device
    spec = dataclasses.replace(spec, base=base)
    return spec if grid is None else dataclasses.replace(spec, grid=grid)


def run_dirs(name, ctx, overrides=None, grid=None):
    """Compute what the store lacks, then ``[(RunConfig, run directory), ...]`` in spec order.

    Tiny mode runs in-process (no worker start-up); otherwise ``ctx.workers`` processes.
    A run that raised is an error here (a diverged run is a result and is returned).
    """
    spec = spec_for(name, ctx, overrides, grid)
    root = Path(ctx.store) / "runs"
    workers = 0 if ctx.mode == "tiny" else ctx.workers
    counts = run_sweep(spec, root=root, workers=workers, progress=ctx.mode != "tiny")
    if counts["failed"]:
        raise RuntimeError(f"{counts['failed']} run(s) of spec {name!r} failed; see FAILED in {root}")
    return [(config, root / run_id(config)) for config in expand(spec)]


def load_runs(name, ctx, overrides=None, grid=None):
    """:func:`run_dirs`, with each run's trace loaded: ``[(RunConfig, trace Dataset), ...]``."""
    return [(config, store.load_run(path)) for config, path in run_dirs(name, ctx, overrides, grid)]


def layer_colours(layers):
    """One palette colour per layer, input to output (8 at most before colours repeat)."""
    from paper_figures.style import PALETTE

    return {layer: PALETTE[i % len(PALETTE)] for i, layer in enumerate(layers)}


def smooth(da, window, how="median"):
    """Centred rolling median (or mean) over ``step``: a trend line through noisy steps."""
    rolled = da.rolling(step=max(1, int(window)), center=True, min_periods=1)
    return rolled.median() if how == "median" else rolled.mean()


def write_summary(stem, table, meta, out="results"):
    """``results/STEM.csv`` (the per-layer table) and ``results/STEM.json`` (``meta`` plus
    the table as records), written atomically."""
    from experiments.store import atomic_write_json, atomic_write_text

    out = Path(out)
    atomic_write_text(out / f"{stem}.csv", table.to_csv(index=False, float_format="%.6g"))
    records = table.astype(object).where(table.notna(), None).to_dict(orient="records")  # NaN -> null
    atomic_write_json(out / f"{stem}.json", {**meta, "table": records})
    return out / f"{stem}.csv", out / f"{stem}.json"
