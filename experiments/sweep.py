"""Parameter sweeps over training runs: a TOML spec → run configs → the run store.

A spec (``experiments/specs/*.toml``)::

    name = "seed-cnn"              # required
    root = "store/runs"            # optional, default "store/runs"; see below
    description = "..."            # optional
    [base]                         # a RunConfig dict: what every run shares
    model = "seed-cnn"
    lr = 0.05
    [grid]                         # product of lists
    lr = [0.01, 0.05]
    seed = [0, 1]
    [zip]                          # lists of equal length, taken together
    opt = ["hb", "nag"]
    momentum = [0.9, 0.8]
    [[runs]]                       # explicit list of overrides
    batch_size = 32

The runs are ``runs × zip × grid``: for each ``[[runs]]`` entry (or one empty entry), for
each zipped row (or one), for each grid point, the config is
``base | run entry | zip row | grid point``. A key may appear in ``base`` and in one axis
(the axis wins), never in two axes. Two spec points that give the same config are one run.

``root`` is resolved against the current working directory (like every other path given
on the command line; a spec shipped inside the package must not write into it); the
``root=`` argument / ``--root`` option overrides it. Sweeps share a root: the default
``store/runs`` is one pool of runs, whichever spec asked for them.

Validation happens before anything runs: an unknown key (top level or RunConfig field),
a wrong type, an empty axis, unequal zip lengths or an unknown model raise a ValueError
naming the key and what was expected (the CLI prints it as one line, exit status 2).

Each run's id is ``sha256(RESULT_FORMAT, canonical JSON of the full config)[:16]``: all
fields with defaults filled in, keys sorted, ints in float fields made floats, ``-0.0`` made
``0.0``. So the same run is computed once, across sweeps too; bump :data:`RESULT_FORMAT`
when what a run writes changes meaning, and every run is recomputed under new ids.
The store holds ``ROOT/<run_id>/`` (``experiments.store``): a run is finished when ``DONE``
exists (written last), failed when only ``FAILED`` (its traceback) exists. Planning a
resume only stats ``DONE``/``FAILED`` markers; it reads no JSON. Failed runs are retried only
with ``retry_failed``; a diverged run is a finished result. Two sweeps running the same
run at the same moment both compute it; the atomic writes make the second a harmless
overwrite.

Executors (``experiments.executors``): ``workers=0`` in-process, ``workers=N`` a local
process pool (default: the core count), ``scheduler=ADDR`` / ``dask_local=N`` Dask. A
worker process pays its start-up once (``import torch``, the data set, torch's lazy imports
at the first optimizer: several seconds), so very short sweeps are faster in-process.
``run_sweep`` returns counts: ``finished`` (computed in this call, diverged ones included),
``skipped`` (finished before), ``diverged`` (of those finished now), ``failed`` (raised in
this call, or failed before and not retried), ``total``; the CLI prints
``finished N / skipped N / diverged N / failed N`` and exits with status 1 if any failed.

Analytic sweeps (``dynamics`` grids over h, β, λ) are not fanned out here, per point or
otherwise: the theory broadcasts over numpy arrays, so a whole grid runs vectorised in one
process, faster than any scheduling of its points. This module is for training runs only.

``collect`` (in ``experiments.collect``, re-exported here) stacks finished runs into one
``xarray.Dataset`` indexed by the spec's axes (one dim per varying grid key, ``zip``,
``runs``), or along a flat ``run`` dim given only a root; ``to_table`` writes a tidy
CSV/Parquet table.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import itertools
import json
import math
import numbers
import os
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from experiments import store
from experiments.executors import DEFAULT_RUN_FN, RunTask, make_executor

RESULT_FORMAT = 1
DEFAULT_ROOT = "store/runs"
AXES = ("grid", "zip", "runs")
TOP_KEYS = ("name", "root", "description", "base") + AXES


@dataclass(frozen=True)
class Spec:
    """A validated sweep spec (see the module docstring for the format)."""

    name: str
    base: dict
    grid: dict = field(default_factory=dict)
    zip: dict = field(default_factory=dict)
    runs: tuple = ()
    root: str = DEFAULT_ROOT
    description: str = ""
    source: str = "<spec>"

    @functools.cached_property
    def points(self) -> list:
        """``(index, RunConfig, run_id)`` for every spec point, duplicates included (index:
        see ``_positions``); built once per Spec (validation builds it)."""
        out = []
        collecting = gc.isenabled()
        gc.disable()  # 10,000s of small objects, none cyclic: the collector only costs time
        try:
            for index, row in _positions(self):
                config = _build({**self.base, **row}, lambda: f"spec {self.source}: point {row}")
                out.append((index, config, run_id(config)))
        finally:
            if collecting:
                gc.enable()
        return out


# ---------------------------------------------------------------- parsing and validation

@functools.cache
def _run_config_cls():
    from experiments.train import RunConfig

    return RunConfig


def _config_fields():
    return tuple(f.name for f in dataclasses.fields(_run_config_cls()))


def load_spec(path) -> Spec:
    """Read and validate a spec file (every run config is built once, to check it)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"spec={str(path)!r} is not a file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"spec={str(path)!r} is not valid TOML: {err}") from None
    return parse_spec(data, source=str(path))


