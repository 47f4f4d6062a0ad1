"""Stack finished runs of the store into one ``xarray.Dataset``; export a tidy table.

Given only a store root, the runs lie along a flat ``run`` dim (the run ids) with every
config key as a coordinate along it. Given a sweep spec, the Dataset is indexed by the
spec's axes: one dim per grid key with more than one value (its values as the index), a
``zip`` dim when ``[zip]`` has more than one row (each zipped key a coordinate along it),
a ``runs`` dim when ``[[runs]]`` has more than one entry (each key they set a coordinate
along it); config keys that are the same everywhere are scalar coordinates. Points whose
run is not finished are NaN (boolean variables then hold True/False/NaN objects), and
``run_id`` says which run fills each point.

Summary values become variables (nested dicts flattened with ``.``, lists dropped; a name
taken by a config key or a trace variable gets the prefix ``summary.``; a trace variable
named like a config key, e.g. the per-step ``lr``, gets the prefix ``trace.``). With
``traces=True`` each run's trace is added, aligned on ``step``/``layer``/``probe_step``
by an outer join (NaN where a run lacks a step or a layer).

What was found is in ``attrs`` ``n_finished``, ``n_missing``, ``n_failed``, ``n_diverged``,
``n_total`` (:func:`experiments.store.status_counts`; for a spec the points are its distinct runs, for a bare
root the run directories in it). A root that holds no runs but whose ``runs/`` does (the
sweeps' default ``store/runs`` given as ``store``) is read there (``attrs["root"]``).
"""

from __future__ import annotations

import numbers
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from experiments import store
from experiments.runs.config import canonical_key
from experiments.sweeps.spec import Spec, as_spec, resolve_root


def collect(root, run_ids=None, traces=False, *, spec=None) -> xr.Dataset:
    """Finished runs of ``root`` (a store directory, or a spec path/:class:`Spec` whose root
    is then used; ``spec=`` gives the axes for an explicit ``root``), optionally only
    ``run_ids``, as one Dataset (module docstring)."""
    if isinstance(root, Spec) or str(root).endswith(".toml"):
        spec, root = root, None
    if spec is None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"root={str(root)!r} is not a directory")
        root = store.find_root(root)
        candidates = sorted(p.name for p in root.iterdir() if store.is_run_dir(p)) if run_ids is None \
            else list(run_ids)
        ds = _flat(root, [rid for rid in candidates if store.is_done(root / rid)], traces)
        ds.attrs.update(store.status_attrs(store.status_counts(root / rid for rid in candidates)))
        return ds
    spec = as_spec(spec)
    root = resolve_root(spec, root)
    points = spec.points
    ids = [rid for rid in dict.fromkeys(rid for _, _, rid in points) if run_ids is None or rid in run_ids]
    wanted = [rid for rid in ids if store.is_done(root / rid)]
    ds = _onto_axes(_flat(root, wanted, traces), spec, points, set(wanted))
    ds.attrs.update(store.status_attrs(store.status_counts(root / rid for rid in ids)))
    return ds


def _flat(root: Path, ids, traces) -> xr.Dataset:
    configs = [store.read_json(root / rid / store.CONFIG) for rid in ids]
    summaries = [_flatten(store.read_json(root / rid / store.SUMMARY)) for rid in ids]
    config_keys = list(dict.fromkeys(k for c in configs for k in c))
    trace = _traces(root, ids) if traces and ids else xr.Dataset()
    trace = trace.rename_vars({k: f"trace.{k}" for k in trace.data_vars if k in config_keys})
    taken = set(config_keys) | set(trace.variables) | {"run"}
    rows = [{**{k: _hashable(v) for k, v in c.items()},
             **{(f"summary.{k}" if k in taken else k): v for k, v in s.items()}}
            for c, s in zip(configs, summaries)]
    frame = pd.DataFrame(rows, index=pd.Index(ids, name="run", dtype=object))
    ds = xr.Dataset.from_dataframe(frame).set_coords(config_keys)
    ds = xr.merge([ds, trace], join="outer", compat="no_conflicts", combine_attrs="drop") if traces and ids else ds
    ds.attrs.update(root=str(root), n_runs=len(ids))
    return ds


def _traces(root: Path, ids) -> xr.Dataset:
    traces = []
    for rid in ids:
        trace = store.load_run(root / rid)
        trace.attrs = {}
        traces.append(trace)
    return xr.concat(traces, dim=pd.Index(ids, name="run", dtype=object), join="outer",
                     data_vars="all", coords="different", compat="equals", combine_attrs="drop",
                     fill_value=np.nan)


