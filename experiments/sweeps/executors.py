"""Where the runs of a sweep execute: one small interface, three implementations.

An executor takes :class:`RunTask` s and yields one outcome dict per task, in completion
order (``executor.run_all(tasks)``); it is a context manager that owns its workers.

- :class:`InProcessExecutor` — runs in the calling process, one after another (debugging;
  ``pdb`` works, exceptions keep their full traceback).
- :class:`PoolExecutor` — a local :class:`concurrent.futures.ProcessPoolExecutor` with the
  ``spawn`` start method (torch's thread pools do not survive ``fork``: a forked child can
  deadlock on a lock held by a thread that no longer exists). Each worker uses one torch
  thread, so ``workers`` processes use ``workers`` cores.
- :class:`DaskExecutor` — a Dask ``distributed`` cluster, either an existing scheduler
  (``tcp://HOST:PORT``; clusters are started with dask-jobqueue, dask-kubernetes,
  ``dask worker --nthreads 1 ...``) or a LocalCluster on 127.0.0.1 with ``n`` worker
  processes of one thread each. A run whose ``device`` starts with ``"cuda"`` is submitted
  with ``resources={"GPU": 1}``, so it only lands on workers started with
  ``dask worker ... --resources GPU=1`` (one GPU run at a time per such worker); CPU runs
  go anywhere.

Faults: a run is claimed (:func:`experiments.store.claim`) before it is trained, so a run
another live process holds is reported ``"held"`` and not trained twice. Pool workers die
with their parent (:func:`_worker_init`: ``PR_SET_PDEATHSIG`` on Linux, and on every system
a thread that watches the parent PID), ignore SIGINT (Ctrl-C reaches the whole process
group; the parent decides) and on SIGTERM unwind the run they are in (temporary files
removed, claim released, no ``FAILED``) and exit. On Ctrl-C the parent sends every worker
SIGTERM (:meth:`PoolExecutor.stop`).

Workers write their results straight into the run store (``experiments.store``), so every
worker must see the store root at the same path: a shared filesystem on a cluster. Only a
small outcome dict travels back to the caller.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from experiments import store

DEFAULT_RUN_FN = "experiments.sweeps.executors:run_training"


@dataclass(frozen=True)
class RunTask:
    """One run to execute: ``run_fn(config, run_dir)`` with ``config`` a RunConfig dict.

    ``run_fn`` is a ``"module:function"`` path rather than a function so that the task
    pickles by value to any worker; it writes the run directory and returns the summary
    dict (``diverged`` inside). The default is :func:`run_training`.
    """

    run_id: str
    config: dict
    run_dir: str
    run_fn: str = DEFAULT_RUN_FN
    data_dir: str | None = None  # passed to run_fn as data_dir= when given

    @property
    def wants_gpu(self) -> bool:
        return str(self.config.get("device", "cpu")).startswith("cuda")


def _resolve(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def run_training(config: dict, run_dir, data_dir=None) -> dict:
    """``experiments.runs.loop.run`` on the RunConfig built from ``config``."""
    from experiments.runs import RunConfig, run

    return run(RunConfig.from_dict(config), run_dir, data_dir=data_dir)


def _single_thread():
    import torch

    torch.set_num_threads(1)


class WorkerStop(SystemExit):
    """Raised in a pool worker by SIGTERM: unwinds the run in progress, then the worker exits."""


_worker_state = {"in_task": False, "stopping": False}


def _on_sigterm(signum, frame):
    """Between tasks: exit now (nothing to clean up). In a task: unwind it; the stop is
    sticky, so a worker exits after its task even if something swallowed the exception."""
    _worker_state["stopping"] = True
    if not _worker_state["in_task"]:
        os._exit(128 + signum)
    raise WorkerStop(128 + signum)


PARENT_POLL_SECONDS = 0.5


def _watch_parent(parent):
    """Portable fallback of PDEATHSIG: once re-parented, stop as SIGTERM would (then exit
    hard if the unwinding hangs)."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    os._exit(1)


