"""Running a sweep: plan it (which runs are finished, failed, to do) and hand the rest to
an executor (:mod:`experiments.sweeps.executors`).

Planning a resume only stats each run's ``DONE``/``FAILED`` markers; it reads no JSON.
Failed runs are retried only with ``retry_failed``; a diverged run is a finished result.
Executors: ``workers=0`` in-process, ``workers=N`` a local process pool (default: the core
count), ``scheduler=ADDR`` / ``dask_local=N`` Dask. A worker process pays its start-up once
(``import torch``, the data set, torch's lazy imports at the first optimizer: several
seconds), so very short sweeps are faster in-process. Two sweeps running the same run at
the same moment both compute it; the atomic writes make the second a harmless overwrite.

``run_sweep`` returns counts: ``finished`` (computed in this call, diverged ones included),
``skipped`` (finished before), ``diverged`` (of those finished now), ``failed`` (raised in
this call, or failed before and not retried), ``total``.
"""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from experiments import store
from experiments.sweeps.executors import DEFAULT_RUN_FN, RunTask, make_executor
from experiments.sweeps.spec import Spec, distinct_runs, as_spec, resolve_root, varying_keys


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
    spec = as_spec(spec_or_path)
    root = resolve_root(spec, root)
    configs, ids = (list(t) for t in zip(*distinct_runs(spec)))
    status, prefix, exists = [], os.path.join(root, ""), os.path.exists
    for rid in ids:
        if exists(f"{prefix}{rid}/{store.DONE}"):
            status.append("done")
        elif exists(f"{prefix}{rid}/{store.FAILED}"):
            status.append("failed")
        else:
            status.append("todo")
    return Plan(spec, root, configs, ids, status)


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
