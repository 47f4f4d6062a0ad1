"""Full-batch GD / HB / NAG through the training loop against the central flow and the gradient
flow (dynamics.central_flow, docs/theory_central_flow.md). Writes ``results/central_flow.json``:

    .venv/bin/python -m analyses central_flow [--quick]     (~15 CPU-minutes; --quick: GD, 200 steps)
    .venv/bin/python -m analyses central_flow --steps 2000  (the same runs twice as long: key runs_2000_steps)
    .venv/bin/python -m analyses central_flow --only gd:0,hb:0.5   (those runs, merged into the file)
    .venv/bin/python -m analyses central_flow --summarise   (second-half averages from the stored series)
    .venv/bin/python -m analyses central_flow --scan        (discrete runs alone: does λ_max settle at S*?)
    .venv/bin/python -m analyses central_flow --decay       (GD with one lr decay, key ``lr_decay``; ~10 CPU-minutes)
    .venv/bin/python -m analyses central_flow --scan hb:0.3:12:2000,...   (those discrete runs: key settle_scan_more)
    .venv/bin/python -m analyses central_flow --edge 10 --only hb:0.3      (another S*: keys edge10_runs...)
    .venv/bin/python -m analyses central_flow --setting digits [--only ...|--scan ... [--hidden 3,3] [--n-train 512]]
    .venv/bin/python -m analyses central_flow --setting digits --rescore   (adds the phase "oscillating" from the series)
    .venv/bin/python -m analyses central_flow --setting digits_mse --max-edge 3 --edge-space --only gd:0
        (the flow with max_edge 3, key digits_mse_max_edge3; --edge-space: where the run's period-2
        part lies against its own top Ritz vectors and the flow's edge span, :func:`edge_space`)
    .venv/bin/python -m analyses central_flow --setting digits_mse --only hb:0.4 --tag second_momentum
        (runs under their own key, runs_2000_steps_second_momentum; with --rescore: only that key)

``--setting digits``: the MLP (hidden 4, 4, tanh) on 256 sklearn digits with cross-entropy
(:data:`DIGITS`), everything under the key ``digits_ce``. ``--setting digits_mse``: the same
digits with ½ mean squared error against one-hot targets, MLP (16, 16, tanh), S* = 0.5
(:data:`DIGITS_MSE`), key ``digits_mse``.

Network: the MLP (hidden 8, 8, tanh; 249 parameters) on 256 examples of ``linreg`` (MSE, full
batch: ``batch_size=0``; the discrete runs in float32 as usual, the flow in float64). It
sharpens progressively; the lrs put every method's edge S* at the same sharpness (``EDGE``),
and the runs last long enough (``STEPS``) for the discrete run to settle at the edge after its
first overshoot (``--scan``; the choice and the numbers: docs/findings/central_flow.md). The
central flow models the settled state, not the overshoot and the self-stabilisation cycles
that precede it. tanh, not ReLU: at ReLU kinks the flow's right-hand side jumps and the ODE
solver's steps collapse. The flows start at w0 and are read at t = lr·(k − start_lag_steps)
for step k (the lag of the zero-momentum start, :func:`dynamics.central_flow.start_lag_steps`).

Per run (discrete, via :func:`experiments.runs.loop.train` with a probe every ``EVERY`` steps
that records the parameters and λ_max), at each probe k and over three sets of probes
(``all``: k ≥ 20; ``edge``: the flow's edge phase; ``late``: the second half of the run):

- train loss, averaged over the ``EVERY`` steps centred on each probe, vs the central flow's
  L(w̄) + ½S*σ² and the gradient flow's L(w(t)); relative error, median (and 90th percentile);
- sharpness (the probe's λ_max at the iterate) vs S* over the edge phase;
- squared gradient norm (window mean of ``grad_norm_global``², and per layer) vs ‖ḡ‖² + S*²σ²;
- per-layer lag-1 gradient correlation (the link's window estimator, measured_window) vs the
  flow's (‖ḡ_l‖² − S*²σ²_l)/(‖ḡ_l‖² + S*²σ²_l) and the same with ∇L(w̄)_l in place of ḡ_l:
  Spearman over layers × probes in the edge phase, and the median absolute difference;
- σ²: the window mean of the iterates' period-2 part along the flow's top eigenvector, squared
  (every iterate is recorded by an optimizer step post-hook) vs the flow's σ²;
- ‖w_k − w̄(t_k)‖ at the end (and of the period-2-filtered iterate), over the same for the
  gradient flow.
"""

import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import solve_ivp
from scipy.stats import spearmanr
from torch.optim.optimizer import register_optimizer_step_post_hook

from dynamics import central_flow as cf
from experiments import store
from experiments.linking.measure import measured_window
from experiments.runs.config import RunConfig
from experiments.runs.data import load_data
from experiments.runs.loop import train
from experiments.runs.models import build_model
from experiments.trace.central_flow_loss import LOSSES, NetworkLoss

OUT = Path(__file__).resolve().parents[1] / "results" / "central_flow.json"
EDGE = 12.0  # S* of every run
STEPS = 1000
EVERY = 10
N_TRAIN, HIDDEN, ACTIVATION = 256, (8, 8), "tanh"
RUNS = [("gd", 0.0), ("hb", 0.2), ("hb", 0.5), ("nag", 0.3), ("nag", 0.5)]


