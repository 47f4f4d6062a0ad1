"""The central flow against full-batch discrete runs on a network too large for a dense Jacobian:
the seed CNN on 1000 MNIST-1D examples (then, if the budget allows, the ResNet on 4000), on a
device::

    python -m analyses central_flow_gpu --device cuda --out DIR --budget-s 300
    python -m analyses central_flow_gpu --device cpu --out /tmp/cfq --budget-s 100 --quick   (tiny, end to end)

Everything in float64 on ``--device`` (:class:`experiments.trace.central_flow_loss.NetworkLoss`).
Per model, in this order, each result written at once to ``DIR/<model>.json`` (atomically), so
a run stopped by the budget keeps what finished:

1. **lr by a fixed rule** (written before any device run): the edge S* is a multiple c of the
   top Hessian eigenvalue λ₀ at the initialisation, c from ``EDGE_FACTORS`` in turn; for each, a
   discrete GD run of ``--steps`` steps (fewer if the budget needs them: :func:`planned_steps`;
   λ_max every ``EVERY`` steps); the first whose λ_max settles (:func:`analyses.central_flow.settled_from`: the final stretch of probes within
   ``SETTLE_TOL`` of S* covers at least a tenth of them) is taken; if none does, the one whose
   last-fifth λ_max/S* lies closest to 1 (and ``settled: false`` says so). The momentum runs
   use the same S* (lr = h*/S*).
2. GD: the central flow (explicit ``RK23``: no Jacobian; the stiff solver's dense one is
   d HVPs per call) and the gradient flow, then the scores.
3. Each of ``MOMENTA`` (NAG 0.3, then HB 0.2: the digits_mse momenta): discrete run, gradient
   flow, central flow, scores.

Discrete runs: PyTorch's update rule (:meth:`dynamics.methods.Method.update`) on the device in
float64, buffer started on the slow manifold ∇L/(1−β) (so no start lag), with Gaussian jitter
``dynamics.central_flow.JITTER`` per step as :func:`dynamics.central_flow.discrete_run` (in
float64 the period-2 mode otherwise decays to ~1e-30 before the edge). Scores as in
:mod:`analyses.central_flow` (:func:`~analyses.central_flow.phase_scores` over the probes from
step 20, the flow's edge phase and the second half; window means over ``EVERY`` steps centred
on each probe; lag-1 per layer Σg_t·g_{t−1}/sqrt(Σ|g_t|²Σ|g_{t−1}|²)), plus the issue's targets
(``targets``): loss within 5 % and ≤ 1/5 of the gradient flow's error, sharpness within 5 % at
the edge, ‖g‖² within 10 % (network) / 20 % (every layer), lag-1 Spearman ≥ 0.9, end distance
≤ 0.2× the gradient flow's.

Models: the seed CNN with GELU (smooth; the seed's leaky ReLU makes the flow's right-hand side
jump at every kink) and no dropout (a deterministic loss), cross-entropy; the ResNet (width 16)
with BatchNorm on full-batch statistics in train mode and no running buffers
(``torch.func.replace_all_batch_norm_modules_``: the loss is a function of w alone) and GELU in
place of its ReLU (smooth, as for the CNN; docs/findings/central_flow.md §8).

Budget: ``--budget-s`` is wall time from the start; the loss refuses every call after the
deadline less ``MARGIN_S`` (raising :class:`OutOfBudget`), the discrete loop checks it per step,
and no stage starts with less than ``MIN_STAGE_S`` left. The central flow runs in ``CHUNKS``
restarted pieces (:func:`chunked_flow`) and keeps back the time its scores need (~3 gradients
per probe), so a flow stopped by the budget is scored over the probes it reached
(``flow_cost.probes_reached``); a stage stopped before its first piece is recorded as
interrupted, never half-scored.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import solve_ivp

from analyses.central_flow import late_averages, phase_scores, settled_from
from dynamics import central_flow as cf
from dynamics.methods import get_method
from experiments import store
from experiments.runs.data import load_data
from experiments.runs.models import build_model
from experiments.trace.central_flow_loss import LOSSES, NetworkLoss

EVERY = 10
EDGE_FACTORS = (2.0, 3.0, 5.0)  # S* = c·λ₀, tried in this order
SETTLE_TOL = 0.05
MOMENTA = (("nag", 0.3), ("hb", 0.2))  # NAG first: HB's self-stabilisation cycles damp slowest (findings §1, §2b)
MARGIN_S, MIN_STAGE_S = 10.0, 20.0
# the explicit solver's work per training step on the seed CNN below the edge, with the
# adaptive entering events (findings §8, `bench_central_flow_device.py --cnn-events 100 60`):
# 194 evaluations and 1447 HVPs over 60 steps (the linreg MLP's flow, before the adaptive
# events: 2.8 evaluations and 11 HVPs per evaluation)
EVALS_PER_STEP, HVPS_PER_EVAL = 3.2, 7.5
PROBE_HVPS = 20  # a warm LOBPCG call for λ_max (27 HVPs for the CNN's first warm call, §8)
GD_SHARE, MIN_STEPS = 0.6, 3 * EVERY
ODE, RTOL, ATOL = "RK23", 1e-6, 1e-9
CHUNKS, RESTART_EDGE_RTOL = 5, 1e-5
MODELS = {  # name: (n_train, build args, quick build args)
    "seed_cnn": (1000, dict(name="seed-cnn", activation="gelu", dropout=0.0),
                 dict(name="seed-cnn", activation="gelu", dropout=0.0, channels=4, hidden=16)),
    "resnet": (4000, dict(name="resnet", width=16, activation="gelu"), dict(name="resnet", width=2, activation="gelu")),
}


class OutOfBudget(RuntimeError):
    pass


class Budget:
    def __init__(self, seconds):
        self.start, self.seconds = time.monotonic(), float(seconds)

    def left(self):
        return self.seconds - MARGIN_S - (time.monotonic() - self.start)

    def check(self, reserve=0.0):
        if self.left() <= reserve:
            raise OutOfBudget(f"budget of {self.seconds:g} s (less {MARGIN_S:g} s margin"
                              f"{f' and {reserve:.0f} s for the scores' if reserve else ''}) spent")


class BudgetedLoss:
    """The loss, every oracle call refused once the budget (less ``reserve``) is spent."""

    CALLS = ("value", "grad", "hvp", "top_eigs", "grad_quadform", "grad_sharpness", "value_and_grad_t")

    def __init__(self, loss, budget):
        self._loss, self._budget = loss, budget
        self.reserve = 0.0  # seconds kept back (for scoring what finished)

    def __getattr__(self, name):
        attr = getattr(self._loss, name)
        if name in self.CALLS:
            def call(*a, **k):
                self._budget.check(self.reserve)
                return attr(*a, **k)
            return call
        return attr


def build_loss(model, device, quick, loss_name="onehot_mse", n_train=None):
    """The model's NetworkLoss on its first examples (``n_train`` overrides the number)."""
    n, args, quick_args = MODELS[model]
    args = dict(quick_args if quick else args)
    n = n_train or (64 if quick else n)
    data = load_data("mnist1d")
    torch.manual_seed(0)
    net = build_model(args.pop("name"), data.info, **args)
    if model == "resnet":
        torch.func.replace_all_batch_norm_modules_(net)
    loss = NetworkLoss(net, data.x_train[:n], data.y_train[:n], "classify", lanczos_iters=60, lanczos_tol=1e-9,
                       eig_solver="lobpcg", eig_tol=1e-8, device=device, loss_fn=LOSSES[loss_name])
    return loss, {"model": model, "n_train": n, "d": int(loss.w0.size), "loss": loss_name,
                  "build": {**args, "n_train": n}, "layers": loss.layers}


