"""Run directories and atomic writes (docs/design.md, data flow).

A run directory holds ``config.json``, ``trace.nc`` (an xarray Dataset with dims
``(step, layer)``), ``summary.json`` and, written last, ``DONE``. Every file is written to a
temporary name in the same directory and renamed into place, so a reader never sees a
partial file and a killed writer leaves at most a stray ``.tmp-*`` file behind.
A run that raised leaves ``FAILED`` (its traceback) instead of ``DONE``. Files get the
mode a plain ``open`` would give (0666 less the umask), not ``mkstemp``'s 0600.

Stale temporaries are removed whenever a run directory is written next
(:func:`write_run`, :func:`write_failure`) and when a run is claimed (:func:`claim`).

Claims (one trainer per run): :func:`claim` creates ``LOCK`` with ``O_CREAT | O_EXCL``
(atomic on a local filesystem and on NFSv3+), holding the owner's host, PID and the PID's
start time. A lock whose owner is on this host and no longer alive (no such PID, or the
PID now belongs to a process started at another time) is stale and is taken over; the
take-over is serialised by an ``flock`` on the run directory, so two claimants cannot both
take it over. A lock from another host is never judged stale (its liveness cannot be
checked from here): remove it by hand if that host is gone. A claim is re-entrant within
one thread (a sweep worker claims, then ``run`` claims the same directory again); another
thread of the same process is refused like another process.
"""

import contextlib
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import xarray as xr

CONFIG, TRACE, SUMMARY, DONE, FAILED = "config.json", "trace.nc", "summary.json", "DONE", "FAILED"
LOCK = "LOCK"
TMP_PREFIX = ".tmp-"


def _umask():
    """The process umask (read without changing it where /proc allows: umask(2) can only
    be read by setting it, which would race with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data: bytes):
    """Write ``data`` to ``path`` through a temporary file and an atomic rename; the file
    gets mode 0666 & ~umask, like a file made by ``open``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
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


def atomic_write_table(path, table, fmt=None):
    """Write a pandas DataFrame as CSV or Parquet (``fmt``, by default from the path's suffix;
    Parquet needs pyarrow), atomically; return the table."""
    import io

    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".")
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"path={str(path)!r}: table format {fmt!r} is unknown; valid: csv, parquet")
    if fmt == "csv":
        atomic_write_text(path, table.to_csv(index=False))
        return table
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ValueError(f"path={str(path)!r}: Parquet needs pyarrow (pip install pyarrow); "
                         "write a CSV instead") from None
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())
    return table


def atomic_write_dataset(path, ds: xr.Dataset):
    """Write a Dataset as netCDF (scipy engine: no extra dependency) atomically."""
    atomic_write_bytes(path, ds.to_netcdf(None, engine="scipy"))


def clear_temporaries(run_dir):
    """Remove the ``.tmp-*`` files a killed writer left; call only while holding the run's
    claim (or when no one else writes the directory), since a live writer's temporary
    looks the same."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        for tmp in run_dir.glob(TMP_PREFIX + "*"):
            tmp.unlink(missing_ok=True)


def write_run(run_dir, config: dict, trace: xr.Dataset, summary: dict):
    """Write a finished run; ``DONE`` goes last, so its presence means complete."""
    run_dir = Path(run_dir)
    clear_temporaries(run_dir)
    atomic_write_json(run_dir / CONFIG, config)
    atomic_write_dataset(run_dir / TRACE, trace)
    atomic_write_json(run_dir / SUMMARY, summary)
    (run_dir / FAILED).unlink(missing_ok=True)
    atomic_write_text(run_dir / DONE, "")


def write_failure(run_dir, config: dict, traceback_text: str):
    run_dir = Path(run_dir)
    clear_temporaries(run_dir)
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


# --------------------------------------------------------------------------- output checks
def read_trace(source, name="source"):
    """The trace of a finished run directory (:func:`load_run`, config and summary in its
    attrs), of a trace file, or of a directory holding ``trace.nc`` (e.g. ``Tracer.dataset()``
    saved by one's own loop); ``name`` is the parameter the error messages name."""
    source = Path(source)
    if is_done(source):
        return load_run(source)
    path = source / TRACE if source.is_dir() else source
    if not path.is_file():
        raise ValueError(f"{name}={str(source)!r} is not a run directory, a trace file or a directory "
                         f"with {TRACE}")
    try:
        with xr.open_dataset(path) as ds:
            return ds.load()
    except (OSError, ValueError) as err:
        raise ValueError(f"{name}={str(source)!r} is not a readable trace: {err}") from None


def check_writable(path, name, *, directory=False):
    """ValueError (one line, naming ``name``) unless files can be written at ``path``.

    ``directory``: ``path`` is a directory to write into (it may not exist yet), else a file.
    Creates the parent chain and a probe file in the directory that will hold the output
    (``path`` if it is an existing directory, else its parent), then removes the probe; so a
    bad location fails before any work, not after it.
    """
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        raise ValueError(f"{name}={str(path)!r} exists and is {'not ' if directory else ''}a directory")
    where = path if path.is_dir() else path.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX + "probe-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{name}={str(path)!r} is not writable: {err.strerror or err}"
                         f"{f' ({err.filename})' if err.filename else ''}") from None


# --------------------------------------------------------------------------- claims
class RunHeld(ValueError):
    """The run directory is claimed by another live process."""


_HELD = {}  # (real path of a run directory, thread id) -> claim depth in this thread


