"""Running a sweep: plan it (which runs are finished, failed, to do) and hand the rest to
an executor (:mod:`experiments.sweeps.executors`).

Planning a resume only stats each run's ``DONE``/``FAILED`` markers; it reads no JSON.
Failed runs are retried only with ``retry_failed``; a diverged run is a finished result.
Executors: ``workers=0`` in-process, ``workers=N`` a local process pool (default: the core
count), ``scheduler=ADDR`` / ``dask_local=N`` Dask. A worker process pays its start-up once
(``import torch``, the data set, torch's lazy imports at the first optimizer: several
seconds), so very short sweeps are faster in-process. Each run is claimed before it is
trained (:func:`experiments.store.claim`): two sweeps on one root never train a run twice;
a run another live process holds is counted ``held`` (rerun later to pick it up).

``run_sweep`` returns counts: ``finished`` (computed in this call, diverged ones included),
``skipped`` (finished before), ``diverged`` (of those finished now), ``failed`` (raised in
this call, or failed before and not retried), ``held`` (being trained by another live
process), ``total``, and ``failed_before`` (of ``failed``, those not retried).

Before any run starts: the root is checked writable, the workers count and, for local
executors, the devices are checked; for local-file datasets (MNIST, CIFAR-10) the data
fingerprint of each finished run must equal that of the files read now, else a ValueError
(a finished run on other data is never taken as current). Ctrl-C stops the workers and
raises :class:`SweepInterrupted` with the counts so far.
"""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from experiments import store
from experiments.sweeps.executors import DEFAULT_RUN_FN, RunTask, make_executor
from experiments.sweeps.spec import Spec, distinct_runs, as_spec, resolve_root, varying_keys


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep; ``counts`` holds what was done (the workers have stopped)."""

    def __init__(self, counts):
        super().__init__()
        self.counts = counts


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
    """Expand the spec and stat each run's markers (no JSON is read). A finished run that
    still has the LOCK of a claimant killed after writing ``DONE`` has it removed."""
    spec = as_spec(spec_or_path)
    root = resolve_root(spec, root)
    configs, ids = (list(t) for t in zip(*distinct_runs(spec)))
    status, prefix, exists = [], os.path.join(root, ""), os.path.exists
    for rid in ids:
        if exists(f"{prefix}{rid}/{store.DONE}"):
            status.append("done")
            if exists(f"{prefix}{rid}/{store.LOCK}"):
                store.drop_stale_lock(f"{prefix}{rid}")
        elif exists(f"{prefix}{rid}/{store.FAILED}"):
            status.append("failed")
        else:
            status.append("todo")
    return Plan(spec, root, configs, ids, status)


def check_finished_data(the_plan, data_dir=None):
    """ValueError if a finished run of a local-file dataset was trained on other files than
    ``data_dir`` (or ``$OPTDYN_DATA``) holds now (reads only those runs' summaries)."""
    from experiments.runs.data import LOCAL_FILES, data_fingerprint

    now = {}
    for rid, config, status in zip(the_plan.ids, the_plan.configs, the_plan.status):
        if status != "done" or config.data not in LOCAL_FILES:
            continue
        key = (config.data, repr(config.data_args))
        if key not in now:
            now[key] = data_fingerprint(config.data, data_dir=data_dir, **config.data_kwargs)
        recorded = store.read_json(the_plan.root / rid / store.SUMMARY).get("data_fingerprint")
        if recorded is not None and recorded != now[key]:
            raise ValueError(f"run {rid} in root={str(the_plan.root)!r} was trained on other data files "
                             f"(data fingerprint {recorded}; the files read now have {now[key]}); "
                             f"sweep into another --root")


def check_devices(configs):
    """ValueError for a device this machine lacks (local executors only)."""
    from experiments.runs.loop import check_device

    for device in sorted({c.device for c in configs}):
        check_device(device)


def run_sweep(spec_or_path, *, root=None, workers=None, scheduler=None, dask_local=None,
              retry_failed=False, progress=True, run_fn=DEFAULT_RUN_FN, data_dir=None) -> dict:
    """Run every unfinished run of a spec; return the counts.

    ``workers``: 0 in-process, N a local pool of N processes (default: ``os.cpu_count()``);
    ``scheduler``/``dask_local``: Dask. Counts: ``finished`` (computed now; includes
    ``diverged``, which are finished runs), ``skipped`` (already finished), ``diverged`` (of
    those finished now), ``failed`` (raised now, or failed before and not retried), ``total``.
    ``run_fn``: what executes a run (``"module:function"``, see ``executors.RunTask``).
    ``data_dir``: where local-file datasets are read (default ``$OPTDYN_DATA``).
    """
    from tqdm import tqdm

    if workers is not None and workers < 0:
        raise ValueError(f"workers={workers} is outside the valid range [0, inf) (0: in-process)")
    the_plan = plan(spec_or_path, root=root)
    store.check_writable(the_plan.root, "root", directory=True)
    if scheduler is None and dask_local is None:
        check_devices(the_plan.configs)
    check_finished_data(the_plan, data_dir)
    todo_status = ("todo", "failed") if retry_failed else ("todo",)
    tasks = [RunTask(rid, c.to_dict(), str(the_plan.root / rid), run_fn,
                     None if data_dir is None else str(data_dir))
             for rid, c, s in zip(the_plan.ids, the_plan.configs, the_plan.status) if s in todo_status]
    failed_before = 0 if retry_failed else the_plan.status.count("failed")
    counts = {"finished": 0, "skipped": the_plan.status.count("done"), "diverged": 0,
              "failed": failed_before, "held": 0, "total": len(the_plan.ids), "failed_before": failed_before}
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
    try:
        with executor, bar:
            for outcome in executor.run_all(tasks):
                status = outcome["status"]
                if status == "diverged":
                    counts["diverged"] += 1
                    status = "finished"
                counts[status] += 1
                if outcome["error"]:
                    bar.write(f"run {outcome['run_id']} {status}: {outcome['error']}", file=sys.stderr)
                bar.set_postfix({k: counts[k] for k in ("finished", "diverged", "failed")}, refresh=False)
                bar.update(1)
    except KeyboardInterrupt:
        # a run can write DONE before its outcome reaches this process: count from the store
        counts["finished"] = sum(store.is_done(t.run_dir) for t in tasks)
        raise SweepInterrupted(counts) from None
    return counts


def format_counts(counts) -> str:
    """The sweep's final line; ``held`` only when some run was held elsewhere."""
    keys = ("finished", "skipped", "diverged", "failed") + (("held",) if counts.get("held") else ())
    return " / ".join(f"{k} {counts[k]}" for k in keys)


def format_hints(counts) -> list:
    """Lines telling what to do about failed-before and held runs (empty if none)."""
    hints = []
    if counts.get("failed_before"):
        hints.append(f"{counts['failed_before']} run(s) had failed before and were not retried; "
                     f"rerun with --retry-failed to retry them")
    if counts.get("held"):
        hints.append(f"{counts['held']} run(s) are being trained by another process; rerun later to pick them up")
    return hints
