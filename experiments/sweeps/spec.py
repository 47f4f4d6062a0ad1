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

Each run's id is :func:`experiments.runs.config.run_id` of its config, so the same run is
computed once, across sweeps too. The store holds ``ROOT/<run_id>/`` (:mod:`experiments.store`).
Running a spec is :mod:`experiments.sweeps.runner`; stacking finished runs into one
``xarray.Dataset`` over the spec's axes is :mod:`experiments.sweeps.collect`.

Analytic sweeps (``dynamics`` grids over h, β, λ) are not fanned out here, per point or
otherwise: the theory broadcasts over numpy arrays, so a whole grid runs vectorised in one
process, faster than any scheduling of its points. This module is for training runs only.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from experiments.runs.config import RunConfig, canonical_key, run_id

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

def _config_fields():
    return tuple(f.name for f in dataclasses.fields(RunConfig))


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
        return RunConfig.from_dict(config_dict)
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
    return as_spec(spec).points


def as_spec(spec_or_path) -> Spec:
    if isinstance(spec_or_path, Spec):
        return spec_or_path
    if isinstance(spec_or_path, dict):
        return parse_spec(spec_or_path)
    return load_spec(spec_or_path)


def expand(spec) -> list:
    """The distinct RunConfigs of a spec (path, dict or Spec), in ``runs × zip × grid`` order."""
    return [config for config, _ in distinct_runs(as_spec(spec))]


def distinct_runs(spec: Spec):
    """``(config, run_id)`` pairs without repeats, in spec order."""
    return list({rid: (config, rid) for _, config, rid in spec.points}.values())


SPECS_DIR = Path(__file__).resolve().parents[1] / "specs"  # the specs shipped with the package


def resolve_root(spec: Spec, root=None) -> Path:
    return Path(root if root is not None else spec.root)


def varying_keys(config_dicts) -> list:
    """Config keys whose value is not the same in every config, in field order."""
    if not config_dicts:
        return []
    keys = list(config_dicts[0])
    return [k for k in keys if any(canonical_key(d.get(k)) != canonical_key(config_dicts[0].get(k)) for d in config_dicts)]
