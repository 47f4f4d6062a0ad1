"""Sweep benchmarks (issue 6): prints measured times and ratios.

1. Planning a resume over 10,000 finished runs (fake ``DONE`` run directories in a temp
   dir): parse + validate + expand the spec, hash the ids, stat the markers.
   Target < 1 s.
2. A 16-run CPU sweep of short runs (MLP on digits) with a local pool of 2 workers vs 1.
   "End to end" is the first sweep on a fresh pool: worker start (spawn, ``import torch``),
   the data set and the first optimizer's lazy imports (seconds, once per worker), then
   the runs. "Warm" repeats the sweep on a fresh store with the started workers, A/B
   alternated over rounds. Target: ≥ 1.7×. The machine is shared: the load average is
   printed, and with others' processes on the cores the ratio says little.
3. The same sweep on a Dask LocalCluster (2 loopback workers, 1 thread each) vs the pool
   of 2 (alternated with the A/B rounds): overhead per run, and the start-up of each.

    .venv/bin/python benchmarks/bench_sweep.py [--rounds N] [--steps S]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from experiments import store, sweeps as sweep
from experiments.sweeps.spec import distinct_runs
from experiments.sweeps.executors import DaskExecutor, PoolExecutor, RunTask

N_RUNS = 16


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
        build = time.process_time()
        for config in the_plan.configs:  # the RunConfig validation inside the planning
            type(config).from_dict(config.to_dict())
        build = time.process_time() - build
    print(f"planning a resume over {n_side ** 2} finished runs: {wall:.3f} s wall, {cpu:.3f} s CPU "
          f"(of which stat-ing the markers {stat:.3f} s wall, building the RunConfigs "
          f"~{build:.3f} s CPU); target < 1 s")


def sweep_seconds(executor, steps):
    """Seconds for the 16 runs of a fresh store on a (started) executor, and the cores
    they got: the CPU seconds of the runs in their workers over that wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = sweep.parse_spec({"name": "bench", "root": tmp,
                                 "base": {"model": "mlp", "data": "digits", "steps": steps},
                                 "grid": {"lr": [0.01, 0.02, 0.03, 0.05], "momentum": [0.0, 0.5, 0.8, 0.9]}})
        tasks = [RunTask(rid, c.to_dict(), str(Path(tmp) / rid)) for c, rid in distinct_runs(spec)]
        assert len(tasks) == N_RUNS
        start = time.perf_counter()
        outcomes = list(executor.run_all(tasks))
        seconds = time.perf_counter() - start
    assert all(o["status"] == "finished" for o in outcomes), outcomes
    return seconds, sum(o["cpu_seconds"] for o in outcomes) / seconds


def started(executor, steps):
    """Enter ``executor`` and run the sweep once: the end-to-end seconds (start included)."""
    start = time.perf_counter()
    executor.__enter__()
    sweep_seconds(executor, steps)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds on warm workers")
    parser.add_argument("--steps", type=int, default=300, help="steps per run")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}, {os.cpu_count()} cores")
    bench_planning()

    end_to_end = {1: [], 2: [], "dask": []}
    for _ in range(2):  # fresh pools, alternated; the last ones stay for the warm rounds
        pools = {1: PoolExecutor(1), 2: PoolExecutor(2)}
        for n, pool in pools.items():
            end_to_end[n].append(started(pool, args.steps))
            if _ == 0:
                pool.__exit__(None, None, None)
    dask = DaskExecutor(n_local=2)
    end_to_end["dask"].append(started(dask, args.steps))
    end_to_end = {key: min(times) for key, times in end_to_end.items()}  # least disturbed
    warm, cores = {1: [], 2: [], "dask": []}, {1: [], 2: [], "dask": []}
    try:
        for _ in range(args.rounds):  # A/B alternated on the warm workers
            for key, executor in ((1, pools[1]), (2, pools[2]), ("dask", dask)):
                seconds, got = sweep_seconds(executor, args.steps)
                warm[key].append(seconds)
                cores[key].append(got)
    finally:
        for executor in (*pools.values(), dask):
            executor.__exit__(None, None, None)
    med = {key: statistics.median(times) for key, times in warm.items()}
    ratios = [a / b for a, b in zip(warm[1], warm[2])]
    print(f"{N_RUNS} runs x {args.steps} steps (MLP on digits), local pool, 1 vs 2 workers:")
    print(f"  end to end (worker start + first run's imports + 16 runs; best of 2): "
          f"1 worker {end_to_end[1]:.1f} s, 2 workers {end_to_end[2]:.1f} s, "
          f"speed-up {end_to_end[1] / end_to_end[2]:.2f}x")
    print(f"  warm, {args.rounds} A/B rounds: 1 worker {fmt(warm[1])} s, 2 workers {fmt(warm[2])} s, "
          f"speed-up per round {fmt(ratios, '.2f')}, median {statistics.median(ratios):.2f}x (target >= 1.7x)")
    print(f"  cores the runs got (their CPU seconds / wall): 1 worker {fmt(cores[1], '.2f')}, "
          f"2 workers {fmt(cores[2], '.2f')} (2.00 = both cores to ourselves)")
    print("Dask LocalCluster (2 loopback workers, 1 thread each) vs the pool of 2, same sweep:")
    print(f"  end to end: Dask {end_to_end['dask']:.1f} s, pool {end_to_end[2]:.1f} s")
    print(f"  warm: Dask {fmt(warm['dask'])} s vs pool {fmt(warm[2])} s: overhead per run "
          f"{(med['dask'] - med[2]) / N_RUNS * 1e3:+.0f} ms (medians; {med['dask'] / med[2]:.2f}x); "
          f"cores Dask {fmt(cores['dask'], '.2f')}")
    print(f"load average at end: {os.getloadavg()}")


def fmt(values, spec=".1f"):
    return "/".join(format(v, spec) for v in values)


if __name__ == "__main__":
    sys.exit(main())