@dataclasses.dataclass(frozen=True)
class Setting:
    """A network and data set of the scores: the loop's ``data`` (its first ``n_train``
    examples, full batch, the data set's own task loss), the MLP's hidden widths and activation,
    the edge S* of every run, the run length, the (method, β) runs, the prefix of the result keys and
    the loss (``task``: the data set's own; ``onehot_mse``: :func:`experiments.trace.central_flow_loss.onehot_mse`)
    and the flow's ``max_edge`` (how many eigenvalues may sit at the edge together)."""
    name: str
    data: str
    n_train: int
    hidden: tuple
    activation: str
    edge: float
    steps: int
    runs: tuple
    prefix: str = ""
    loss: str = "task"
    max_edge: int = 1


LINREG = Setting("linreg", "linreg", N_TRAIN, HIDDEN, ACTIVATION, EDGE, STEPS, tuple(RUNS))
#: real data, cross-entropy: the MLP (4, 4) on 256 sklearn digits (S* and steps from --scan alone)
DIGITS = Setting("digits", "digits", 256, (4, 4), "tanh", 12.0, 2000,
                 (("gd", 0.0), ("hb", 0.2), ("nag", 0.3), ("nag", 0.5)), prefix="digits_ce_")
#: real data, MSE against one-hot targets: the same MLP and examples (S*, width and steps from --scan alone)
DIGITS_MSE = Setting("digits_mse", "digits", 256, (16, 16), "tanh", 0.5, 2000,
                     (("gd", 0.0), ("nag", 0.3), ("hb", 0.2)), prefix="digits_mse_", loss="onehot_mse", max_edge=2)
SETTINGS = {"linreg": LINREG, "digits": DIGITS, "digits_mse": DIGITS_MSE}


def lr_for(method, beta, edge=EDGE):
    """The lr whose edge is ``edge``: h*/edge."""
    return float(cf.edge_sharpness(method, 1.0, beta)) / edge


def _flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params]).double().numpy()


def discrete(method, beta, lr, steps, setting=LINREG):
    """The loop's full-batch run; parameters and λ_max recorded at every probe (before that
    step's update: the parameters are w_k at probe step k), and every iterate w_0..w_steps (an
    optimizer step post-hook; the probes do not step the optimizer)."""
    config = RunConfig(model="mlp", data=setting.data, opt=method, lr=lr, momentum=beta, steps=steps, batch_size=0,
                       probe_every=EVERY, hutchinson_samples=0, noise_microbatches=0,
                       data_args={"n_train": setting.n_train},
                       model_args={"hidden": setting.hidden, "activation": setting.activation}, threads=1)
    params, iterates = [], []

    def on_probe(tracer):
        params.append(_flat(tracer.model.parameters()))

    def after_step(optimizer, args, kwargs):
        iterates.append(_flat(p for group in optimizer.param_groups for p in group["params"]))

    handle = register_optimizer_step_post_hook(after_step)
    try:
        trace, summary = train(config, on_probe=on_probe, loss_fn=LOSSES[setting.loss])
    finally:
        handle.remove()
    params = np.array(params)
    iterates = np.vstack([params[:1], np.array(iterates)])
    if not np.array_equal(iterates[::EVERY][: len(params)], params):
        raise RuntimeError("the iterates recorded after each step differ from those at the probes")
    return trace, params, summary, iterates


def window_sigma2(iterates, vectors, probe_steps, width=EVERY, active=None):
    """The discrete run's oscillation variance along the flow's edge vectors at each probe: the
    mean over the ``width`` steps centred on it of Σ_j (osc_k·u_j)², osc the period-2 part of the
    iterates (:func:`dynamics.central_flow.period_two_split`), u_j the flow's unit eigenvectors
    at the edge at the probe (``vectors`` (probes, d) or (probes, d, m), the first ``active``
    of them at each probe; default 1: the top one). The flow's σ² is tr Σ, the same sum."""
    _, osc = cf.period_two_split(iterates)
    vectors = np.asarray(vectors)[:, :, None] if np.ndim(vectors) == 2 else np.asarray(vectors)
    active = np.ones(len(probe_steps), int) if active is None else np.asarray(active)
    diag = np.arange(len(probe_steps))
    out = np.zeros(len(probe_steps))
    for j in range(vectors.shape[2]):
        part = window_mean((osc @ vectors[:, :, j].T) ** 2, probe_steps, width)[diag, diag]
        out += np.where(active > j, part, 0.0)
    return out


def network_loss(setting=LINREG):
    data = load_data(setting.data, n_train=setting.n_train)
    torch.manual_seed(0)  # as train() builds it: right after seeding with config.seed
    model = build_model("mlp", data.info, hidden=setting.hidden, activation=setting.activation)
    # eigenpairs by warm LOBPCG at a residual of rtol/100 of θ_1 (rtol = 1e-6, the flows' below):
    # eigenvector errors ≤ rtol where the relative gap is ≥ 1 % (benchmarks/bench_central_flow.py --flow-cost)
    return NetworkLoss(model, data.x_train, data.y_train, data.info.task, lanczos_iters=60, lanczos_tol=1e-9,
                       loss_fn=LOSSES[setting.loss], eig_solver="lobpcg", eig_tol=1e-8)


