"""Spectral radius + regime over a 10^7-point (h, momentum) grid, as ratios measured in
one run (issue 2): throughput against the trivial expression np.sqrt(h*h + b) on the same
arrays (target >= 0.5), against a per-point np.linalg.eigvals loop extrapolated from a
sample (target >= 200), and peak extra memory in units of one grid-sized float64 array
(target <= 4, tracemalloc: numpy reports its allocations to it).

A and B are alternated REPEATS times and the median ratio is printed, both for CPU time of
this process (robust to other processes on a shared machine) and for wall time.

    .venv/bin/python benchmarks/bench_quadratic.py
"""

import time
import tracemalloc

import numpy as np

from dynamics.quadratic import iteration_matrix, spectral_radius

SIDE = 3163  # SIDE^2 = 1.0005e7 points
REPEATS = 7
SAMPLE = 3000  # points in the eigvals loop


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.process_time() - c, time.perf_counter() - w


def peak_extra(fn, unit):
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    out = fn()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del out
    return peak / unit


def bench(method, h, b, label):
    ours = lambda: spectral_radius(method, h, b, return_regime=True)  # noqa: E731
    trivial = lambda: np.sqrt(h * h + b)  # noqa: E731
    cpu, wall = [], []
    for _ in range(REPEATS):
        t_triv, t_ours = timed(trivial), timed(ours)
        cpu.append(t_triv[0] / t_ours[0])
        wall.append(t_triv[1] / t_ours[1])
    n = np.broadcast_shapes(h.shape, b.shape)
    n = int(np.prod(n))
    mem = peak_extra(ours, 8 * n)
    print(f"{method} {label}: throughput vs np.sqrt(h*h+b): CPU {np.median(cpu):.2f}x, "
          f"wall {np.median(wall):.2f}x (target >= 0.5); "
          f"peak extra memory {mem:.2f} arrays (trivial: {peak_extra(trivial, 8 * n):.2f}; target <= 4)")
    return t_ours


def eigvals_ratio(method, h, b):
    rng = np.random.default_rng(0)
    idx = rng.integers(0, h.size, SAMPLE)
    T = iteration_matrix(method, h.reshape(-1)[idx], b.reshape(-1)[idx])
    loop = lambda: [np.abs(np.linalg.eigvals(t)).max() for t in T]  # noqa: E731
    ours = lambda: spectral_radius(method, h, b, return_regime=True)  # noqa: E731
    cpu, wall = [], []
    for _ in range(3):
        t_loop, t_ours = timed(loop), timed(ours)
        cpu.append(t_loop[0] * h.size / SAMPLE / t_ours[0])
        wall.append(t_loop[1] * h.size / SAMPLE / t_ours[1])
    print(f"{method}: vs per-point np.linalg.eigvals loop (extrapolated from {SAMPLE} points): "
          f"CPU {np.median(cpu):.0f}x, wall {np.median(wall):.0f}x (target >= 200)")


def main():
    hs, bs = np.linspace(0.0, 5.0, SIDE), np.linspace(0.0, 0.999, SIDE)
    h_full, b_full = (np.ascontiguousarray(a) for a in np.meshgrid(hs, bs))
    print(f"grid {SIDE}x{SIDE} = {h_full.size:.4g} points, h in [0, 5], momentum in [0, 0.999]")
    for method in ("hb", "nag"):
        bench(method, h_full, b_full, "full arrays")
        bench(method, hs[None, :], bs[:, None], "broadcast axes")
        eigvals_ratio(method, h_full, b_full)


if __name__ == "__main__":
    main()
