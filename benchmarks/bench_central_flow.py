"""Benchmark of dynamics.central_flow: its cost per unit of training time against running the
discrete optimizer over the same time, as ratios within one run (A/B alternated, best of 2).

1. Toy (``sharpening_toy``, 6-D, closed-form derivatives; GD/HB/NAG at lr 0.01, β = 0.5, a
   horizon with an edge phase): wall time of ``solve_central_flow`` over that of the discrete
   run, the solver's right-hand-side evaluations and segments (events + 1).
2. ``--network``: the MLP of ``analyses/central_flow.py`` (249 parameters, 256 examples,
   float64, full batch; GD at lr 0.2 over 120 steps, edge from step 62): gradients, HVPs, third-derivative passes
   and wall time of the central flow per unit time t = k·lr, against one gradient per step of
   the discrete run through the same torch.func loss.

Measured (shared 2-core machine, load ~10): toy flow/discrete wall ratio 2.0 (GD), 3.1 (HB),
3.3 (NAG), 0.22-0.46 solver evaluations per discrete step, 3 segments (enter, leave);
network: ratio 282 (32.5 s vs 0.12 s for 120 steps), per unit time 25 gradients, 476 HVPs and
12 third-order passes against 5 gradients, 499 solver evaluations.

3. ``--hvp-cost`` (alone): one HVP of the scored MLPs and of the seed CNN on 1000 MNIST-1D
   examples, as a multiple of the linreg MLP's (to size a central flow of the CNN).

4. ``--flow-cost [linreg|digits_mse] [STEPS]`` (alone): the scored GD flow of that setting
   (``analyses/central_flow.py``: rtol 1e-6, probes every 10 steps) by the previous eigen
   path (Lanczos with deflation, residual 1e-9, all max_edge + 1 eigenpairs at every
   evaluation) and by the present one (warm LOBPCG at eig_tol = rtol/100, only the eigenpairs
   a segment needs), arms in the order old, new, new, old where time allows (``--abba``), else
   old, new: HVPs, third-derivative passes, evaluations and wall time as new/old ratios, and
   the largest relative differences of the predictions (loss, λ_max, ‖g‖², σ², per-layer
   lag-1) at the probes; with ``--yardstick`` also the new path at rtol 1e-7 (eig_tol 1e-9),
   whose difference from rtol 1e-6 is the integrator's own error at the scored tolerance
   (``--new-only``: only that comparison, without the old path).

   Measured (2000 steps, loaded 2-core machine): linreg HVPs 36,100 -> 18,943 (0.525), wall 0.550
   (arms old, new, new, old), predictions within 1.5e-5 (the integrator's own error at rtol 1e-6,
   against 1e-7: 1.2e-5); digits_mse HVPs 212,436 -> 141,640 (0.667), wall 0.32 (one pair),
   predictions within 4.5e-5.

Run: .venv/bin/python benchmarks/bench_central_flow.py [--network | --hvp-cost | --flow-cost SETTING [STEPS]]
"""

import sys
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from dynamics import central_flow as cf
from dynamics.methods import get_method


def discrete(loss, w0, method, lr, beta, steps):
    m = get_method(method)
    w, buf = np.array(w0, float), np.zeros_like(w0)
    for _ in range(steps):
        step, buf = m.update(loss.grad(w), buf, lr, beta)
        w = w + step
    return w


def best_of_two(fn_a, fn_b):
    times = {"a": [], "b": []}
    out = {}
    for _ in range(2):
        for key, fn in (("a", fn_a), ("b", fn_b)):
            t0 = time.perf_counter()
            out[key] = fn()
            times[key].append(time.perf_counter() - t0)
    return min(times["a"]), min(times["b"]), out


def toy():
    lr = 0.01
    for method, beta in (("gd", 0.0), ("hb", 0.5), ("nag", 0.5)):
        edge = float(cf.edge_sharpness(method, lr, beta))
        loss = cf.sharpening_toy(scale=edge / 2)
        horizon = 30.0 * (1 - beta)
        steps = int(round(horizon / lr))
        t_flow, t_disc, out = best_of_two(
            lambda: cf.solve_central_flow(loss, loss.w0, method, lr, beta, horizon, t_eval=[0.0, horizon]),
            lambda: discrete(loss, loss.w0, method, lr, beta, steps))
        flow = out["a"]
        print(f"toy {method}: central flow {t_flow:.2f} s, discrete {t_disc:.2f} s ({steps} steps): "
              f"ratio {t_flow / t_disc:.1f}; solver evaluations {flow.nfev} "
              f"({flow.nfev / steps:.2f} per discrete step), segments {flow.segments}")