def window_mean(values, probe_steps, width=EVERY):
    """Mean of a per-step series over the ``width`` steps centred on each probe step."""
    out = []
    for p in probe_steps:
        lo, hi = max(p - width // 2, 0), min(p + (width + 1) // 2, len(values))
        out.append(np.nanmean(values[lo:hi], axis=0))
    return np.array(out)


def window_measures(trace, probe_steps, width=EVERY):
    """Per layer and probe, over the ``width`` steps centred on it (the link's estimators,
    experiments.linking.measure.measured_window): the lag-1 correlation
    Σ g_t·g_{t−1} / sqrt(Σ|g_t|² Σ|g_{t−1}|²) and the mean squared gradient norm."""
    meas = measured_window(trace, probe_steps=np.asarray(probe_steps), window=width, align="center")
    return (meas["meas_grad_corr"].transpose("probe_step", "layer").values,
            meas["meas_grad_sq_norm"].transpose("probe_step", "layer").values)


def rel_err(measured, predicted):
    """|measured / predicted − 1|."""
    return np.abs(np.asarray(measured, float) / np.asarray(predicted, float) - 1)


def phase_scores(series, phases):
    """Median and 90th percentile of the relative errors of the loss and squared gradient norm
    (network and per layer), for the central flow and the gradient flow, and the sharpness's
    |λ/S* − 1| and the lag-1 agreement, over each named set of probes (boolean masks)."""
    out = {}
    for name, sel in phases.items():
        if sel.sum() < 3:
            continue
        s = {k: np.asarray(v, float)[sel] for k, v in series.items()}
        r = {"probes": int(sel.sum())}
        for q, key in (("loss", "loss"), ("grad_sq", "grad_sq")):
            e_cf = rel_err(s[f"{key}_measured"], s[f"{key}_flow"])
            e_gf = rel_err(s[f"{key}_measured"], s[f"{key}_gradient_flow"])
            r[f"{q}_rel_err_flow_median"] = float(np.median(e_cf))
            r[f"{q}_rel_err_flow_p90"] = float(np.quantile(e_cf, 0.9))
            r[f"{q}_rel_err_gradient_flow_median"] = float(np.median(e_gf))
        lay = rel_err(s["layer_grad_sq_measured"], s["layer_grad_sq_flow"])
        r["layer_grad_sq_rel_err_flow_median"] = np.round(np.median(lay, 0), 4).tolist()
        r["layer_grad_sq_rel_err_gradient_flow_median"] = np.round(
            np.median(rel_err(s["layer_grad_sq_measured"], s["layer_grad_sq_gradient_flow"]), 0), 4).tolist()
        r["sharpness_abs_rel_err_median"] = float(np.median(np.abs(s["sharpness_measured"] / s["sharpness_flow"] - 1)))
        r["sharpness_measured_over_flow_mean"] = float(np.mean(s["sharpness_measured"]) / np.mean(s["sharpness_flow"]))
        for tag, key in (("", "lag1_flow"), ("_grad_at_mean", "lag1_flow_grad_at_mean")):
            ok = np.isfinite(s["lag1_measured"]) & np.isfinite(s[key])
            r[f"lag1_median_abs_diff{tag}"] = float(np.median(np.abs(s["lag1_measured"][ok] - s[key][ok])))
            rho = spearmanr(s["lag1_measured"][ok], s[key][ok]).statistic if ok.sum() > 2 else np.nan
            r[f"lag1_spearman_layers_x_time{tag}"] = float(rho)
        if "sigma2_measured" in s and np.any(s["sigma2"] > 0):
            on = s["sigma2"] > 0
            r["sigma2_rel_err_median"] = float(np.median(rel_err(s["sigma2_measured"][on], s["sigma2"][on])))
            r["sigma2_measured_over_flow_mean"] = float(np.mean(s["sigma2_measured"][on]) / np.mean(s["sigma2"][on]))
        r["lag1_mean_measured_per_layer"] = np.round(np.nanmean(s["lag1_measured"], 0), 3).tolist()
        r["lag1_mean_flow_per_layer"] = np.round(np.nanmean(s["lag1_flow"], 0), 3).tolist()
        r["lag1_mean_flow_grad_at_mean_per_layer"] = np.round(np.nanmean(s["lag1_flow_grad_at_mean"], 0), 3).tolist()
        out[name] = r
    return out


def oscillating_probes(series, floor=1e-6):
    """Probes from step 20 at which the flow is at the edge and the discrete run does oscillate
    (its window σ² along the flow's u above ``floor``, the series' rounding): a diagnostic
    conditioned on the run, reported beside the unconditioned phases, never instead of them."""
    step = np.asarray(series["step"])
    return ((np.asarray(series["sigma2"], float) > 0) & (np.asarray(series["sigma2_measured"], float) > floor)
            & (step >= 2 * EVERY))


def late_averages(series, start):
    """Time averages over the probes from step ``start`` on (the discrete run's bursts of
    oscillation, its self-stabilisation cycles, are averaged out, as the central flow intends):
    measured over predicted − 1 for the loss and the squared gradient norm, by the central flow
    and by the gradient flow; mean measured λ_max over the flow's mean sharpness − 1; the lag-1
    correlation per layer."""
    sel = np.asarray(series["step"]) >= start
    mean = {k: np.nanmean(np.asarray(v, float)[sel], axis=0) for k, v in series.items()}
    return {
        "from_step": int(start),
        "loss_measured_over_flow": float(mean["loss_measured"] / mean["loss_flow"] - 1),
        "loss_measured_over_flow_mean_only": float(mean["loss_measured"] / mean["loss_flow_mean_only"] - 1),
        "loss_measured_over_gradient_flow": float(mean["loss_measured"] / mean["loss_gradient_flow"] - 1),
        "grad_sq_measured_over_flow": float(mean["grad_sq_measured"] / mean["grad_sq_flow"] - 1),
        "sharpness_measured_over_edge": float(mean["sharpness_measured"] / mean["sharpness_flow"] - 1),
        "lag1_measured_per_layer": np.round(mean["lag1_measured"], 3).tolist(),
        "lag1_flow_per_layer": np.round(mean["lag1_flow"], 3).tolist(),
    }


def edge_space(loss, flow, iterates, probe_steps, start, edge, k=6, every=100, width=EVERY):
    """Where the discrete run's period-2 part lies, every ``every`` steps from ``start``: the top
    ``k`` Ritz pairs (Lanczos, ``loss.top_eigs``) of the run's own Hessian at its
    period-2-filtered iterate (:func:`dynamics.central_flow.period_two_split`), and over the
    ``width`` steps centred there the mean squared projection of the period-2 part on each Ritz
    vector, on the span of the flow's active edge vectors, and in total (‖osc‖²). Returns the
    per-point rows and their means: λ_j / S*, the cumulative shares of the total in the top
    1..k Ritz vectors and in the flow's edge span, and each of those variances over the flow's
    σ² (tr Σ)."""
    mean, osc = cf.period_two_split(iterates)
    rows = []
    for i, p in enumerate(probe_steps[:flow.t.size]):
        if p < start or p % every or flow.active[i] == 0:
            continue
        vals, vecs = loss.top_eigs(mean[p], k)
        win = osc[p - width // 2: p + (width + 1) // 2]
        total = float(np.mean((win**2).sum(1)))
        per_ritz = np.mean((win @ vecs) ** 2, axis=0)
        a = int(flow.active[i])
        in_flow = float(np.mean(((win @ flow.vectors[i][:, :a]) ** 2).sum(1)))
        # cosines of the principal angles between the run's top-a Ritz span and the flow's edge span
        cos = np.linalg.svd(vecs[:, :a].T @ flow.vectors[i][:, :a], compute_uv=False)
        rows.append({"step": int(p), "flow_active": a, "ritz_over_edge": np.round(vals / edge, 4).tolist(),
                     "share_top_cumulative": np.round(np.cumsum(per_ritz) / total, 4).tolist(),
                     "share_flow_span": round(in_flow / total, 4),
                     "total_over_flow_sigma2": total / float(flow.sigma2[i]),
                     "top_cumulative_over_flow_sigma2": np.round(np.cumsum(per_ritz) / flow.sigma2[i], 4).tolist(),
                     "flow_span_over_flow_sigma2": in_flow / float(flow.sigma2[i]),
                     "run_top_vs_flow_span_cosines": np.round(cos, 4).tolist()})
    avg = {key: np.round(np.mean([r[key] for r in rows], axis=0), 4).tolist()
           for key in ("ritz_over_edge", "share_top_cumulative", "share_flow_span", "total_over_flow_sigma2",
                       "top_cumulative_over_flow_sigma2", "flow_span_over_flow_sigma2",
                       "run_top_vs_flow_span_cosines")} if rows else {}
    return {"from_step": int(start), "every": every, "k": k, "mean": avg, "points": rows}


def one_run(method, beta, steps=STEPS, setting=LINREG, with_edge_space=False):
    lr = lr_for(method, beta, setting.edge)
    loss = network_loss(setting)
    t0 = time.perf_counter()
    trace, params, summary, iterates = discrete(method, beta, lr, steps, setting)
    t_discrete = time.perf_counter() - t0
    probe_steps = np.arange(0, steps, EVERY)
    lag = cf.start_lag_steps(method, beta)  # the loop starts at b = 0: step k is the flow at k − lag
    t_eval = lr * np.maximum(probe_steps - lag, 0.0)
    horizon = float(t_eval[-1])
    n0 = loss.n_hvp
    t0 = time.perf_counter()
    flow = cf.solve_central_flow(loss, loss.w0, method, lr, beta, horizon, t_eval=t_eval,
                                 max_edge=setting.max_edge,
                                 rtol=1e-6, atol=1e-9)
    t_flow = time.perf_counter() - t0
    hvp_flow = loss.n_hvp - n0
    n = min(len(probe_steps), flow.t.size)
    pred = cf.predict(loss, flow, loss.blocks)
    # the gradient flow: dynamics.modified's first-order flow -∇L/(1−β), read at the same times
    gflow = solve_ivp(lambda t, w: -loss.grad(w) / (1.0 - beta), (0.0, horizon), loss.w0, method="LSODA",
                      t_eval=t_eval, rtol=1e-6, atol=1e-9)
    gf_w = gflow.y.T[:n]
    gf_loss = np.array([loss.value(w) for w in gf_w])
    gf_g = np.array([loss.grad(w) for w in gf_w])
    grad_at_mean = np.array([loss.grad(w) for w in flow.w[:n]])  # ∇L(w̄), not the averaged ḡ
    block_sq = lambda g: np.stack([(g[:, b] ** 2).sum(1) for b in loss.blocks], 1)  # noqa: E731
    lag1_at_mean = cf.lag1_correlation(block_sq(grad_at_mean), pred.block_osc_sq[:n])
    meas_loss = window_mean(trace["loss"].values, probe_steps)[:n]
    meas_gsq = window_mean(trace["grad_norm_global"].values ** 2, probe_steps)[:n]
    meas_lag, meas_layer_gsq = window_measures(trace, probe_steps)
    meas_sharp = trace["sharpness_global"].values[:n]
    meas_sigma2 = window_sigma2(iterates, flow.vectors[:n, :, :setting.max_edge], probe_steps[:n],
                                active=np.maximum(flow.active[:n], 1) if setting.max_edge > 1 else None)
    mean_w = cf.period_two_split(iterates)[0]  # the discrete run with its period-2 part filtered out
    series = {"step": probe_steps[:n], "loss_measured": meas_loss, "loss_flow": pred.loss[:n],
              "loss_flow_mean_only": pred.loss_mean[:n], "loss_gradient_flow": gf_loss,
              "grad_sq_measured": meas_gsq, "grad_sq_flow": pred.grad_sq[:n],
              "grad_sq_gradient_flow": (gf_g**2).sum(1),
              "layer_grad_sq_measured": meas_layer_gsq[:n], "layer_grad_sq_flow": pred.block_grad_sq[:n],
              "layer_grad_sq_gradient_flow": block_sq(gf_g),
              "sigma2": flow.sigma2[:n], "sharpness_flow": flow.eigenvalues[:n, 0],
              "sharpness_gradient_flow": np.full(n, np.nan), "sharpness_measured": meas_sharp,
              "lag1_measured": meas_lag[:n], "lag1_flow": pred.block_lag1[:n],
              "lag1_flow_grad_at_mean": lag1_at_mean, "sigma2_measured": meas_sigma2}
    edge_phase = flow.active[:n] > 0
    later = probe_steps[:n] >= 2 * EVERY  # skip the first windows (initial layer of momentum)
    phases = {"all": later, "edge": edge_phase & later, "late": probe_steps[:n] >= steps // 2}
    res = {
        "method": method, "momentum": beta, "lr": lr, "edge": flow.edge, "steps": steps,
        "flow_start": f"w0, read at t = lr·(k − {lag:g})",
        "events_step": [round(t / lr + lag, 1) for t, _, _ in flow.events],
        "edge_phase_fraction": float(edge_phase.mean()),
        "scores": phase_scores(series, phases),
        "dist_end_flow": float(np.linalg.norm(params[n - 1] - flow.w[n - 1])),
        "dist_end_gradient_flow": float(np.linalg.norm(params[n - 1] - gf_w[n - 1])),
        "oscillation_rms_end_flow": float(np.sqrt(flow.sigma2[n - 1])),
        "dist_end_filtered_flow": float(np.linalg.norm(mean_w[probe_steps[n - 1]] - flow.w[n - 1])),
        "dist_end_filtered_gradient_flow": float(np.linalg.norm(mean_w[probe_steps[n - 1]] - gf_w[n - 1])),
        "seconds_discrete": t_discrete, "seconds_flow": t_flow, "hvp_flow": int(hvp_flow),
        "flow_nfev": flow.nfev, "flow_success": flow.success, "flow_message": flow.message,
    }
    res["series"] = {k: np.round(np.asarray(v, float), 6).tolist() for k, v in series.items()}
    res["second_half_averages"] = late_averages(series, steps // 2)
    res["flow_eigenvalues_over_edge_second_half_mean"] = np.round(
        np.mean(flow.eigenvalues[:n][probe_steps[:n] >= steps // 2], 0) / flow.edge, 4).tolist()
    if with_edge_space:
        res["edge_space"] = edge_space(loss, flow, iterates, probe_steps, steps // 2, flow.edge)
    return res


def decay_run(lr=None, gamma=0.75, steps=STEPS):
    """GD at lr (edge EDGE) for ``steps`` steps, then at gamma·lr for ``steps`` more (the loop's
    "step" schedule): the central flow in two segments (the second from the first's end, at
    the new lr, below its higher edge), the gradient flow (lr-free in t = Σ lr) and the
    measured λ_max, which should rise after the decay to the new edge as the flow's does."""
    lr = lr_for("gd", 0.0) if lr is None else lr
    loss = network_loss()
    config = RunConfig(model="mlp", data="linreg", opt="gd", lr=lr, momentum=0.0, steps=2 * steps, batch_size=0,
                       schedule="step", step_every=steps, step_gamma=gamma, probe_every=EVERY,
                       hutchinson_samples=0, noise_microbatches=0, data_args={"n_train": N_TRAIN},
                       model_args={"hidden": HIDDEN, "activation": ACTIVATION}, threads=1)
    params = []
    trace, _ = train(config, on_probe=lambda tr: params.append(
        torch.cat([p.detach().reshape(-1) for p in tr.model.parameters()]).double().numpy()))
    probe_steps = np.arange(0, 2 * steps, EVERY)
    first, second = probe_steps < steps, probe_steps >= steps
    t1 = lr * probe_steps[first]
    t2 = gamma * lr * (probe_steps[second] - steps)
    t0 = time.perf_counter()
    f1 = cf.solve_central_flow(loss, loss.w0, "gd", lr, 0.0, lr * steps, t_eval=np.append(t1, lr * steps),
                               max_edge=1, rtol=1e-6, atol=1e-9)
    f2 = cf.solve_central_flow(loss, f1.w[-1], "gd", gamma * lr, 0.0, float(t2[-1]), t_eval=t2, max_edge=1,
                               rtol=1e-6, atol=1e-9)
    t_flow = time.perf_counter() - t0
    p1, p2 = cf.predict(loss, f1), cf.predict(loss, f2)
    t_all = np.concatenate([t1, lr * steps + t2])
    gflow = solve_ivp(lambda t, w: -loss.grad(w), (0.0, t_all[-1]), loss.w0, method="LSODA", t_eval=t_all,
                      rtol=1e-6, atol=1e-9)
    gf_w = gflow.y.T
    series = {
        "step": probe_steps, "lr": np.where(first, lr, gamma * lr),
        "edge": np.where(first, f1.edge, f2.edge),
        "sharpness_measured": trace["sharpness_global"].values[: probe_steps.size],
        "sharpness_flow": np.concatenate([f1.eigenvalues[:-1, 0], f2.eigenvalues[:, 0]]),
        "sharpness_gradient_flow": np.array([loss.top_eigs(w, 1)[0][0] for w in gf_w]),
        "loss_measured": window_mean(trace["loss"].values, probe_steps),
        "loss_flow": np.concatenate([p1.loss[:-1], p2.loss]),
        "loss_gradient_flow": np.array([loss.value(w) for w in gf_w]),
        "sigma2": np.concatenate([f1.sigma2[:-1], f2.sigma2]),
    }
    after = second & (probe_steps >= steps + 2 * EVERY)
    late2 = probe_steps >= steps + steps // 2
    sh = lambda sel, key: float(np.median(np.abs(series["sharpness_measured"][sel] / series[key][sel] - 1)))  # noqa: E731
    ls = lambda sel, key: float(np.median(rel_err(series["loss_measured"][sel], series[key][sel])))  # noqa: E731
    res = {
        "method": "gd", "lr": lr, "gamma": gamma, "steps_per_lr": steps,
        "command": "python -m analyses central_flow --decay",
        "events_step": [round(t / lr, 1) for t, _, _ in f1.events]
                       + [round(steps + t / (gamma * lr), 1) for t, _, _ in f2.events],
        "edges": [f1.edge, f2.edge],
        "after_decay": {"sharpness_abs_rel_err_median_flow": sh(after, "sharpness_flow"),
                        "sharpness_abs_rel_err_median_gradient_flow": sh(after, "sharpness_gradient_flow"),
                        "loss_rel_err_median_flow": ls(after, "loss_flow"),
                        "loss_rel_err_median_gradient_flow": ls(after, "loss_gradient_flow")},
        "second_half_after_decay": {"sharpness_abs_rel_err_median_flow": sh(late2, "sharpness_flow"),
                                    "sharpness_abs_rel_err_median_gradient_flow": sh(late2, "sharpness_gradient_flow"),
                                    "loss_rel_err_median_flow": ls(late2, "loss_flow"),
                                    "loss_rel_err_median_gradient_flow": ls(late2, "loss_gradient_flow")},
        "dist_end_flow": float(np.linalg.norm(params[-1] - f2.w[-1])),
        "dist_end_gradient_flow": float(np.linalg.norm(params[-1] - gf_w[-1])),
        "seconds_flow": t_flow, "flow_success": bool(f1.success and f2.success),
        "series": {k: np.round(np.asarray(v, float), 6).tolist() for k, v in series.items()},
    }
    return res


def settled_from(ratio, tol=0.01, every=EVERY):
    """First probe step of the final stretch of probes with |ratio − 1| ≤ tol, if that stretch
    covers at least a tenth of them; else None."""
    ratio = np.asarray(ratio, float)
    bad = np.flatnonzero(~(np.abs(ratio - 1) <= tol))
    first = int(bad[-1]) + 1 if bad.size else 0
    return first * every if ratio.size - first >= max(ratio.size // 10, 1) else None


SCAN = [("gd", 0.0, 10.0, 1000), ("gd", 0.0, 12.0, 1000), ("gd", 0.0, 14.0, 1500),
        ("hb", 0.2, 12.0, 1000), ("hb", 0.3, 12.0, 1000), ("hb", 0.5, 12.0, 1000), ("hb", 0.8, 12.0, 1000),
        ("nag", 0.3, 12.0, 1000), ("nag", 0.5, 12.0, 1000), ("nag", 0.8, 12.0, 1000)]


def settle_scan(settings=SCAN, tol=0.01, setting=LINREG):
    """Discrete runs alone (no flow): for each (method, β, S*, steps), λ_max's largest overshoot
    over S* and the first probe step after which it stays within ``tol`` of S* (None: it does
    not, or only over the last tenth of the run). The setting of the scores was chosen on these numbers."""
    out = []
    for method, beta, edge, steps in settings:
        lr = float(cf.edge_sharpness(method, 1.0, beta)) / edge
        trace = discrete(method, beta, lr, steps, setting)[0]
        lam = trace["sharpness_global"].values / edge
        settled = settled_from(lam, tol)
        out.append({"method": method, "momentum": beta, "edge": edge, "lr": lr, "steps": steps,
                    "hidden": list(setting.hidden), "n_train": setting.n_train,
                    "max_sharpness_over_edge": float(lam.max()), "settled_within_1pct_from_step": settled,
                    "last_fifth_sharpness_over_edge_range": [float(lam[-lam.size // 5:].min()),
                                                             float(lam[-lam.size // 5:].max())],
                    "fraction_within_5pct": float(np.mean(np.abs(lam - 1) <= 0.05)),
                    "sharpness_over_edge_every_100_steps": np.round(lam[:: 100 // EVERY], 3).tolist()})
        print(json.dumps(out[-1]), flush=True)
    return out


def _parse_only(arg):
    out = []
    for item in arg.split(","):
        method, _, beta = item.partition(":")
        out.append((method, float(beta or 0.0)))
    return out


def _parse_scan(arg):
    """"method:β:S*:steps,..." → [(method, β, S*, steps), ...]."""
    out = []
    for item in arg.split(","):
        parts = item.split(":")
        if len(parts) != 4:
            raise ValueError(f"--scan item {item!r} is not of the form method:beta:edge:steps")
        out.append((parts[0], float(parts[1]), float(parts[2]), int(parts[3])))
    return out


def _merge_write(**items):
    """Write ``items`` into results/central_flow.json, re-read first: the settings run as
    separate processes, each writing its own keys."""
    now = json.loads(OUT.read_text()) if OUT.exists() else {}
    for stale in ("runs_plain_start", "complete", "steps"):  # keys of an earlier layout
        now.pop(stale, None)
    now.update(items)
    store.atomic_write_text(OUT, _compact_json(now))


def _compact_json(obj):
    """JSON with indent 1 but each list of scalars on one line (the per-probe series), so the
    results file stays small and readable."""
    text = json.dumps(obj, indent=1, sort_keys=True, default=store._jsonable)
    return re.sub(r"\[[^\[\]{}\"]*\]", lambda m: " ".join(m.group(0).split()), text) + "\n"


def _merge_block(name, **items):
    """Merge ``items`` into the block ``name`` of the results file (a setting other than linreg)."""
    now = json.loads(OUT.read_text()) if OUT.exists() else {}
    block = now.get(name, {})
    block.update(items)
    _merge_write(**{name: block})


def _arg(argv, flag, default=None):
    return argv[argv.index(flag) + 1] if flag in argv else default


def main(argv=()):
    torch.set_num_threads(1)
    argv = list(argv)
    out = json.loads(OUT.read_text()) if OUT.exists() else {}
    name = _arg(argv, "--setting", "linreg")
    if name not in SETTINGS:
        raise ValueError(f"--setting={name!r} is unknown; valid: {', '.join(SETTINGS)}")
    setting = SETTINGS[name]
    if "--edge" in argv:  # another S* for the same network: its own keys
        edge = float(_arg(argv, "--edge"))
        setting = dataclasses.replace(setting, edge=edge, prefix=f"{setting.prefix}edge{edge:g}_")
    if "--max-edge" in argv:  # the flow with more eigenvalues allowed at the edge: its own keys
        max_edge = int(_arg(argv, "--max-edge"))
        setting = dataclasses.replace(setting, max_edge=max_edge, prefix=f"{setting.prefix}max_edge{max_edge}_")
    if "--hidden" in argv or "--n-train" in argv:  # another width or sample size: for --scan only
        if "--scan" not in argv:
            raise ValueError("--hidden and --n-train are for --scan only (the scored settings are fixed)")
        hidden = tuple(int(h) for h in _arg(argv, "--hidden", ",".join(map(str, setting.hidden))).split(","))
        setting = dataclasses.replace(setting, hidden=hidden, n_train=int(_arg(argv, "--n-train", setting.n_train)))
    block = setting.prefix.rstrip("_") if setting.name != "linreg" else None
    tag = _arg(argv, "--tag")  # runs kept apart from the stored ones: key ..._TAG (--rescore: only those)
    if tag is not None and not re.fullmatch(r"[a-z0-9_]+", tag):
        raise ValueError(f"--tag={tag!r} is invalid; valid: lower-case letters, digits and _")
    if "--summarise" in argv:  # recompute the second-half averages from the stored series
        keys = [k for k in out if k.startswith("runs") and isinstance(out[k], list)]
        for key in keys:
            for r in out[key]:
                r["second_half_averages"] = late_averages(r["series"], r["steps"] // 2)
                print(key, r["method"], r["momentum"], json.dumps(r["second_half_averages"]))
        _merge_write(**{k: out[k] for k in keys})
        return
    if "--rescore" in argv:  # from the stored series: the probes where both the flow and the run oscillate
        stored = out.get(block, {}) if block else out
        keys = [k for k in stored if k.startswith("runs" if block else setting.prefix + "runs")
                and isinstance(stored[k], list) and (tag is None or k.endswith("_" + tag))]
        for key in keys:
            for r in stored[key]:
                r["scores"].update(phase_scores(r["series"], {"oscillating": oscillating_probes(r["series"])}))
                print(key, r["method"], r["momentum"], json.dumps(r["scores"].get("oscillating")))
        if block:
            _merge_block(block, **{k: stored[k] for k in keys})
        else:
            _merge_write(**{k: stored[k] for k in keys})
        return
    if "--scan" in argv:  # discrete runs alone: where λ_max settles at the edge
        spec = _arg(argv, "--scan")
        spec = None if spec is None or spec.startswith("--") else spec
        scan = settle_scan(_parse_scan(spec) if spec else SCAN, setting=setting)
        if block:  # merged by (method, β, S*, steps, hidden, n_train)
            ident = lambda x: (x["method"], x["momentum"], x["edge"], x["steps"],  # noqa: E731
                               tuple(x.get("hidden", DIGITS.hidden)), x.get("n_train", DIGITS.n_train))
            now = json.loads(OUT.read_text()) if OUT.exists() else {}
            merged = {ident(x): x for x in now.get(block, {}).get("settle_scan", [])}
            merged.update({ident(x): x for x in scan})
            _merge_block(block, settle_scan=list(merged.values()))
        elif spec:  # more settings of the linreg network, merged by (method, β, S*, steps)
            more = {(x["method"], x["momentum"], x["edge"], x["steps"]): x for x in out.get("settle_scan_more", [])}
            more.update({(x["method"], x["momentum"], x["edge"], x["steps"]): x for x in scan})
            _merge_write(settle_scan_more=list(more.values()))
        else:
            _merge_write(settle_scan=scan)
        return
    if "--decay" in argv:  # GD with one lr decay, added to the same file
        decay = decay_run()
        _merge_write(lr_decay=decay)
        print(json.dumps({k: v for k, v in decay.items() if k != "series"}, indent=1))
        return
    quick = "--quick" in argv
    steps = int(_arg(argv, "--steps")) if "--steps" in argv else (200 if quick else setting.steps)
    key = "runs" if steps == STEPS else f"runs_{steps}_steps"
    key = key if block else setting.prefix + key
    key = key if tag is None else f"{key}_{tag}"
    runs = _parse_only(_arg(argv, "--only")) if "--only" in argv else (
        list(setting.runs[:1]) if quick else list(setting.runs))
    stored = out.get(block, {}) if block else out
    done = stored.get(key, []) if "--only" in argv else []  # --only: merged into the stored runs of this setting
    done = [x for x in done if x.get("steps") == steps and abs(x.get("edge", 0) / setting.edge - 1) < 1e-9]
    head = {"command": "python -m analyses central_flow [--setting NAME] [--edge S] [--steps N] "
                       "(key [NAME block:] [edgeS_]runs[_N_steps]) and --decay",
            "network": _describe(setting), "edge": setting.edge}
    order = {k: i for i, k in enumerate(setting.runs)}
    for m, b in runs:  # written after each run: a long analysis leaves its finished part
        r = one_run(m, b, steps, setting, with_edge_space="--edge-space" in argv)
        if "--only" in argv:  # re-read: runs of the same setting may finish in other processes meanwhile
            now = json.loads(OUT.read_text()) if OUT.exists() else {}
            stored = now.get(block, {}) if block else now
            done = [x for x in stored.get(key, []) if x.get("steps") == steps
                    and abs(x.get("edge", 0) / setting.edge - 1) < 1e-9]
        done = [x for x in done if (x["method"], x["momentum"]) != (m, b)] + [r]
        done.sort(key=lambda x: order.get((x["method"], x["momentum"]), len(order)))
        items = {key: done, f"{key}_complete": {(x["method"], x["momentum"]) for x in done} >= set(setting.runs)}
        if not quick:
            if block:
                _merge_block(block, **head, **items)
            elif setting.prefix:  # another S* of the linreg network: the file's head stays the main setting's
                _merge_write(**items)
            else:
                _merge_write(**head, **items)
        print(json.dumps({k: v for k, v in r.items() if k != "series"}, indent=1), flush=True)


def _describe(setting):
    task = {"linreg": "MSE", "digits": "cross-entropy"}.get(setting.data, "the data set's task loss")
    if setting.loss == "onehot_mse":
        task = "MSE against one-hot targets (1/2 mean over examples and outputs)"
    return (f"mlp hidden={setting.hidden} {setting.activation} on {setting.data} n_train={setting.n_train}, "
            f"{task}, full batch (discrete float32 through the training loop, flows float64)")


if __name__ == "__main__":
    main(sys.argv[1:])