def parse_spec(data: dict, source: str = "<spec>") -> Spec:
    """Validate a spec dict (as read from TOML) and return a :class:`Spec`."""
    where = f"spec {source}"
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; expected one of {', '.join(TOP_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: key 'name' must be a non-empty string, got {name!r}")
    for key in ("root", "description"):
        if key in data and not isinstance(data[key], str):
            raise ValueError(f"{where}: key {key!r} must be a string, got {type(data[key]).__name__}")
    fields = _config_fields()
    base = _table(data, "base", where)
    _check_fields(base, "base", fields, where)
    grid, zipped = _table(data, "grid", where), _table(data, "zip", where)
    for axis, table in (("grid", grid), ("zip", zipped)):
        _check_fields(table, axis, fields, where)
        for key, values in table.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"{where}: axis '{axis}.{key}' must be a non-empty list of values, "
                                 f"got {values!r}")
    lengths = {key: len(values) for key, values in zipped.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{where}: the lists in [zip] must have equal lengths, got "
                         + ", ".join(f"{k}: {n}" for k, n in lengths.items()))
    runs = data.get("runs", None)
    if runs is not None:
        if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
            raise ValueError(f"{where}: axis 'runs' must be a non-empty array of tables ([[runs]]), "
                             f"got {runs!r}")
        for i, entry in enumerate(runs):
            _check_fields(entry, f"runs[{i}]", fields, where)
    seen = {}
    for axis, keys in (("grid", grid), ("zip", zipped), ("runs", {k for r in runs or () for k in r})):
        for key in keys:
            if key in seen:
                raise ValueError(f"{where}: key {key!r} appears in both [{seen[key]}] and [{axis}]; "
                                 "expected each key in at most one axis")
            seen[key] = axis
    spec = Spec(name=name, base=base, grid=grid, zip=zipped, runs=tuple(runs or ()),
                root=data.get("root", DEFAULT_ROOT), description=data.get("description", ""),
                source=str(source))
    _check_values(spec)
    return spec


def _table(data, key, where):
    table = data.get(key, {})
    if not isinstance(table, dict):
        raise ValueError(f"{where}: key {key!r} must be a table ([{key}]), got {type(table).__name__}")
    return table


def _check_fields(table, label, fields, where):
    for key in table:
        if key not in fields:
            raise ValueError(f"{where}: key '{label}.{key}' is not a RunConfig field; "
                             f"expected one of {', '.join(fields)}")


def _check_values(spec: Spec):
    """Build a config from the base and from each axis value, naming the first bad one.

    A value is reported if it fails both on the base alone and together with the first
    spec point (which supplies what it may need, e.g. ``step_every`` for ``schedule``);
    what is bad only in combination is caught when all points are built, naming the point.
    """
    where = f"spec {spec.source}"
    first = _override_rows(spec, first_only=True)[0]
    single = [("base", {})]
    single += [(f"runs[{i}]", entry) for i, entry in enumerate(spec.runs)]
    single += [(f"zip.{k}[{i}]", {k: v}) for k, vs in spec.zip.items() for i, v in enumerate(vs)]
    single += [(f"grid.{k}[{i}]", {k: v}) for k, vs in spec.grid.items() for i, v in enumerate(vs)]
    for label, override in single:
        try:
            _build({**spec.base, **override}, f"{where}: {label}")
        except ValueError:
            _build({**spec.base, **first, **override}, f"{where}: {label}")
    spec.points  # every point, naming the first bad combination


def _build(config_dict, label):
    """``RunConfig.from_dict``; an error is prefixed with ``label`` (a string, or a callable
    giving it: formatting 10,000 labels that are never shown costs time)."""
    try:
        return _run_config_cls().from_dict(config_dict)
    except (ValueError, TypeError) as err:  # RunConfig checks types, models, data sets
        raise ValueError(f"{label() if callable(label) else label}: {err}") from None


# ---------------------------------------------------------------- expansion and ids

def _override_rows(spec: Spec, first_only=False):
    return [row for _, row in _positions(spec, first_only)]


def _positions(spec: Spec, first_only=False):
    """``(index, overrides)`` per spec point in ``runs × zip × grid`` order; ``index`` is
    ``(runs entry, zip row, *grid indices)``."""
    runs = list(spec.runs) or [{}]
    n_zip = len(next(iter(spec.zip.values()))) if spec.zip else 1
    grid_index = itertools.product(*(range(len(v)) for v in spec.grid.values()))
    out = []
    for (i, entry), j, g in itertools.product(enumerate(runs), range(n_zip), grid_index):
        zipped = {k: v[j] for k, v in spec.zip.items()}
        grid = {k: spec.grid[k][n] for k, n in zip(spec.grid, g)}
        out.append(((i, j, *g), {**entry, **zipped, **grid}))
        if first_only:
            break
    return out


def spec_points(spec):
    """Every point of the spec as ``(index, RunConfig, run_id)`` (:attr:`Spec.points`)."""
    return _as_spec(spec).points


def _as_spec(spec_or_path) -> Spec:
    if isinstance(spec_or_path, Spec):
        return spec_or_path
    if isinstance(spec_or_path, dict):
        return parse_spec(spec_or_path)
    return load_spec(spec_or_path)


def expand(spec) -> list:
    """The distinct RunConfigs of a spec (path, dict or Spec), in ``runs × zip × grid`` order."""
    return [config for config, _ in _distinct(_as_spec(spec))]


def _distinct(spec: Spec):
    """``(config, run_id)`` pairs without repeats, in spec order."""
    return list({rid: (config, rid) for _, config, rid in spec.points}.values())


@functools.lru_cache(maxsize=None)
def _field_kinds(cls):
    """Fields annotated float, and fields of any type but str/int/bool/float (containers,
    unions): the only ones whose values canonicalisation may change."""
    floats, others = [], []
    for key, hint in typing.get_type_hints(cls).items():
        kinds = typing.get_args(hint) or (hint,)
        if float in kinds and int not in kinds:
            floats.append(key)
        elif not set(kinds) <= {str, int, bool, type(None)}:
            others.append(key)
    return tuple(floats), tuple(others)


def canonical_config(config) -> dict:
    """``config.to_dict()`` normalised so equal runs give equal JSON (see module docstring)."""
    floats, others = _field_kinds(type(config))
    out = config.to_dict()
    for key in floats:
        value = out[key]
        if type(value) is float:
            out[key] = value + 0.0 if math.isfinite(value) else repr(value)  # -0.0 + 0.0 == 0.0
        elif value is not None:
            out[key] = _canonical_value(float(value) if isinstance(value, numbers.Real) else value)
    for key in others:
        out[key] = _canonical_value(out[key])
    return out


def _canonical_value(value):
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value + 0.0 if math.isfinite(value) else repr(value)  # -0.0 + 0.0 == 0.0
    if isinstance(value, dict):
        return {str(k): _canonical_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical_value(v) for v in value]
    raise TypeError(f"config value {value!r} of type {type(value).__name__} has no canonical JSON form")


def run_id(config) -> str:
    """16 hex digits of sha256 over the result format version and the canonical config."""
    text = json.dumps(canonical_config(config), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(f"optdyn-result-format-{RESULT_FORMAT}\n{text}".encode()).hexdigest()[:16]


# ---------------------------------------------------------------- planning and running

def resolve_root(spec: Spec, root=None) -> Path:
    return Path(root if root is not None else spec.root)


@dataclass
class Plan:
    """What a sweep would do: ids, configs and their status ("done", "failed", "todo")."""

    spec: Spec
    root: Path
    configs: list
    ids: list
    status: list

    def counts(self):
        return {s: self.status.count(s) for s in ("done", "failed", "todo")}

    def varying_keys(self):
        return varying_keys([c.to_dict() for c in self.configs])


def plan(spec_or_path, *, root=None) -> Plan:
    """Expand the spec and stat each run's markers (no JSON is read)."""
    spec = _as_spec(spec_or_path)
    root = resolve_root(spec, root)
    configs, ids = (list(t) for t in zip(*_distinct(spec)))
    status, prefix, exists = [], os.path.join(root, ""), os.path.exists
    for rid in ids:
        if exists(f"{prefix}{rid}/{store.DONE}"):
            status.append("done")
        elif exists(f"{prefix}{rid}/{store.FAILED}"):
            status.append("failed")
        else:
            status.append("todo")
    return Plan(spec, root, configs, ids, status)


def varying_keys(config_dicts) -> list:
    """Config keys whose value is not the same in every config, in field order."""
    if not config_dicts:
        return []
    keys = list(config_dicts[0])
    return [k for k in keys if any(_key(d.get(k)) != _key(config_dicts[0].get(k)) for d in config_dicts)]


def _key(value):
    return json.dumps(_canonical_value(value), sort_keys=True)


def run_sweep(spec_or_path, *, root=None, workers=None, scheduler=None, dask_local=None,
              retry_failed=False, progress=True, run_fn=DEFAULT_RUN_FN) -> dict:
    """Run every unfinished run of a spec; return the counts.

    ``workers``: 0 in-process, N a local pool of N processes (default: ``os.cpu_count()``);
    ``scheduler``/``dask_local``: Dask. Counts: ``finished`` (computed now; includes
    ``diverged``, which are finished runs), ``skipped`` (already finished), ``diverged`` (of
    those finished now), ``failed`` (raised now, or failed before and not retried), ``total``.
    ``run_fn``: what executes a run (``"module:function"``, see ``executors.RunTask``).
    """
    from tqdm import tqdm

    the_plan = plan(spec_or_path, root=root)
    todo_status = ("todo", "failed") if retry_failed else ("todo",)
    tasks = [RunTask(rid, c.to_dict(), str(the_plan.root / rid), run_fn)
             for rid, c, s in zip(the_plan.ids, the_plan.configs, the_plan.status) if s in todo_status]
    counts = {"finished": 0, "skipped": the_plan.status.count("done"), "diverged": 0,
              "failed": 0 if retry_failed else the_plan.status.count("failed"),
              "total": len(the_plan.ids)}
    if not tasks:
        return counts
    if workers is None and scheduler is None and dask_local is None:
        workers = os.cpu_count()
    if workers:
        workers = min(workers, len(tasks))
    executor = make_executor(workers=workers, scheduler=scheduler, dask_local=dask_local,
                             gpu_workers=any(t.wants_gpu for t in tasks))
    bar = tqdm(total=len(tasks), desc=the_plan.spec.name, unit="run", disable=not progress,
               file=sys.stderr)
    with executor, bar:
        for outcome in executor.run_all(tasks):
            status = outcome["status"]
            if status == "diverged":
                counts["diverged"] += 1
                status = "finished"
            counts[status] += 1
            if outcome["error"]:
                bar.write(f"run {outcome['run_id']} failed: {outcome['error']}", file=sys.stderr)
            bar.set_postfix({k: counts[k] for k in ("finished", "diverged", "failed")}, refresh=False)
            bar.update(1)
    return counts


def format_counts(counts) -> str:
    return " / ".join(f"{k} {counts[k]}" for k in ("finished", "skipped", "diverged", "failed"))


def __getattr__(name):
    """``collect``, ``to_table`` and ``tidy`` live in ``experiments.collect`` (imported lazily:
    it imports this module)."""
    if name in ("collect", "to_table", "tidy"):
        from experiments import collect

        return getattr(collect, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------- CLI

def add_command(subparsers):
    p = subparsers.add_parser("sweep", help="run a sweep spec (resumable)",
                              description="Run every unfinished run of SPEC. Final line: finished "
                              "(computed now, diverged included) / skipped (already finished) / "
                              "diverged / failed. Exit 1 if any run failed.")
    p.add_argument("spec", help="sweep spec, TOML")
    p.add_argument("--root", help="store root (default: the spec's root, relative to the CWD)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, help="local worker processes (default: core count; 0: in-process)")
    where.add_argument("--scheduler", help="Dask scheduler address, tcp://HOST:PORT")
    where.add_argument("--dask-local", type=int, metavar="N", help="start a Dask LocalCluster of N workers")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their status; run nothing")
    p.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_sweep_main)

    c = subparsers.add_parser("collect", help="stack finished runs into one table/dataset")
    c.add_argument("source", help="a store root directory, or a sweep spec (.toml)")
    c.add_argument("--root", help="store root when SOURCE is a spec (default: the spec's root)")
    c.add_argument("--traces", action="store_true", help="include the traces, not only summaries")
    c.add_argument("--csv", help="write a tidy CSV table here")
    c.add_argument("--parquet", help="write a tidy Parquet table here (needs pyarrow)")
    c.set_defaults(func=_collect_main)


def _sweep_main(args):
    if args.dry_run:
        the_plan = plan(args.spec, root=args.root)
        keys = the_plan.varying_keys()
        for rid, config, status in zip(the_plan.ids, the_plan.configs, the_plan.status):
            values = config.to_dict()
            print(rid, f"{status:6s}", " ".join(f"{k}={values[k]!r}" for k in keys))
        c = the_plan.counts()
        print(f"{len(the_plan.ids)} runs in {the_plan.root}: done {c['done']} / failed {c['failed']} "
              f"/ to run {c['todo'] + (c['failed'] if args.retry_failed else 0)}")
        return 0
    counts = run_sweep(args.spec, root=args.root, workers=args.workers, scheduler=args.scheduler,
                       dask_local=args.dask_local, retry_failed=args.retry_failed,
                       progress=not args.no_progress)
    print(format_counts(counts))
    return 1 if counts["failed"] else 0


def _collect_main(args):
    from experiments.collect import collect, to_table

    if args.root is not None and not str(args.source).endswith(".toml"):
        raise ValueError(f"--root is only for a spec SOURCE; source={args.source!r} is a root already")
    ds = collect(args.source, traces=args.traces) if args.root is None else \
        collect(args.root, traces=args.traces, spec=args.source)
    for path, fmt in ((args.csv, "csv"), (args.parquet, "parquet")):
        if path:
            table = to_table(ds, path, fmt)
            print(f"wrote {len(table)} rows to {path}")
    if not (args.csv or args.parquet):
        print(ds)
    return 0