def discrete(loss, method, beta, lr, steps, budget, seed=0):
    """Full-batch run on the device; per step the loss, per-layer |g|² and g_t·g_{t−1}; λ_max at
    every probe k = 0, EVERY, .., steps (at w_k); w_k and w_{k±1} at every probe (on the host)."""
    m = get_method(method)
    dev = loss.device
    w = torch.as_tensor(loss.w0, dtype=torch.float64, device=dev)
    gen = torch.Generator(dev).manual_seed(seed)
    value, g = loss.value_and_grad_t(w)
    buf = g / (1 - beta) if m.has_momentum else torch.zeros_like(g)
    values, sq, dots, sharp, around = [], [], [], [], {}
    prev = None
    blocks = loss.blocks
    for k in range(steps + 2):  # w_0 .. w_{steps+1}: the last one for the period-2 filter at the end
        budget.check()
        values.append(value.detach())
        sq.append(torch.stack([(g[b] ** 2).sum() for b in blocks]))
        dots.append(torch.stack([(g[b] * prev[b]).sum() for b in blocks]) if prev is not None
                    else torch.full((len(blocks),), float("nan"), device=dev, dtype=torch.float64))
        if k % EVERY == 0 and k <= steps:
            if not torch.isfinite(value):
                return {"diverged_at": k}
            sharp.append(float(loss.top_eigs(loss._np(w), 1)[0][0]))
        if k % EVERY in (0, 1, EVERY - 1):  # each probe's iterate and its neighbours (the period-2 filter)
            around[k] = loss._np(w)
        if k == steps + 1:
            break
        step, buf = m.update(g, buf, lr, beta)
        w = w + step + cf.JITTER * torch.randn(w.shape, generator=gen, dtype=w.dtype, device=dev)
        prev = g
        value, g = loss.value_and_grad_t(w)
    return {"loss": torch.stack(values).cpu().numpy(), "sq": torch.stack(sq).cpu().numpy(),
            "dots": torch.stack(dots).cpu().numpy(), "sharpness": np.array(sharp), "around": around,
            "probe_steps": np.arange(0, steps + 1, EVERY)}