def _process_start(pid):
    """(start time in clock ticks since boot, state) of ``pid`` from /proc (Linux), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19]), fields[0]
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid, start):
    """Whether ``pid`` is a live process (not a zombie) started at ``start`` (if known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    now = _process_start(pid)
    if now is None:
        return True
    return now[1] != "Z" and (start is None or now[0] == start)


def _owner():
    pid = os.getpid()
    start = _process_start(pid)
    return {"host": socket.gethostname(), "pid": pid, "start": start and start[0], "time": time.time()}


def read_lock(run_dir):
    """The LOCK's owner dict, None without a lock, ``{}`` for an unreadable lock."""
    try:
        info = json.loads((Path(run_dir) / LOCK).read_text())
        return info if isinstance(info, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


UNREADABLE_LOCK_SECONDS = 60  # an unparsable LOCK this old is a claimant killed mid-write


def lock_is_stale(run_dir, info):
    """A lock of a dead process on this host (or unreadable and old)."""
    if not info:
        try:
            return time.time() - (Path(run_dir) / LOCK).stat().st_mtime > UNREADABLE_LOCK_SECONDS
        except FileNotFoundError:
            return True
    return info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) \
        and not _alive(info["pid"], info.get("start"))


def _create_lock(path):
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(_owner(), f)
    return True


@contextlib.contextmanager
def _directory_flock(run_dir):
    import fcntl

    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by close, or by the kernel if we die
        yield
    finally:
        os.close(fd)


def _held_message(run_dir, info):
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("time", 0))) if info else "?"
    return (f"run directory {str(run_dir)!r} is held by pid {info.get('pid', '?')} on "
            f"{info.get('host', '?')} (since {since}); it is being trained there")


def _acquire(run_dir):
    path = run_dir / LOCK
    for _ in range(5):
        if _create_lock(path):
            return
        info = read_lock(run_dir)
        if info is None:
            continue  # released meanwhile
        if not lock_is_stale(run_dir, info):
            raise RunHeld(_held_message(run_dir, info))
        with _directory_flock(run_dir):  # one taker-over at a time
            if read_lock(run_dir) == info:
                path.unlink(missing_ok=True)
            if _create_lock(path):
                return
    raise RunHeld(_held_message(run_dir, read_lock(run_dir) or {}))


def drop_stale_lock(run_dir):
    """Remove ``run_dir``'s LOCK if its owner is dead (a claimant killed between writing
    ``DONE`` and releasing its claim leaves one in a finished run); return whether one was
    removed. A live owner's lock is left alone."""
    run_dir = Path(run_dir)
    info = read_lock(run_dir)
    if info is None or not lock_is_stale(run_dir, info):
        return False
    with _directory_flock(run_dir):
        if read_lock(run_dir) == info:
            (run_dir / LOCK).unlink(missing_ok=True)
            return True
    return False


def _release(run_dir):
    info = read_lock(run_dir)
    if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        (run_dir / LOCK).unlink(missing_ok=True)


@contextlib.contextmanager
def claim(run_dir):
    """Hold ``run_dir``'s ``LOCK`` for the ``with`` block (module docstring); raise
    :class:`RunHeld` if another live process holds it. Creates the directory; clears stale
    temporaries once the claim is held."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = (os.path.realpath(run_dir), threading.get_ident())  # another thread is another claimant
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    _acquire(run_dir)
    _HELD[key] = 1
    try:
        clear_temporaries(run_dir)
        yield
    finally:
        del _HELD[key]
        _release(run_dir)


# --------------------------------------------------------------------------- what a root holds
def is_run_dir(path) -> bool:
    """A directory that a run has written to (config, marker or claim present)."""
    path = Path(path)
    return any((path / name).exists() for name in (CONFIG, DONE, FAILED, LOCK))


def find_root(root) -> Path:
    """``root``, or ``root/runs`` when ``root`` holds no run directories but ``root/runs``
    does (the sweeps' default ``store/runs`` given as ``store``)."""
    root = Path(root)
    if root.is_dir() and not any(is_run_dir(p) for p in root.iterdir() if p.is_dir()):
        nested = root / "runs"
        if nested.is_dir() and any(is_run_dir(p) for p in nested.iterdir() if p.is_dir()):
            return nested
    return root


def status_counts(run_dirs) -> dict:
    """How many of ``run_dirs`` are ``finished`` (DONE), ``failed`` (FAILED, not DONE),
    ``missing`` (neither: never run, or being run) and ``diverged`` (finished runs whose
    summary says so); ``total``."""
    counts = {"total": 0, "finished": 0, "missing": 0, "failed": 0, "diverged": 0}
    for d in run_dirs:
        counts["total"] += 1
        if is_done(d):
            counts["finished"] += 1
            counts["diverged"] += bool(read_json(Path(d) / SUMMARY).get("diverged"))
        elif is_failed(d):
            counts["failed"] += 1
        else:
            counts["missing"] += 1
    return counts


def format_status(counts) -> str:
    return (f"{counts['finished']} of {counts['total']} points finished ({counts['diverged']} of them diverged), "
            f"{counts['missing']} missing, {counts['failed']} failed")


STATUS_KEYS = ("total", "finished", "missing", "failed", "diverged")


def status_attrs(counts) -> dict:
    """:func:`status_counts` as flat Dataset attributes ``n_total``, ``n_finished``, ..."""
    return {f"n_{k}": int(counts[k]) for k in STATUS_KEYS}


def status_from_attrs(attrs) -> dict | None:
    if not all(f"n_{k}" in attrs for k in STATUS_KEYS):
        return None
    return {k: int(attrs[f"n_{k}"]) for k in STATUS_KEYS}
