"""Run directories and atomic writes (docs/design.md, data flow).

A run directory holds ``config.json``, ``trace.nc`` (an xarray Dataset with dims
``(step, layer)``), ``summary.json`` and, written last, ``DONE``. Every file is written to a
temporary name in the same directory and renamed into place, so a reader never sees a
partial file and a killed writer leaves at most a stray ``.tmp-*`` file behind.
A run that raised leaves ``FAILED`` (its traceback) instead of ``DONE``.
"""

import json
import os
import tempfile
from pathlib import Path

import xarray as xr

CONFIG, TRACE, SUMMARY, DONE, FAILED = "config.json", "trace.nc", "summary.json", "DONE", "FAILED"


def atomic_write_bytes(path, data: bytes):
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str):
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(value):
    if hasattr(value, "tolist"):  # numpy and torch arrays and scalars (.item() fails on arrays)
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def atomic_write_dataset(path, ds: xr.Dataset):
    """Write a Dataset as netCDF (scipy engine: no extra dependency) atomically."""
    atomic_write_bytes(path, ds.to_netcdf(None, engine="scipy"))


def write_run(run_dir, config: dict, trace: xr.Dataset, summary: dict):
    """Write a finished run; ``DONE`` goes last, so its presence means complete."""
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / CONFIG, config)
    atomic_write_dataset(run_dir / TRACE, trace)
    atomic_write_json(run_dir / SUMMARY, summary)
    (run_dir / FAILED).unlink(missing_ok=True)
    atomic_write_text(run_dir / DONE, "")


def write_failure(run_dir, config: dict, traceback_text: str):
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / CONFIG, config)
    atomic_write_text(run_dir / FAILED, traceback_text)


def is_done(run_dir) -> bool:
    return (Path(run_dir) / DONE).exists()


def is_failed(run_dir) -> bool:
    return (Path(run_dir) / FAILED).exists() and not is_done(run_dir)


def read_json(path):
    return json.loads(Path(path).read_text())


def load_run(path) -> xr.Dataset:
    """The trace of a finished run, with its config and summary in ``attrs``.

    ``attrs["config"]`` and ``attrs["summary"]`` are dicts (not saved in the file).
    """
    run_dir = Path(path)
    if not is_done(run_dir):
        raise ValueError(f"path={str(run_dir)!r} is not a finished run directory (no {DONE} marker)")
    with xr.open_dataset(run_dir / TRACE, engine="scipy") as ds:
        trace = ds.load()
    trace.attrs["config"] = read_json(run_dir / CONFIG)
    trace.attrs["summary"] = read_json(run_dir / SUMMARY)
    return trace
