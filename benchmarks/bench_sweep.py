"""Sweep benchmarks (issue 6): prints measured times and ratios.

1. Planning a resume over 10,000 finished runs (fake ``DONE`` run directories in a temp
   dir): parse + validate + expand the spec, hash the ids, stat the markers.
   Target < 1 s.
2. A 16-run CPU sweep of short runs (MLP on digits) with a local pool of 2 workers vs 1,
   A/B alternated. "end to end" includes starting the workers (spawn, ``import torch``,
   loading the data once per worker); "warm" times only the 16 runs, after a warm-up task
   per worker (a 2-step run). Target: ≥ 1.7× (warm). On a shared 2-core machine the load average is
   printed: with others' processes on the cores the ratio says little.
3. The same sweep on a Dask LocalCluster (2 loopback workers, 1 thread each) vs the pool
   of 2: overhead per run (warm) and the start-up of each.

    .venv/bin/python benchmarks/bench_sweep.py [--rounds N] [--steps S]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from experiments import store, sweep
from experiments.executors import DaskExecutor, PoolExecutor, RunTask

N_RUNS = 16


def warm(config, run_dir):
    """Warm-up task: a 2-step run (imports, data, and the first optimizer's import of
    ``torch._dynamo``, seconds each), then hold the worker a moment so each gets one."""
    from experiments.train import RunConfig, train

    train(RunConfig.from_dict({**config, "steps": 2}))
    time.sleep(1.0)
    return {"diverged": False}


def bench_planning(n_side=100):
    with tempfile.TemporaryDirectory() as tmp:
        data = {"name": "plan", "root": tmp, "base": {"model": "mlp", "data": "digits", "steps": 20},
                "grid": {"lr": [0.001 * (i + 1) for i in range(n_side)], "seed": list(range(n_side))}}
        for rid in {rid for _, _, rid in sweep.parse_spec(data).points}:
            os.mkdir(os.path.join(tmp, rid))
            Path(tmp, rid, store.DONE).touch()
        wall, cpu = time.perf_counter(), time.process_time()
        the_plan = sweep.plan(sweep.parse_spec(data))  # what a resumed `optdyn sweep` does first
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert the_plan.counts()["done"] == n_side ** 2
        stat = time.perf_counter()
        sweep.plan(the_plan.spec)  # ids cached on the spec: only the stats
        stat = time.perf_counter() - stat
    print(f"planning a resume over {n_side ** 2} finished runs: {wall:.3f} s wall, {cpu:.3f} s CPU "
          f"(of which stat-ing the markers: {stat:.3f} s); target < 1 s")


def sweep_tasks(root, steps):
    spec = sweep.parse_spec({"name": "bench", "root": str(root),
                             "base": {"model": "mlp", "data": "digits", "steps": steps},
                             "grid": {"lr": [0.01, 0.02, 0.03, 0.05], "momentum": [0.0, 0.5, 0.8, 0.9]}})
    configs = sweep.expand(spec)
    assert len(configs) == N_RUNS
    return [RunTask(sweep.run_id(c), c.to_dict(), str(Path(root) / sweep.run_id(c))) for c in configs]


def timed(executor, n_workers, steps):
    """(end to end, warm) seconds for the 16 runs on a fresh store."""
    with tempfile.TemporaryDirectory() as tmp:
        tasks = sweep_tasks(tmp, steps)
        warm_tasks = [RunTask(f"warm{i}", {"model": "mlp", "data": "digits"}, str(Path(tmp) / f"warm{i}"), "bench_sweep:warm")
                      for i in range(n_workers)]
        start = time.perf_counter()
        with executor:
            assert all(o["status"] == "finished" for o in executor.run_all(warm_tasks))
            t_warm = time.perf_counter()
            outcomes = list(executor.run_all(tasks))
            t_runs = time.perf_counter() - t_warm
        total = time.perf_counter() - start - 1.0  # minus the warm-up sleep (in parallel)
        assert all(o["status"] == "finished" for o in outcomes), outcomes
    return total, t_runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="A/B rounds of 1 vs 2 workers")
    parser.add_argument("--steps", type=int, default=150, help="steps per run")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}, {os.cpu_count()} cores")
    bench_planning()

    one, two = [], []
    for _ in range(args.rounds):
        one.append(timed(PoolExecutor(1), 1, args.steps))
        two.append(timed(PoolExecutor(2), 2, args.steps))
    best = lambda xs, i: min(x[i] for x in xs)  # noqa: E731 (least disturbed round)
    print(f"{N_RUNS} runs x {args.steps} steps, pool of 1 vs 2 workers ({args.rounds} round(s), best):")
    print(f"  end to end: 1 worker {best(one, 0):.1f} s, 2 workers {best(two, 0):.1f} s, "
          f"speed-up {best(one, 0) / best(two, 0):.2f}x")
    print(f"  warm:       1 worker {best(one, 1):.1f} s, 2 workers {best(two, 1):.1f} s, "
          f"speed-up {best(one, 1) / best(two, 1):.2f}x  (target >= 1.7x)")

    start = time.perf_counter()
    dask = DaskExecutor(n_local=2)
    dask_total, dask_runs = timed(dask, 2, args.steps)
    print(f"Dask LocalCluster (2 workers) vs pool of 2 on the same sweep:")
    print(f"  end to end: Dask {dask_total:.1f} s, pool {best(two, 0):.1f} s")
    print(f"  warm: Dask {dask_runs:.1f} s, pool {best(two, 1):.1f} s: overhead per run "
          f"{(dask_runs - best(two, 1)) / N_RUNS * 1e3:+.0f} ms "
          f"({dask_runs / best(two, 1):.2f}x)")
    print(f"load average at end: {os.getloadavg()} ({time.perf_counter() - start:.0f} s for the Dask part)")


if __name__ == "__main__":
    sys.exit(main())
