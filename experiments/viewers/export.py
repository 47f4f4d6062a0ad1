"""A trace as a tidy table (CSV, Parquet) and as TensorBoard scalars.

Sources (:func:`experiments.store.read_trace`): a run directory (:func:`experiments.store.load_run`), a trace file,
or a directory with ``trace.nc`` and no config (a trace saved from one's own loop).

The tidy table (:func:`trace_table`) has one row per (step, layer): the per-layer variables, the
per-step ones repeated on each layer's row, and the probe's variables (``sharpness``, ...) on
the rows of probe steps (NaN elsewhere), plus ``h_edge`` (below).

TensorBoard (:func:`write_tensorboard`) groups scalars by the part of the tag before the first
``/``, so each layer is one group, ``LAYER/NAME``, and the network one more, ``global/NAME``:

* per layer: ``grad_norm``, ``update_norm``, ``param_norm``, ``update_ratio`` (log10, DL4J),
  ``grad_cos`` (successive gradients), ``lr`` (with several param groups: the layer's) and, at
  probe steps, ``sharpness`` and ``h_edge``;
* global: ``loss``, ``lr``, ``grad_norm``, ``grad_cos`` and, at probe steps, ``sharpness`` and
  ``h_edge``.

``h_edge`` = lr·sharpness / edge, the top mode's h over the method's stability edge
(docs/theory.md §2, §5: 2 for GD, 2(1+β) for HB, 2(1+β)/(1+2β) for NAG); ≥ 1 is past the
edge. It needs an SGD-type method (from the run's config or the trace's attrs); for other
optimizers it is left out. Non-finite values (the cosines' NaN at step 0, −inf ratios of a
zero update) are not written: TensorBoard draws no point there.
"""

import os
import tempfile
from pathlib import Path

import numpy as np

from dynamics.quadratic import stability_edge
from experiments import store

LAYER_SCALARS = ("grad_norm", "update_norm", "param_norm", "update_ratio", "grad_cos")
GLOBAL_SCALARS = {"loss": "loss", "lr": "lr", "grad_norm_global": "grad_norm", "grad_cos_global": "grad_cos"}


def method_edge(trace):
    """The stability edge in h of the trace's method, or None (not an SGD-type method)."""
    config = trace.attrs.get("config")
    a = config if isinstance(config, dict) else trace.attrs
    opt = a.get("opt")
    if opt not in ("gd", "hb", "nag"):
        return None
    return float(stability_edge(opt, 0.0 if opt == "gd" else float(a.get("momentum", 0.0))))


def h_edge(trace):
    """(lr·sharpness / edge per layer, the same for the network) at the probe steps, or None."""
    edge = method_edge(trace)
    if edge is None or "probe_step" not in trace.dims or trace.sizes["probe_step"] == 0:
        return None
    at = dict(step=trace.probe_step.values)
    lr = trace["lr_layer"] if "lr_layer" in trace else trace["lr"]
    lr = lr.sel(at).rename(step="probe_step").drop_vars("step", errors="ignore")
    lr_global = trace["lr"].sel(at).rename(step="probe_step").drop_vars("step", errors="ignore")
    return lr * trace["sharpness"] / edge, lr_global * trace["sharpness_global"] / edge


def trace_table(trace):
    """One row per (step, layer) with every step, layer and probe variable (module docstring)."""
    keep = [k for k, v in trace.data_vars.items() if set(v.dims) <= {"step", "layer"}]
    df = trace[keep].to_dataframe().reset_index()
    probe_vars = [k for k, v in trace.data_vars.items() if "probe_step" in v.dims]
    if probe_vars and trace.sizes.get("probe_step", 0):
        probes = trace[probe_vars]
        he = h_edge(trace)
        if he is not None:
            probes = probes.assign(h_edge=he[0], h_edge_global=he[1])
        p = probes.to_dataframe().reset_index().rename(columns={"probe_step": "step"})
        df = df.merge(p, on=["step", "layer"], how="left")
    return df


def write_table(trace, path):
    """Write :func:`trace_table` as CSV or Parquet (by the suffix) atomically; return it."""
    return store.atomic_write_table(path, trace_table(trace))


def scalars(trace):
    """Yield (tag, step, value) for every finite TensorBoard scalar (module docstring)."""
    steps = trace.step.values
    layers = [str(x) for x in trace.layer.values]
    per_layer = {name: trace[name].values for name in LAYER_SCALARS if name in trace}
    per_layer["lr"] = trace["lr_layer"].values if "lr_layer" in trace else \
        np.repeat(trace["lr"].values[:, None], len(layers), axis=1)
    for name, values in per_layer.items():
        for j, layer in enumerate(layers):
            for step, v in zip(steps, values[:, j]):
                if np.isfinite(v):
                    yield f"{layer}/{name}", int(step), float(v)
    for var, name in GLOBAL_SCALARS.items():
        for step, v in zip(steps, trace[var].values):
            if np.isfinite(v):
                yield f"global/{name}", int(step), float(v)
    if trace.sizes.get("probe_step", 0):
        he = h_edge(trace)
        probe = {"sharpness": (trace["sharpness"].values, trace["sharpness_global"].values)}
        if he is not None:
            probe["h_edge"] = (he[0].transpose("probe_step", "layer").values, he[1].values)
        for name, (per, glob) in probe.items():
            for i, step in enumerate(trace.probe_step.values):
                for j, layer in enumerate(layers):
                    if np.isfinite(per[i, j]):
                        yield f"{layer}/{name}", int(step), float(per[i, j])
                if np.isfinite(glob[i]):
                    yield f"global/{name}", int(step), float(glob[i])


def write_tensorboard(trace, log_dir):
    """Write the trace's scalars as one TensorBoard event file in ``log_dir`` (written in a
    temporary directory beside it, then moved in). Needs ``pip install optdyn[tensorboard]``.
    Returns the number of scalars written."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("tensorboard=DIR needs the tensorboard package: pip install 'optdyn[tensorboard]'") from None
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=log_dir) as tmp:
        writer = SummaryWriter(log_dir=tmp)
        for tag, step, value in scalars(trace):
            writer.add_scalar(tag, value, step)
            n += 1
        writer.close()
        for f in Path(tmp).iterdir():
            os.replace(f, log_dir / f.name)
    return n


