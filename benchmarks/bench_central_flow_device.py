"""The central flow without a Jacobian and on a device: what sizes the GPU run of
``analyses/central_flow_gpu.py`` (docs/findings/central_flow.md §8).

1. ``--solvers SETTING METHOD BETA STEPS ARMS`` (ARMS comma-separated ``SOLVER[@rtol]``, e.g.
   ``LSODA,RK23,RK45`` or ``RK23@1e-7,RK23,LSODA``; atol = rtol/1000, default rtol 1e-6; a
   suffix ``:fixed`` solves the entering event's eigenvalues at the loss's eig_tol, as before
   the adaptive tolerance, e.g. ``RK23:fixed,RK23``; ``:c0.3`` sets its factor c): the
   flow of ``analyses/central_flow.py``'s setting from w0 over STEPS training steps, read every
   10 steps, by each solver (LSODA gets the dense Hessian Jacobian, the explicit ones none):
   evaluations, HVPs, third-order passes, wall time, events, and the largest relative
   differences of the predictions from the first arm.
2. ``--cnn-cost``: the seed CNN of ``analyses/central_flow_gpu.py`` (GELU, no dropout, one-hot
   MSE, 1000 MNIST-1D examples) on the CPU: gradient, HVP, a batched block of 3, third-order
   pass (alternated, 3 repetitions), the first Lanczos, and a central-flow step (RK23, GD at
   S* = 2 λ_max(w0), 3 training steps from w0); with ``--dispatch``, the same single products
   on 1 and 10 examples (the per-call overhead that a GPU does not remove).
3. ``--cnn-events N_TRAIN STEPS``: that CNN on its first N_TRAIN examples, GD's central flow
   from w0 over STEPS steps (below the edge) with the entering event's eigen-solves at eig_tol
   and at the adaptive tolerance (``solve_central_flow(adaptive_eigs=...)``): HVPs per arm.
4. ``--cnn-sharpen``: plain float64 GD on that CNN at S* = 2 λ_max(w0) for 400 steps, λ_max/S*
   and the loss every 50 steps.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_central_flow_device.py --solvers linreg gd 0 1000 LSODA,RK23,RK45
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_central_flow_device.py --cnn-cost [--dispatch]
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_central_flow_device.py --cnn-events 100 40
"""

import json
import sys
import time

import numpy as np
import torch

from dynamics import central_flow as cf


def solvers(name, method, beta, steps, arms):
    from analyses.central_flow import EVERY, SETTINGS, lr_for, network_loss
    setting = SETTINGS[name]
    lr = lr_for(method, beta, setting.edge)
    probe = np.arange(0, steps, EVERY)
    out = {}
    for arm in arms:
        spec, _, path = arm.partition(":")
        ode, _, tol = spec.partition("@")
        rtol = float(tol or 1e-6)
        if path not in ("", "fixed") and not path.startswith("c"):
            raise ValueError(f"arm={arm!r}: the suffix after ':' must be 'fixed' (the event solves at eig_tol) "
                             "or cFACTOR (the adaptive tolerance's factor, e.g. c0.3)")
        adaptive = False if path == "fixed" else float(path[1:]) if path else True
        loss = network_loss(setting)
        t0 = time.perf_counter()
        f = cf.solve_central_flow(loss, loss.w0, method, lr, beta, lr * probe[-1], t_eval=lr * probe,
                                  max_edge=setting.max_edge, ode_method=ode, rtol=rtol, atol=1e-3 * rtol,
                                  adaptive_eigs=adaptive)
        sec = time.perf_counter() - t0
        nh, nt = loss.n_hvp, loss.n_third
        out[arm] = dict(f=f, p=cf.predict(loss, f, loss.blocks))
        print(json.dumps({"setting": name, "method": method, "beta": beta, "ode": arm, "seconds": round(sec, 1),
                          "nfev": f.nfev, "hvp": nh, "third": nt, "success": f.success,
                          "events_step": [(round(t / lr, 2), k, m) for t, k, m in f.events],
                          "rhs_evals_per_step": round(f.nfev / probe[-1], 3)}), flush=True)
    rel = lambda x, y: float(np.nanmax(np.abs(np.asarray(x) / np.asarray(y) - 1)))  # noqa: E731
    # each arm against the first, and an adaptive arm also against its ":fixed" twin
    pairs = [(arm, arms[0]) for arm in arms[1:]]
    pairs += [(arm, arm + ":fixed") for arm in arms if arm + ":fixed" in out and arms[0] != arm + ":fixed"]
    for arm, ref in pairs:
        a, b = out[ref], out[arm]
        print(json.dumps({
            "vs": f"{arm} vs {ref}", "same_active": bool(np.array_equal(a["f"].active, b["f"].active)),
            "same_event_kinds": [e[1:] for e in a["f"].events] == [e[1:] for e in b["f"].events],
            "event_t_rel": max([abs(x[0] / y[0] - 1) for x, y in zip(b["f"].events, a["f"].events)], default=0.0),
            "loss": rel(b["p"].loss, a["p"].loss), "sharpness": rel(b["p"].sharpness, a["p"].sharpness),
            "grad_sq": rel(b["p"].grad_sq, a["p"].grad_sq),
            "layer_grad_sq": rel(b["p"].block_grad_sq, a["p"].block_grad_sq),
            "sigma2_abs_over_max": float(np.max(np.abs(b["f"].sigma2 - a["f"].sigma2))
                                         / max(np.max(a["f"].sigma2), 1e-300)),
            "lag1_abs": float(np.nanmax(np.abs(b["p"].block_lag1 - a["p"].block_lag1))),
            "end_w_rel": float(np.linalg.norm(b["f"].w[-1] - a["f"].w[-1]) / np.linalg.norm(a["f"].w[-1] - a["f"].w[0]))}),
            flush=True)


