"""Benchmark of the noisy-quadratic-model code (prints measured ratios; not a test).

1. Stationary gradient statistics over a 10^6-point (h, beta) grid: the closed forms
   (``stationary_gradient_moments``) vs scipy.linalg.solve_discrete_lyapunov per point
   (timed on a sample, extrapolated), and vs the batched 2x2 Kronecker solve
   (``gradient_autocovariance``). Rounds alternate A/B; medians reported.
2. Monte-Carlo throughput (mode-steps/s) of ``monte_carlo`` vs the memory-bandwidth bound of
   the same state traffic, with the bandwidth measured in the same run by a streaming numpy
   add over arrays of the same size, and the share of time spent drawing normals.

Run: .venv/bin/python benchmarks/bench_stochastic.py
"""

import time

import numpy as np
import scipy.linalg

from dynamics.nqm import stationary as st
from dynamics.nqm.montecarlo import monte_carlo
from dynamics.quadratic import stability_edge

N_GRID, N_SAMPLE, ROUNDS = 10**6, 300, 3


def grid(method, n):
    rng = np.random.default_rng(0)
    beta = rng.uniform(0.0, 0.99, n)
    h = rng.uniform(0.01, 0.99, n) * stability_edge(method, beta)
    return h, beta


def closed_forms(method, h, beta):
    out = st.stationary_gradient_moments(method, 1.0, h, beta, 1.0)
    return out.grad_sq, out.lag1


def batched_kron(method, h, beta):
    gam = st.gradient_autocovariance(method, 1.0, h, beta, 1.0, [0, 1])
    return gam[..., 0], gam[..., 1]


def scipy_per_point(method, h, beta):
    res = np.empty((2, h.size))
    for i, (hh, bb) in enumerate(zip(h, beta)):
        A, B = st.state_space(method, 1.0, hh, bb)
        P = scipy.linalg.solve_discrete_lyapunov(A, np.outer(B, B))
        u = A @ P[:, 0] + B
        res[:, i] = P[0, 0] + 1.0, u[0]
    return res


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def bench_grid():
    print(f"== stationary statistics on a {N_GRID:.0e}-point (h, beta) grid ==")
    for method in ("gd", "hb", "nag"):
        h, beta = grid(method, N_GRID)
        t_cf, t_kr, t_sp = [], [], []
        for _ in range(ROUNDS):  # alternate the three so load changes hit all alike
            dt, (gs, l1) = timed(closed_forms, method, h, beta)
            t_cf.append(dt)
            dt, (gk, lk) = timed(batched_kron, method, h, beta)
            t_kr.append(dt)
            dt, ref = timed(scipy_per_point, method, h[:N_SAMPLE], beta[:N_SAMPLE])
            t_sp.append(dt * N_GRID / N_SAMPLE)
        err = max(np.abs(gs[:N_SAMPLE] - ref[0]).max() / ref[0].max(),
                  np.abs(l1[:N_SAMPLE] - ref[1]).max() / ref[0].max(),
                  np.abs(gk - gs).max() / gs.max())
        cf, kr, sp = np.median(t_cf), np.median(t_kr), np.median(t_sp)
        print(f"{method:4s} closed form {cf:7.3f} s | batched 2x2 Kronecker {kr:7.3f} s | "
              f"scipy per point {sp:8.1f} s (from {N_SAMPLE} points) | "
              f"scipy/closed {sp / cf:9.0f}x, kron/closed {kr / cf:5.1f}x | max rel diff {err:.1e}")


def bench_monte_carlo(chains=1000, modes=1000, steps=60):
    print(f"== Monte-Carlo throughput: {chains} chains x {modes} modes x {steps} steps (HB) ==")
    lam = np.linspace(0.1, 3.0, modes)
    n = chains * modes
    a, b, c = (np.random.default_rng(i).standard_normal(n) for i in range(3))
    rng = np.random.default_rng(0)
    t_mc, t_add, t_rng = [], [], []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        monte_carlo("hb", lam, 1.0, 0.9, 1.0, steps=steps, chains=chains, seed=1)
        t_mc.append((time.perf_counter() - t0) / (steps * n))
        t0 = time.perf_counter()
        for _ in range(10):
            np.add(a, b, out=c)  # streams 3 arrays of 8 bytes per element
        t_add.append((time.perf_counter() - t0) / (10 * n))
        t0 = time.perf_counter()
        for _ in range(10):
            rng.standard_normal(out=c)
        t_rng.append((time.perf_counter() - t0) / (10 * n))
    per_mode_step, per_add, per_rng = np.median(t_mc), np.median(t_add), np.median(t_rng)
    bandwidth = 24 / per_add  # bytes/s
    # Unavoidable traffic per mode-step: read + write x, buffer, previous gradient and the
    # three accumulators = 6 arrays x 2 x 8 bytes, plus writing the fresh noise (8 bytes).
    bytes_needed = 6 * 2 * 8 + 8
    bound = bandwidth / bytes_needed
    print(f"streaming add bandwidth {bandwidth / 1e9:6.2f} GB/s -> bound {bound / 1e6:7.1f} M mode-steps/s")
    print(f"monte_carlo            {1 / per_mode_step / 1e6:7.1f} M mode-steps/s = "
          f"{(1 / per_mode_step) / bound:5.1%} of the bandwidth bound")
    print(f"normal draws alone     {1 / per_rng / 1e6:7.1f} M/s = {per_rng / per_mode_step:5.1%} "
          f"of the Monte-Carlo time per mode-step")


if __name__ == "__main__":
    bench_grid()
    bench_monte_carlo()