def network():
    from analyses.central_flow import network_loss

    torch.set_num_threads(1)
    lr, steps = 0.2, 120  # the flow enters the edge at step 62
    loss = network_loss()
    loss.grad(loss.w0)  # warm up torch.func

    def run_flow():
        loss.n_grad = loss.n_hvp = loss.n_third = 0
        flow = cf.solve_central_flow(loss, loss.w0, "gd", lr, 0.0, lr * steps, t_eval=[0.0, lr * steps],
                                     max_edge=1, rtol=1e-6, atol=1e-9)
        return flow, (loss.n_grad, loss.n_hvp, loss.n_third)

    t_flow, t_disc, out = best_of_two(run_flow, lambda: discrete(loss, loss.w0, "gd", lr, 0.0, steps))
    flow, (n_grad, n_hvp, n_third) = out["a"]
    horizon = lr * steps
    print(f"network gd (d={loss.w0.size}, {steps} steps, events {[(round(t / lr), k) for t, k, _ in flow.events]}): "
          f"central flow {t_flow:.1f} s vs discrete {t_disc:.2f} s: ratio {t_flow / t_disc:.0f}; per unit time: "
          f"{n_grad / horizon:.0f} gradients, {n_hvp / horizon:.0f} HVPs, {n_third / horizon:.0f} third-order passes "
          f"(discrete: {steps / horizon:.0f} gradients); solver evaluations {flow.nfev}")


def hvp_cost(reps=5):
    """One HVP of the scored MLPs (linreg; digits with cross-entropy) and of the seed CNN on
    1000 MNIST-1D examples (eval mode: no dropout), arms alternated, median of ``reps`` after a
    warm-up: the CNN's cost as a multiple of the linreg MLP's, to size a central flow of it."""
    from analyses.central_flow import DIGITS, network_loss
    from experiments.runs.data import load_data
    from experiments.runs.models import build_model
    from experiments.trace.central_flow_loss import NetworkLoss

    torch.set_num_threads(1)
    data = load_data("mnist1d", n_train=1000)
    torch.manual_seed(0)
    cnn = build_model("seed-cnn", data.info).eval()
    losses = {"mlp linreg": network_loss(), "mlp digits": network_loss(DIGITS),
              "seed-cnn mnist1d": NetworkLoss(cnn, data.x_train, data.y_train, "classify")}
    rng = np.random.default_rng(0)
    times = {k: [] for k in losses}
    for _ in range(reps + 1):
        for name, loss in losses.items():
            v = rng.standard_normal(loss.w0.size)
            t0 = time.perf_counter()
            loss.hvp(loss.w0, v)
            times[name].append(time.perf_counter() - t0)
    base = np.median(times["mlp linreg"][1:])
    for name, loss in losses.items():
        t = np.median(times[name][1:])
        print(f"{name}: {loss.w0.size} parameters, {t * 1e3:.1f} ms per HVP, {t / base:.1f}x the linreg MLP's")


def _flow_arm(setting, path, steps, rtol):
    """One GD flow of ``setting`` as analyses/central_flow.py solves it, by the eigen ``path``
    ("old" or "new"): the flow, its predictions at the probes, counters and wall time."""
    from analyses.central_flow import EVERY, lr_for, network_loss

    loss = network_loss(setting)
    if path == "old":
        loss.eig_solver, loss.lanczos_tol = "lanczos", 1e-9
    else:
        loss.eig_solver, loss.eig_tol = "lobpcg", rtol / 100
    lr = lr_for("gd", 0.0, setting.edge)
    t_eval = lr * np.arange(0, steps, EVERY)
    loss.grad(loss.w0)  # warm up torch.func
    loss.n_grad = loss.n_hvp = loss.n_third = 0
    t0 = time.perf_counter()
    flow = cf.solve_central_flow(loss, loss.w0, "gd", lr, 0.0, float(t_eval[-1]), t_eval=t_eval,
                                 max_edge=setting.max_edge, rtol=rtol, atol=rtol * 1e-3, lazy_eigs=path == "new")
    seconds = time.perf_counter() - t0
    counts = {"hvp": loss.n_hvp, "third": loss.n_third, "grad": loss.n_grad, "nfev": flow.nfev,
              "fallbacks": getattr(loss, "n_lobpcg_fallback", 0)}
    pred = cf.predict(loss, flow, loss.blocks)
    out = {"loss": pred.loss, "sharpness": pred.sharpness, "grad_sq": pred.grad_sq, "sigma2": pred.sigma2,
           "layer_grad_sq": pred.block_grad_sq, "lag1": pred.block_lag1}
    return flow, out, counts, seconds