def _products(loss, reps=3):
    w = loss.w0
    v = np.random.default_rng(0).standard_normal(w.size)
    block = torch.as_tensor(np.random.default_rng(1).standard_normal((w.size, 3)))
    arms = {"grad": lambda: loss.grad(w), "hvp": lambda: loss.hvp(w, v),
            "hvp_block3": lambda: loss._hvp_block(loss._t(w), block), "third": lambda: loss.grad_quadform(w, v, v)}
    res = {k: [] for k in arms}
    for _ in range(reps):  # alternated arms
        for k, f in arms.items():
            t = time.perf_counter()
            f()
            res[k].append(round(time.perf_counter() - t, 4))
    return res


def cnn_cost(dispatch=False):
    from analyses.central_flow_gpu import build_loss
    if dispatch:
        for n in (1, 10):
            loss, _ = build_loss("seed_cnn", "cpu", False, n_train=n)
            print(json.dumps({"n_train": n, **{f"{k}_s": v for k, v in _products(loss, 5).items()}}), flush=True)
        return
    loss, info = build_loss("seed_cnn", "cpu", False)
    print(json.dumps({"d": info["d"], **{f"{k}_s": v for k, v in _products(loss).items()}}), flush=True)
    t0, n0 = time.perf_counter(), loss.n_hvp
    lam0 = float(loss.top_eigs(loss.w0, 1)[0][0])
    print(json.dumps({"lam0": lam0, "first_lanczos_s": time.perf_counter() - t0, "hvps": loss.n_hvp - n0}), flush=True)
    lr, steps = 2.0 / (2 * lam0), 3
    n0, g0, t0 = loss.n_hvp, loss.n_grad, time.perf_counter()
    f = cf.solve_central_flow(loss, loss.w0, "gd", lr, 0.0, steps * lr, max_edge=2, ode_method="RK23",
                              rtol=1e-6, atol=1e-9)
    sec = time.perf_counter() - t0
    print(json.dumps({"flow_steps": steps, "seconds": sec, "nfev": f.nfev, "hvp": loss.n_hvp - n0,
                      "grads": loss.n_grad - g0, "s_per_training_step": sec / steps}), flush=True)


def _count_eig_calls(loss):
    """Wrap ``loss.top_eigs``: per number of eigenpairs asked (below the edge: 1 for the
    entering event, max_edge + 1 for the samples and the start), the calls and their HVPs."""
    calls, inner = {}, loss.top_eigs

    def top_eigs(w, k, tol=None):
        n0 = loss.n_hvp
        out = inner(w, k, tol=tol)
        c = calls.setdefault(f"k{k}", {"calls": 0, "loose": 0, "hvp": 0})
        c["calls"] += 1
        c["loose"] += tol is not None
        c["hvp"] += loss.n_hvp - n0
        return out
    loss.top_eigs = top_eigs
    return calls