def _onto_axes(flat: xr.Dataset, spec, points, finished) -> xr.Dataset:
    """Place the flat runs at their spec points: vectorised ``sel`` with a grid of ids."""
    runs = list(spec.runs) or [{}]
    n_zip = len(next(iter(spec.zip.values()))) if spec.zip else 1
    dims = ["runs", "zip", *spec.grid]
    shape = (len(runs), n_zip, *(len(v) for v in spec.grid.values()))
    id_grid = np.full(shape, "", dtype=object)
    config_at = {}
    for index, config, rid in points:
        id_grid[index] = rid if rid in finished else ""
        config_at[index] = config.to_dict()
    keep = [d for d, n in zip(dims, shape) if n > 1]
    squeeze = tuple(a for a, n in enumerate(shape) if n == 1)
    selector = xr.DataArray(id_grid.squeeze(axis=squeeze), dims=keep)
    first = next(iter(config_at.values()))
    coords = {k: (k, [_hashable(config_at[_at(shape, dims, k, n)][k]) for n in range(len(v))])
              for k, v in spec.grid.items() if k in keep}
    for dim, keys in (("zip", list(spec.zip)), ("runs", list(dict.fromkeys(k for r in runs for k in r)))):
        if dim in keep:
            size = shape[dims.index(dim)]
            coords.update({k: (dim, [_hashable(config_at[_at(shape, dims, dim, n)][k]) for n in range(size)])
                           for k in keys})
    constant = {k: _hashable(v) for k, v in first.items()
                if k not in coords and all(_same(c[k], v) for c in config_at.values())}
    flat = flat.drop_vars([c for c in flat.coords if c not in flat.dims])
    flags = [n for n in flat.data_vars if flat[n].dtype == bool]
    if (selector == "").any():  # a point with no finished run: select an all-NaN one
        flat = flat.assign({n: flat[n].astype(object) for n in flags})  # else NaN makes them float
        flat = flat.reindex(run=list(flat.run.values) + [""])
    ds = flat.sel(run=selector).drop_vars("run")
    ds["run_id"] = selector.where(selector != "", np.nan)
    ds = ds.assign_coords(coords).assign_coords(constant)
    ds.attrs.update(root=flat.attrs["root"], n_runs=len(finished), spec=spec.name)
    return ds


def _at(shape, dims, dim, n):
    """The index of the first spec point with ``dim`` at position ``n``."""
    index = [0] * len(shape)
    index[dims.index(dim)] = n
    return tuple(index)


def _same(a, b):
    return canonical_key(a) == canonical_key(b)


def _flatten(summary, prefix=""):
    out = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif value is None or isinstance(value, (bool, str, numbers.Number)):
            out[f"{prefix}{key}"] = value
    return out


def _hashable(value):
    return canonical_key(value) if isinstance(value, (list, dict)) else value


def to_table(ds: xr.Dataset, path, fmt=None) -> pd.DataFrame:
    """Write ``ds`` as a tidy table (see :func:`tidy`), atomically, and return it.

    ``fmt``: ``"csv"`` or ``"parquet"`` (needs pyarrow); by default from the path's suffix.
    """
    return store.atomic_write_table(path, tidy(ds), fmt)


def tidy(ds: xr.Dataset) -> pd.DataFrame:
    """One row per observation. If all data variables share their dims: one row per index
    point and one column per variable. Otherwise long: one row per (numeric variable,
    index point), columns ``variable`` and ``value`` (a float; booleans as 0/1), with the
    non-numeric variables (``run_id``, strings) as columns beside it. Coordinates are
    columns; rows where every value is missing (points not finished) are dropped. Every
    column has one type, so the table is also valid Parquet."""
    names = list(ds.data_vars)
    if len({ds[n].dims for n in names}) <= 1:
        table = ds.to_dataframe().reset_index()
        if names:
            table = table.dropna(subset=names, how="all").reset_index(drop=True)
        return table.infer_objects()
    labels = [n for n in names if not _is_numeric(ds[n])]
    ds = ds.set_coords(labels)
    parts = []
    for name in (n for n in names if n not in labels):
        part = ds[name].astype(float).to_dataframe(name="value").reset_index().dropna(subset=["value"])
        part.insert(0, "variable", name)
        parts.append(part)
    return pd.concat(parts, ignore_index=True).infer_objects()


def _is_numeric(da: xr.DataArray) -> bool:
    if da.dtype.kind in "biuf":
        return True
    values = da.values.ravel()
    return da.dtype.kind == "O" and all(isinstance(v, (bool, numbers.Real)) for v in values if not pd.isna(v))