def window(x, probes, width=EVERY):
    return np.array([np.nanmean(x[max(p - width // 2, 0): p + (width + 1) // 2], axis=0) for p in probes])


def lag1(run, probes, width=EVERY):
    """Per probe and layer: Σ g_t·g_{t−1} / sqrt(Σ|g_t|² Σ|g_{t−1}|²) over the window (t ≥ 1)."""
    out = []
    for p in probes:
        lo, hi = max(p - width // 2, 1), p + (width + 1) // 2
        out.append(run["dots"][lo:hi].sum(0) / np.sqrt(run["sq"][lo:hi].sum(0) * run["sq"][lo - 1:hi - 1].sum(0)))
    return np.array(out)


def settle(sharpness, edge):
    ratio = np.asarray(sharpness) / edge
    tail = ratio[-max(ratio.size // 5, 1):]
    return {"settled_from_step": settled_from(ratio, SETTLE_TOL, EVERY), "max_over_edge": float(ratio.max()),
            "last_fifth_over_edge_mean": float(tail.mean()),
            "last_fifth_over_edge_range": [float(tail.min()), float(tail.max())]}


def chunked_flow(loss, method, beta, lr, t_eval, max_edge, chunks=None):
    """The central flow over ``t_eval`` in ``CHUNKS`` consecutive pieces, each restarted from the
    last one's end, so that a flow stopped by the budget still gives its first pieces (the
    restart drops only the solver's step-size history; the edge set is recomputed there, with
    ``RESTART_EDGE_RTOL`` so that an eigenvalue held at S* to the solver's tolerance counts as at
    the edge). Returns the joined :class:`dynamics.central_flow.CentralFlow` and the number of
    pieces done; raises OutOfBudget only if not even the first piece finished."""
    parts, start, t0 = [], loss.w0, 0.0
    later = np.arange(1, t_eval.size)  # t_eval[0] = 0 goes with the first piece
    pieces = np.array_split(later, max(min(chunks or CHUNKS, later.size), 1))
    pieces[0] = np.concatenate([[0], pieces[0]]).astype(int)
    for i, idx in enumerate(pieces):
        ts = t_eval[idx] - t0
        try:
            f = cf.solve_central_flow(loss, start, method, lr, beta, float(ts[-1]), t_eval=ts, max_edge=max_edge,
                                      ode_method=ODE, rtol=RTOL, atol=ATOL,
                                      edge_rtol=RESTART_EDGE_RTOL if i else 1e-6)
        except OutOfBudget:
            if not parts:
                raise
            break
        parts.append((t0, f))
        if not f.success:
            break
        start, t0 = f.w[-1], float(t_eval[idx[-1]])
    return join_flows(parts), len(parts)


def join_flows(parts):
    """One CentralFlow from pieces (offset, flow): times and events shifted, the edge basis and
    Σ zero-padded to the widest piece."""
    width = max(f.sigma.shape[1] for _, f in parts)
    pad = lambda a, axes: np.pad(a, [(0, 0)] + [(0, width - a.shape[ax]) if ax in axes else (0, 0)  # noqa: E731
                                                for ax in range(1, a.ndim)])
    last = parts[-1][1]
    return cf.CentralFlow(
        t=np.concatenate([t0 + f.t for t0, f in parts]), w=np.concatenate([f.w for _, f in parts]),
        eigenvalues=np.concatenate([f.eigenvalues for _, f in parts]),
        sigma=np.concatenate([pad(f.sigma, (1, 2)) for _, f in parts]),
        vectors=np.concatenate([pad(f.vectors, (2,)) for _, f in parts]),
        active=np.concatenate([f.active for _, f in parts]), grad_mean=np.concatenate([f.grad_mean for _, f in parts]),
        edge=last.edge, method=last.method, lr=last.lr, momentum=last.momentum,
        events=[(t0 + t, kind, m) for t0, f in parts for t, kind, m in f.events],
        nfev=sum(f.nfev for _, f in parts), segments=sum(f.segments for _, f in parts),
        success=all(f.success for _, f in parts), message=last.message)


def flows(loss, method, beta, lr, probes, max_edge=2):
    """The gradient flow, then the central flow (explicit RK23), at t = lr·k (probe steps k), with
    their cost."""
    t_eval = lr * probes.astype(float)
    t0, g0 = time.perf_counter(), loss.n_grad
    gf = solve_ivp(lambda t, w: -loss.grad(w) / (1.0 - beta), (0.0, float(t_eval[-1])), loss.w0, method=ODE,
                   t_eval=t_eval, rtol=RTOL, atol=ATOL)
    cost = {"gf_seconds": time.perf_counter() - t0, "gf_grads": loss.n_grad - g0, "gf_nfev": int(gf.nfev)}
    n0, t0 = (loss.n_hvp, loss.n_third), time.perf_counter()
    flow, done = chunked_flow(loss, method, beta, lr, t_eval, max_edge)
    cost.update(seconds=time.perf_counter() - t0, nfev=int(flow.nfev), hvp=loss.n_hvp - n0[0],
                third=loss.n_third - n0[1], success=bool(flow.success), message=flow.message,
                probes_reached=int(flow.t.size), probes_asked=int(t_eval.size), chunks_done=done)
    return flow, gf.y.T, cost


def score(loss, run, flow, gf_w, edge, steps):
    probes = run["probe_steps"]
    n = min(probes.size, flow.t.size, gf_w.shape[0])
    probes = probes[:n]
    pred = cf.predict(loss, flow, loss.blocks)
    gf_g = np.array([loss.grad(w) for w in gf_w[:n]])
    block_sq = lambda g: np.stack([(g[:, b] ** 2).sum(1) for b in loss.blocks], 1)  # noqa: E731
    g_mean = np.array([loss.grad(w) for w in flow.w[:n]])
    meas_sq = window(run["sq"], probes)
    series = {"step": probes, "loss_measured": window(run["loss"], probes), "loss_flow": pred.loss[:n],
              "loss_flow_mean_only": pred.loss_mean[:n],
              "loss_gradient_flow": np.array([loss.value(w) for w in gf_w[:n]]),
              "grad_sq_measured": meas_sq.sum(1), "grad_sq_flow": pred.grad_sq[:n],
              "grad_sq_gradient_flow": (gf_g ** 2).sum(1), "layer_grad_sq_measured": meas_sq,
              "layer_grad_sq_flow": pred.block_grad_sq[:n], "layer_grad_sq_gradient_flow": block_sq(gf_g),
              "sigma2": flow.sigma2[:n], "sharpness_flow": flow.eigenvalues[:n, 0],
              "sharpness_measured": run["sharpness"][:n], "lag1_measured": lag1(run, probes),
              "lag1_flow": pred.block_lag1[:n],
              "lag1_flow_grad_at_mean": cf.lag1_correlation(block_sq(g_mean), pred.block_osc_sq[:n])}
    later = probes >= 2 * EVERY
    phases = {"all": later, "edge": (flow.active[:n] > 0) & later, "late": probes >= steps // 2}
    scores = phase_scores(series, phases)
    end, around = int(probes[n - 1]), run["around"]  # the last probe the flow reached
    d_cf = float(np.linalg.norm(around[end] - flow.w[n - 1]))
    d_gf = float(np.linalg.norm(around[end] - gf_w[n - 1]))
    filt = 0.25 * (around.get(end - 1, around[end]) + 2 * around[end] + around[end + 1])  # period-2 filter at the end
    res = {"end_step": end, "events_step": [(round(t / flow.lr, 1), kind, a) for t, kind, a in flow.events],
           "edge_phase_fraction": float((flow.active[:n] > 0).mean()), "scores": scores,
           "dist_end_flow": d_cf, "dist_end_gradient_flow": d_gf,
           "dist_end_filtered_flow": float(np.linalg.norm(filt - flow.w[n - 1])),
           "dist_end_filtered_gradient_flow": float(np.linalg.norm(filt - gf_w[n - 1])),
           "second_half_averages": late_averages(series, steps // 2),
           "series": {k: np.round(np.asarray(v, float), 8).tolist() for k, v in series.items()}}
    res["targets"] = targets(scores.get("edge") or scores.get("all", {}), d_cf, d_gf)
    return res


def targets(s, d_cf, d_gf):
    """The issue's pass criteria on one phase's scores (None where the phase had < 3 probes)."""
    if not s:
        return None
    layer = max(s["layer_grad_sq_rel_err_flow_median"]) if s["layer_grad_sq_rel_err_flow_median"] else np.nan
    return {
        "loss_within_5pct": s["loss_rel_err_flow_median"] <= 0.05,
        "loss_le_fifth_of_gradient_flow": s["loss_rel_err_flow_median"] <= 0.2 * s["loss_rel_err_gradient_flow_median"],
        "sharpness_within_5pct": s["sharpness_abs_rel_err_median"] <= 0.05,
        "grad_sq_within_10pct": s["grad_sq_rel_err_flow_median"] <= 0.10,
        "layer_grad_sq_within_20pct": bool(layer <= 0.20),
        "lag1_spearman_ge_0.9": bool(s["lag1_spearman_layers_x_time"] >= 0.9),
        "end_distance_le_0.2_gradient_flow": d_cf <= 0.2 * d_gf,
    }


def _write(path, obj):
    store.atomic_write_text(path, json.dumps(obj, indent=1, default=store._jsonable) + "\n")


def planned_steps(steps, s_hvp, s_grad, seconds):
    """The rule that sizes the runs to the budget: GD's share, the central flow plus up to
    ``len(EDGE_FACTORS)`` discrete runs of the scan, may take at most ``GD_SHARE`` of
    ``seconds`` (the momentum runs get the rest; GD first). A flow step costs ``EVALS_PER_STEP ·
    (HVPS_PER_EVAL · s_hvp + s_grad)`` (the explicit solver's work per training step on the
    seed CNN's flow below the edge, docs/findings/central_flow.md §8), a discrete step ``s_grad +
    PROBE_HVPS · s_hvp / EVERY`` (λ_max every EVERY steps). Fewer steps than asked if needed
    (a multiple of EVERY, at least MIN_STEPS). Returns (steps, flow seconds per step)."""
    flow_step = EVALS_PER_STEP * (HVPS_PER_EVAL * s_hvp + s_grad)
    gd_step = flow_step + len(EDGE_FACTORS) * (s_grad + PROBE_HVPS * s_hvp / EVERY)
    fit = int(GD_SHARE * seconds / gd_step) // EVERY * EVERY
    return max(min(steps, fit), MIN_STEPS), flow_step


def run_model(model, device, steps, budget, out, log, quick=False, command=None, loss_name="onehot_mse",
              factors=EDGE_FACTORS):
    record = {"command": command, "device": str(device), "steps_asked": steps, "every": EVERY, "ode_method": ODE,
              "rtol": RTOL, "atol": ATOL, "budget_s": budget.seconds, "edge_factors": list(factors), "stages": {}}
    path = out / f"{model}.json"
    t0 = time.perf_counter()
    raw, info = build_loss(model, device, quick, loss_name)
    record.update(info)
    loss = BudgetedLoss(raw, budget)

    def save(stage, value):
        record["stages"][stage] = value
        record["seconds_so_far"] = time.perf_counter() - t0
        record.update(n_hvp=raw.n_hvp, n_third=raw.n_third, n_grad=raw.n_grad)
        _write(path, record)
        log(f"{model}: {stage} done ({record['seconds_so_far']:.0f} s)")

    # cost of one HVP and one gradient on this device (median of 5, after a warm-up)
    v = np.random.default_rng(0).standard_normal(raw.w0.size)
    for what, fn in (("hvp", lambda: raw.hvp(raw.w0, v)), ("grad", lambda: raw.grad(raw.w0))):
        fn()
        ts = []
        for _ in range(5):
            s = time.perf_counter()
            fn()
            if raw.device.type == "cuda":
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - s)
        record[f"seconds_per_{what}"] = float(np.median(ts))
    lam0 = float(raw.top_eigs(raw.w0, 1)[0][0])
    record["sharpness_at_init"] = lam0
    steps, per_step = planned_steps(steps, record["seconds_per_hvp"], record["seconds_per_grad"], budget.left())
    record.update(steps=steps, estimated_flow_seconds_per_step=per_step)
    log(f"{model}: d={raw.w0.size}, {record['seconds_per_hvp']:.4f} s/HVP, {record['seconds_per_grad']:.4f} s/grad, "
        f"λ0={lam0:.4g}; {steps} steps (GD flow estimated {per_step * steps:.0f} s)")
    _write(path, record)
    # 1. S* by the rule, GD discrete runs
    chosen, tried = None, []
    for c in factors:
        if budget.left() < MIN_STAGE_S:
            break
        edge = c * lam0
        lr = float(cf.edge_sharpness("gd", 1.0, 0.0)) / edge
        try:
            run = discrete(loss, "gd", 0.0, lr, steps, budget)
        except OutOfBudget as e:
            save(f"scan_gd_c{c:g}", {"interrupted": str(e)})
            break
        summary = {"factor": c, "edge": edge, "lr": lr, **({"diverged_at": run["diverged_at"]} if "diverged_at" in run
                                                          else settle(run["sharpness"], edge))}
        if "diverged_at" not in run:
            summary["sharpness_over_edge_every_probe"] = np.round(run["sharpness"] / edge, 4).tolist()
        tried.append((summary, run))
        save(f"scan_gd_c{c:g}", summary)
        if summary.get("settled_from_step") is not None:
            chosen = (summary, run)
            break
    ok = [x for x in tried if "diverged_at" not in x[0]]
    if chosen is None and ok:
        chosen = min(ok, key=lambda x: abs(x[0]["last_fifth_over_edge_mean"] - 1))
    if chosen is None:
        return record
    summary, gd_run = chosen
    edge = summary["edge"]
    record["edge"] = {"factor": summary["factor"], "edge": edge, "settled": summary.get("settled_from_step") is not None}
    _write(path, record)
    # 2./3. flows and scores, GD first
    for method, beta in (("gd", 0.0), *MOMENTA):
        name = f"{method}_{beta:g}"
        if budget.left() < MIN_STAGE_S:
            save(name, {"skipped": f"{budget.left():.0f} s of budget left"})
            continue
        lr = float(cf.edge_sharpness(method, 1.0, beta)) / edge
        res = {"method": method, "momentum": beta, "lr": lr, "edge": edge}
        try:
            run = gd_run if method == "gd" else discrete(loss, method, beta, lr, steps, budget)
            if "diverged_at" in run:
                save(name, {**res, "diverged_at": run["diverged_at"]})
                continue
            res["discrete"] = settle(run["sharpness"], edge)
            save(name, {**res, "flow": "running"})
            # the scores take ~3 gradients per probe, unbudgeted: kept back from the flows
            loss.reserve = 3 * run["probe_steps"].size * record["seconds_per_grad"] + 2.0
            try:
                flow, gf_w, cost = flows(loss, method, beta, lr, run["probe_steps"])
            finally:
                loss.reserve = 0.0
            res["flow_cost"] = cost
            res.update(score(raw, run, flow, gf_w, edge, steps))
        except OutOfBudget as e:
            res["interrupted"] = str(e)
        except (ValueError, RuntimeError, np.linalg.LinAlgError) as e:  # recorded; the next stage still runs
            res["error"] = f"{type(e).__name__}: {e}"
        save(name, res)
    return record


def summary_lines(record):
    lines = [f"{record.get('model')} d={record.get('d')} n={record.get('n_train')} "
             f"s/HVP={record.get('seconds_per_hvp', float('nan')):.4f} s/grad={record.get('seconds_per_grad', float('nan')):.4f} "
             f"λ0={record.get('sharpness_at_init', float('nan')):.4g} edge={record.get('edge')}"]
    for stage, r in record["stages"].items():
        if "targets" in r and r["targets"]:
            e = r["scores"].get("edge") or r["scores"]["all"]
            lines.append(f"  {stage}: loss err {e['loss_rel_err_flow_median']:.3f} (GF {e['loss_rel_err_gradient_flow_median']:.3f}) "
                         f"sharp {e['sharpness_abs_rel_err_median']:.3f} |g|² {e['grad_sq_rel_err_flow_median']:.3f} "
                         f"lag1 ρ {e['lag1_spearman_layers_x_time']:.2f} dist {r['dist_end_flow']:.3g}/{r['dist_end_gradient_flow']:.3g} "
                         f"pass {sum(map(bool, r['targets'].values()))}/{len(r['targets'])} "
                         f"flow {r['flow_cost']['seconds']:.0f} s {r['flow_cost']['hvp']} HVP")
        else:
            lines.append(f"  {stage}: " + json.dumps({k: v for k, v in r.items() if not isinstance(v, list)})[:150])
    return lines


def parse(argv):
    """The command line (module docstring); a bad value raises ValueError naming the flag."""
    ap = argparse.ArgumentParser(prog="python -m analyses central_flow_gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("results/central_flow_gpu"))
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--quick", action="store_true", help="tiny models, few steps (an end-to-end check)")
    ap.add_argument("--steps", type=int, default=None, help="discrete steps (default 1000; 30 with --quick)")
    ap.add_argument("--models", default="seed_cnn,resnet")
    ap.add_argument("--loss", default="onehot_mse")
    ap.add_argument("--edge-factors", default=None, help="S* = c·λ0 for each c, tried in order")
    a = ap.parse_args(argv)
    if not a.budget_s > MARGIN_S + MIN_STAGE_S:
        raise ValueError(f"--budget-s={a.budget_s:g} is outside the valid range: > {MARGIN_S + MIN_STAGE_S:g}")
    a.steps = a.steps if a.steps is not None else (30 if a.quick else 1000)
    if a.steps < 3 * EVERY:
        raise ValueError(f"--steps={a.steps} is outside the valid range: >= {3 * EVERY}")
    a.models = a.models.split(",")
    if a.loss not in LOSSES:
        raise ValueError(f"--loss={a.loss} is not valid; valid: {', '.join(LOSSES)}")
    text = a.edge_factors or ("2" if a.quick else ",".join(f"{c:g}" for c in EDGE_FACTORS))
    a.factors = tuple(float(c) for c in text.split(","))
    if min(a.factors) <= 1:
        raise ValueError(f"--edge-factors={a.factors} is outside the valid range: each > 1 (start below the edge)")
    bad = [m for m in a.models if m not in MODELS]
    if bad:
        raise ValueError(f"--models={','.join(bad)} is not valid; valid: {', '.join(MODELS)}")
    torch.device(a.device)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={a.device} is not available; valid: cpu (no CUDA device here)")
    return a


def main(argv=()):
    try:
        a = parse(list(argv))
    except (ValueError, RuntimeError) as e:
        print(f"central_flow_gpu: {e}", file=sys.stderr)
        return 2
    device, out, budget_s, quick, steps = a.device, a.out, a.budget_s, a.quick, a.steps
    models, loss_name, factors = a.models, a.loss, a.factors
    if device == "cpu":
        torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(budget_s)
    log = lambda msg: print(f"[{time.monotonic() - budget.start:6.0f} s] {msg}", flush=True)  # noqa: E731
    records = []
    for model in models:
        if budget.left() < MIN_STAGE_S:
            log(f"{model}: not started ({budget.left():.0f} s left)")
            continue
        try:
            records.append(run_model(model, device, steps, budget, out, log, quick,
                                     "python -m analyses central_flow_gpu " + " ".join(argv), loss_name, factors))
        except (OutOfBudget, ValueError, RuntimeError, np.linalg.LinAlgError) as e:
            log(f"{model}: stopped: {type(e).__name__}: {e}")
            if (out / f"{model}.json").exists():
                records.append(json.loads((out / f"{model}.json").read_text()))
    print("\n".join(line for r in records for line in summary_lines(r)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
