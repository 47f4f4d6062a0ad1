"""Benchmark of dynamics.modified.

1. Time to produce the ``modified_accuracy`` figure's data in quick mode (HB and NAG, all
   three ODEs, both starts, 8 learning rates, a d = 100 quadratic and logistic regression,
   plus the breakdown panel); target < 10 s. Two repetitions; the split between the discrete
   iteration and the ODE solves is measured inside the same runs.
2. Cost of the adaptive solver (solve_ivp, the module's default method and rtol 1e-9) per
   unit time horizon, against a fixed-step classical RK4 that reaches the same error on the
   same ODE (d = 100 quadratic, HB, β = 0.9, exact solution by scipy.linalg.expm).

Run: .venv/bin/python benchmarks/bench_modified.py
"""

import time

import numpy as np
import scipy.linalg
from threadpoolctl import threadpool_limits

import dynamics.modified as md
from paper_figures import modified_accuracy as fig

BETA, HORIZON = 0.9, 0.5


def time_figure_data(repeats=2):
    timers = {"iterate": 0.0, "solve_flow": 0.0}
    originals = {name: getattr(md, name) for name in timers}

    def timed(name):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return originals[name](*args, **kwargs)
            finally:
                timers[name] += time.perf_counter() - t0
        return wrapper

    totals, cpu = [], []
    try:
        for name in timers:
            setattr(md, name, timed(name))
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            fig.order_study(d=100, n_lr=8, h_ratio_max=0.15, span=8.0)
            fig.breakdown_study(17)
            totals.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    finally:
        for name, fn in originals.items():
            setattr(md, name, fn)
    total = sum(totals)
    print(f"figure data (quick: d=100 quadratic + logistic, HB+NAG, 8 lrs, 3 ODEs x 2 starts, "
          f"breakdown 17 h): wall {', '.join(f'{t:.2f}' for t in totals)} s; "
          f"CPU {', '.join(f'{t:.2f}' for t in cpu)} s  (target < 10 s; wall > CPU = shared cores)")
    print(f"  share of the time: discrete iteration {timers['iterate'] / total:.0%}, "
          f"ODE solves {timers['solve_flow'] / total:.0%}")


def linear_system(kind, a, lr, beta):
    """M with y' = M y for each ODE on f = ½xᵀAx (HB)."""
    d = a.shape[0]
    if kind == "first_order":
        return -a / (1 - beta)
    if kind == "modified_loss":
        c = float(md.modified_loss_coefficient("hb", lr, beta))
        return -(a + 2 * c * a @ a) / (1 - beta)
    k = 2 / (lr * (1 + beta))
    return np.block([[np.zeros((d, d)), np.eye(d)], [-k * a, -k * (1 - beta) * np.eye(d)]])


def rk4(m, y0, horizon, n):
    """Classical fixed-step RK4 on y' = M y; returns y at t = horizon and 4n evaluations."""
    y, dt = y0.copy(), horizon / n
    with np.errstate(over="ignore", invalid="ignore"):  # unstable step sizes blow up: expected
        return _rk4_loop(m, y, dt, n)


def _rk4_loop(m, y, dt, n):
    for _ in range(n):
        k1 = m @ y
        k2 = m @ (y + 0.5 * dt * k1)
        k3 = m @ (y + 0.5 * dt * k2)
        k4 = m @ (y + dt * k3)
        y = y + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if not np.isfinite(y).all():
            return np.full_like(y, np.inf)
    return y


def rk4_steps_for(m, y0, horizon, exact, target):
    """Fewest steps (to 5%) for which RK4's error at the horizon is <= target."""
    n = 8
    while True:
        with np.errstate(over="ignore", invalid="ignore"):
            err = np.linalg.norm(rk4(m, y0, horizon, n)[: exact.size] - exact)
        if err <= target:
            break
        n *= 2
    lo, hi = n // 2, n
    while hi - lo > max(1, lo // 20):
        mid = (lo + hi) // 2
        with np.errstate(over="ignore", invalid="ignore"):
            ok = np.linalg.norm(rk4(m, y0, horizon, mid)[: exact.size] - exact) <= target
        lo, hi = (lo, mid) if ok else (mid, hi)
    return hi


def solver_cost(lrs=(1e-4, 1e-5), rtol=1e-9, atol=1e-12):
    name, loss, x0, _ = fig.problems(100)[0]
    a = loss.hessian(None)
    print(f"\nsolver cost per unit horizon, d=100 quadratic (eigenvalues 0.1..1), HB, beta={BETA}, "
          f"horizon {HORIZON}; solve_ivp rtol={rtol:g}, atol={atol:g} vs fixed-step RK4 at the same error")
    print(f"{'lr':>8} {'ODE':>14} {'method':>7} {'nfev/T':>9} {'RK4 nfev/T':>11} {'ratio':>7} "
          f"{'error':>9} {'discrete steps/T':>16}")
    for lr in lrs:
        for kind in md.KINDS:
            m = linear_system(kind, a, lr, BETA)
            y0 = x0 if kind != "inertial" else np.concatenate([x0, -a @ x0 / (1 - BETA)])
            with threadpool_limits(1, user_api="blas"):
                sol = md.solve_flow(kind, loss, x0, "hb", lr, BETA, HORIZON, rtol=rtol, atol=atol)
                exact = (scipy.linalg.expm(m * sol.t[-1]) @ y0)[: x0.size]
                err = np.linalg.norm(sol.x[-1] - exact)
                n = rk4_steps_for(m, y0, sol.t[-1], exact, err)
            print(f"{lr:8.0e} {kind:>14} {md.DEFAULT_ODE_METHOD[kind]:>7} {sol.nfev / HORIZON:9.0f} "
                  f"{4 * n / HORIZON:11.0f} {4 * n / sol.nfev:7.2f} {err:9.1e} {1 / lr:16.0f}")


if __name__ == "__main__":
    time_figure_data()
    solver_cost()