def _differences(a, b, fa, fb):
    """Largest relative differences of the predictions of two flows at the probes (σ² and
    lag-1 where both flows are at the edge; lag-1 as an absolute difference), and the events."""
    both = (fa.active > 0) & (fb.active > 0)
    out = {}
    for key in ("loss", "sharpness", "grad_sq", "layer_grad_sq"):
        out[key] = float(np.nanmax(np.abs(a[key] / b[key] - 1)))
    out["sigma2"] = float(np.max(np.abs(a["sigma2"][both] / b["sigma2"][both] - 1))) if both.any() else np.nan
    out["lag1_abs"] = float(np.nanmax(np.abs(a["lag1"][both] - b["lag1"][both]))) if both.any() else np.nan
    out["active_disagree"] = int(np.sum(fa.active != fb.active))
    return out


def flow_cost(name, steps, abba=False, yardstick=False, new_only=False):
    from analyses.central_flow import SETTINGS

    torch.set_num_threads(1)
    setting = SETTINGS[name]
    arms = ["new"] if new_only else ["old", "new", "new", "old"] if abba else ["old", "new"]
    res = {"old": [], "new": []}
    for path in arms:
        flow, pred, counts, seconds = _flow_arm(setting, path, steps, 1e-6)
        res[path].append((flow, pred, counts, seconds))
        print(f"{name} {steps} steps, {path} path: {seconds:.0f} s, {counts}, "
              f"events {[(round(t / flow.lr), k, m) for t, k, m in flow.events]}", flush=True)
    fn, pn, cn, sn = res["new"][0]
    if new_only:
        fy, py, cy, sy = _flow_arm(setting, "new", steps, 1e-7)
        print(f"{name}: new path at rtol 1e-7: {sy:.0f} s, {cy}; against rtol 1e-6: {_differences(pn, py, fn, fy)}")
        return
    fo, po, co, so = res["old"][0]
    t_old = np.mean([r[3] for r in res["old"]])
    t_new = np.mean([r[3] for r in res["new"]])
    print(f"{name}: new/old HVPs {cn['hvp'] / co['hvp']:.3f}, third-order passes {cn['third'] / co['third']:.3f}, "
          f"evaluations {cn['nfev'] / co['nfev']:.3f}, wall {t_new / t_old:.3f} (means over the arms); "
          f"HVPs per evaluation {co['hvp'] / co['nfev']:.1f} -> {cn['hvp'] / cn['nfev']:.1f}")
    print(f"{name}: new vs old, largest relative differences at the probes {_differences(pn, po, fn, fo)}")
    if yardstick:
        fy, py, cy, sy = _flow_arm(setting, "new", steps, 1e-7)
        print(f"{name}: new path at rtol 1e-7: {sy:.0f} s, {cy}; against rtol 1e-6 (new): "
              f"{_differences(pn, py, fn, fy)}; against old: {_differences(po, py, fo, fy)}", flush=True)


if __name__ == "__main__":
    with threadpool_limits(1):
        if "--hvp-cost" in sys.argv[1:]:
            hvp_cost()
            sys.exit()
        if "--flow-cost" in sys.argv[1:]:
            i = sys.argv.index("--flow-cost")
            rest = [a for a in sys.argv[i + 1:] if not a.startswith("--")]
            flow_cost(rest[0] if rest else "linreg", int(rest[1]) if len(rest) > 1 else 2000,
                      abba="--abba" in sys.argv, yardstick="--yardstick" in sys.argv,
                      new_only="--new-only" in sys.argv)
            sys.exit()
        toy()
        if "--network" in sys.argv[1:]:
            network()