def cnn_events(n_train, steps, arms=("fixed", "adaptive")):
    """The seed CNN's central flow below the edge with the entering event's eigen-solves at
    eig_tol (``fixed``) and at the adaptive tolerance: GD at S* = 2 λ_max(w0) (the factor the
    device run chose), RK23 at analyses.central_flow_gpu's tolerances, max_edge 2, samples
    every EVERY steps, one piece; HVPs, gradients, evaluations, seconds per arm (fresh loss
    each, same warm state), and the largest differences of the samples from the first arm."""
    from analyses.central_flow_gpu import ATOL, EVERY, ODE, RTOL, build_loss
    loss, info = build_loss("seed_cnn", "cpu", False, n_train=n_train)
    v = np.random.default_rng(0).standard_normal(loss.w0.size)
    t = time.perf_counter()
    for _ in range(3):
        loss.hvp(loss.w0, v)
    s_hvp = (time.perf_counter() - t) / 3
    lam0 = float(loss.top_eigs(loss.w0, 1)[0][0])
    lr = 1.0 / lam0
    t_eval = lr * np.arange(0, steps + 1, EVERY, dtype=float)
    print(json.dumps({"n_train": info["n_train"], "d": info["d"], "lam0": lam0, "edge": 2 * lam0, "s_per_hvp": s_hvp,
                      "steps": steps}), flush=True)
    out = {}
    for arm in arms:
        loss, _ = build_loss("seed_cnn", "cpu", False, n_train=n_train)
        calls = _count_eig_calls(loss)
        t0 = time.perf_counter()
        f = cf.solve_central_flow(loss, loss.w0, "gd", lr, 0.0, float(t_eval[-1]), t_eval=t_eval, max_edge=2,
                                  ode_method=ODE, rtol=RTOL, atol=ATOL, adaptive_eigs=arm == "adaptive")
        out[arm] = f
        print(json.dumps({"arm": arm, "seconds": round(time.perf_counter() - t0, 1), "nfev": f.nfev, "hvp": loss.n_hvp,
                          "grads": loss.n_grad, "third": loss.n_third, "lobpcg_fallbacks": loss.n_lobpcg_fallback,
                          "samples": int(f.t.size), "events": f.events, "eig_calls": calls,
                          "sharpness_over_edge": np.round(f.eigenvalues[:, 0] / (2 * lam0), 4).tolist()}), flush=True)
    a = out[arms[0]]
    for arm in arms[1:]:
        b = out[arm]
        print(json.dumps({"vs": f"{arm} vs {arms[0]}", "same_events": a.events == b.events,
                          "w_rel": float(np.max(np.linalg.norm(b.w - a.w, axis=1)) / np.linalg.norm(a.w[-1] - a.w[0])),
                          "sharpness_rel": float(np.max(np.abs(b.eigenvalues[:, 0] / a.eigenvalues[:, 0] - 1)))}),
              flush=True)


def cnn_sharpen(c=2.0, steps=400, every=50):
    """Plain float64 GD (no jitter) on the seed CNN at S* = c·λ_max(w0): λ_max/S* and the loss
    every ``every`` steps (does the edge come within the steps a device run can afford?)."""
    from analyses.central_flow_gpu import build_loss
    loss, _ = build_loss("seed_cnn", "cpu", False)
    edge = c * float(loss.top_eigs(loss.w0, 1)[0][0])
    lr, w, t0 = 2.0 / edge, torch.as_tensor(loss.w0.copy()), time.perf_counter()
    for k in range(steps + 1):
        value, g = loss.value_and_grad_t(w)
        if k % every == 0:
            lam = float(loss.top_eigs(loss._np(w), 1)[0][0])
            print(json.dumps({"c": c, "step": k, "loss": float(value), "sharpness_over_edge": lam / edge,
                              "seconds": round(time.perf_counter() - t0)}), flush=True)
        w = w - lr * g


if __name__ == "__main__":
    torch.set_num_threads(1)
    argv = sys.argv[1:]
    if argv[:1] == ["--solvers"] and len(argv) == 6:
        solvers(argv[1], argv[2], float(argv[3]), int(argv[4]), argv[5].split(","))
    elif argv[:1] == ["--cnn-sharpen"]:
        cnn_sharpen()
    elif argv[:1] == ["--cnn-events"] and len(argv) == 3:
        cnn_events(int(argv[1]), int(argv[2]))
    elif argv[:1] == ["--cnn-cost"]:
        cnn_cost("--dispatch" in argv)
    else:
        print("usage: " + " | ".join(x.strip() for x in __doc__.strip().splitlines()[-2:]), file=sys.stderr)
        sys.exit(2)