def _worker_init(parent):
    """Pool worker start-up: one torch thread; die with ``parent``; SIGINT ignored, SIGTERM
    unwinds (module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass  # the watching thread below still works
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="optdyn-parent-watch").start()
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())  # not tqdm's default multiprocessing lock: a named semaphore
    _single_thread()                  # that a worker stopped by SIGTERM (os._exit) would leak


def execute_task(task: RunTask) -> dict:
    """Run one task in this process and record its result in the store.

    Returns ``{"run_id", "status", "error", "wall_seconds", "cpu_seconds"}`` with status
    ``"finished"``, ``"diverged"`` (a finished run whose summary says so), ``"failed"``
    (the run raised: ``FAILED`` holds the traceback), ``"skipped"`` (someone else
    finished it meanwhile) or ``"held"`` (another live process is training it: not
    trained here); the seconds are the task's, in its worker. The run is claimed for the
    whole task; stale temporaries are cleared once the claim is held.
    """
    _single_thread()
    run_dir = Path(task.run_dir)
    wall, cpu = time.perf_counter(), time.process_time()
    status, error = "skipped", None
    _worker_state["in_task"] = True
    try:
        with store.claim(run_dir):
            if not store.is_done(run_dir):
                status, error = _execute_claimed(task, run_dir)
    except store.RunHeld as err:
        status, error = "held", str(err)
    except WorkerStop:
        pass  # SIGTERM: the run has unwound and released its claim
    finally:
        _worker_state["in_task"] = False
        if _worker_state["stopping"]:
            os._exit(128 + signal.SIGTERM)
    return {"run_id": task.run_id, "status": status, "error": error,
            "wall_seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}


def _execute_claimed(task, run_dir):
    kwargs = {} if task.data_dir is None else {"data_dir": task.data_dir}
    try:
        summary = _resolve(task.run_fn)(task.config, run_dir, **kwargs)
        return ("diverged" if summary.get("diverged") else "finished"), None
    except Exception:
        text = traceback.format_exc()
        store.write_failure(run_dir, task.config, text)
        return "failed", text.strip().splitlines()[-1]


def executor_error(task: RunTask, err: BaseException) -> dict:
    """The executor lost the task (worker killed, pool broken): the run did not raise, so
    nothing is written to the store and the next sweep runs it again."""
    return {"run_id": task.run_id, "status": "failed", "error": f"executor: {err!r}",
            "wall_seconds": None, "cpu_seconds": None}


class InProcessExecutor:
    name = "in-process"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def run_all(self, tasks):
        import torch

        threads = torch.get_num_threads()  # one thread, as in the workers; then restore
        try:
            for task in tasks:
                yield execute_task(task)
        finally:
            torch.set_num_threads(threads)


class PoolExecutor:
    """``workers`` spawned processes, one torch thread each."""

    name = "pool"

    def __init__(self, workers: int):
        if workers < 1:
            raise ValueError(f"workers={workers} is outside the valid range [1, inf)")
        self.workers = workers
        self._pool = None

    def __enter__(self):
        self._pool = cf.ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
            initargs=(os.getpid(),))
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.stop()
        else:
            self._pool.shutdown(wait=True, cancel_futures=True)
        return False

    STOP_GRACE_SECONDS = 10

    def stop(self):
        """Tell every worker to stop (SIGTERM: each unwinds its run and exits), wait for
        them (SIGKILL after :attr:`STOP_GRACE_SECONDS`), and drop the queued tasks."""
        processes = list((self._pool._processes or {}).values())
        for process in processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + self.STOP_GRACE_SECONDS
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def run_all(self, tasks):
        futures = {self._pool.submit(execute_task, task): task for task in tasks}
        for future in cf.as_completed(futures):
            try:
                yield future.result()
            except Exception as err:  # BrokenProcessPool: a worker died under the run
                yield executor_error(futures[future], err)


def dask_resources(task: RunTask):
    """Abstract Dask resources a task needs: a GPU for a CUDA run (None: any worker)."""
    return {"GPU": 1} if task.wants_gpu else None


class DaskExecutor:
    """A Dask distributed client: ``scheduler`` address, or ``n_local`` loopback workers."""

    name = "dask"

    def __init__(self, scheduler: str | None = None, n_local: int | None = None, gpu_workers=False,
                 connect_timeout: float = 10.0):
        if (scheduler is None) == (n_local is None):
            raise ValueError("give exactly one of scheduler (an address) or dask_local (a worker count)")
        if n_local is not None and n_local < 1:
            raise ValueError(f"dask_local={n_local} is outside the valid range [1, inf)")
        self.scheduler, self.n_local, self.gpu_workers = scheduler, n_local, gpu_workers
        self.connect_timeout = connect_timeout
        self._cluster = self._client = None

    def __enter__(self):
        from distributed import Client, LocalCluster

        if self.scheduler is not None:
            try:
                self._client = Client(self.scheduler, timeout=self.connect_timeout)
            except (OSError, TimeoutError) as err:
                raise ValueError(f"scheduler={self.scheduler!r} cannot be reached within "
                                 f"{self.connect_timeout:g} s ({type(err).__name__}: {err})") from None
        else:
            self._cluster = LocalCluster(
                n_workers=self.n_local, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address=None, resources={"GPU": 1} if self.gpu_workers else None,
                silence_logs=logging.ERROR)
            self._client = Client(self._cluster)
        return self

    def __exit__(self, *exc):
        self._client.close()
        if self._cluster is not None:
            self._cluster.close()
        return False

    def run_all(self, tasks):
        from distributed import as_completed

        futures = {self._client.submit(execute_task, task, key=f"optdyn-run-{task.run_id}", pure=False,
                                       resources=dask_resources(task)): task
                   for task in tasks}
        for future in as_completed(futures):
            try:
                yield future.result()
            except Exception as err:  # KilledWorker, lost connection
                yield executor_error(futures[future], err)


def make_executor(*, workers: int | None = None, scheduler: str | None = None,
                  dask_local: int | None = None, gpu_workers: bool = False):
    """``workers=0``: in-process; ``workers=N``: local pool; ``scheduler``/``dask_local``: Dask."""
    if scheduler is not None or dask_local is not None:
        if workers is not None:
            raise ValueError("workers cannot be combined with scheduler or dask_local")
        return DaskExecutor(scheduler, dask_local, gpu_workers)
    workers = os.cpu_count() if workers is None else workers
    if workers < 0:
        raise ValueError(f"workers={workers} is outside the valid range [0, inf) (0: in-process)")
    return InProcessExecutor() if workers == 0 else PoolExecutor(workers)
