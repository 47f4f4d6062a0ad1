"""Full-batch GD / HB / NAG through the training loop against the central flow and the gradient
flow (dynamics.central_flow, docs/theory_central_flow.md). Writes ``results/central_flow.json``:

    .venv/bin/python -m analyses central_flow [--quick]     (~25 CPU-minutes; --quick: GD, 100 steps)
    .venv/bin/python -m analyses central_flow --summarise   (second-half averages from the stored series)
    .venv/bin/python -m analyses central_flow --plain-start (β = 0.8 again, flows started at w0)

Network: the MLP (hidden 8, 8, tanh; 249 parameters) on 256 examples of ``linreg`` (MSE, full
batch: ``batch_size=0``; the discrete runs in float32 as usual, the flow in float64). This net
sharpens progressively from λ_max ≈ 1.9 past 13 under GD at lr 0.2; the lrs put every method's
edge S* at the same sharpness (``EDGE``). tanh, not ReLU: at ReLU kinks the flow's right-hand
side jumps and the ODE solver's steps collapse (a 300-step GD flow did not finish in 10 min).
Per run (discrete, via :func:`experiments.runs.loop.train` with a probe every ``EVERY`` steps
that records the parameters and λ_max):

- train loss, averaged over the ``EVERY`` steps centred on each probe, vs the central flow's
  L(w̄) + ½S*σ² and the gradient flow's L(w(t)); relative error, median over the probes;
- sharpness (the probe's λ_max at the iterate) vs S* over the edge phase;
- squared gradient norm (window mean of ``grad_norm_global``²) vs ‖ḡ‖² + S*²σ²;
- per-layer lag-1 gradient correlation (the link's window estimator, measured_window) vs
  the flow's prediction: Spearman over layers × probes in the edge phase;
- ‖w_k − w̄(t_k)‖ at the end, over the same for the gradient flow.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from dynamics import central_flow as cf
from dynamics import modified as md
from experiments import store
from experiments.linking.measure import measured_window
from experiments.runs.config import RunConfig
from experiments.runs.data import load_data
from experiments.runs.loop import train
from experiments.runs.models import build_model
from experiments.trace.central_flow_loss import NetworkLoss

OUT = Path(__file__).resolve().parents[1] / "results" / "central_flow.json"
EDGE = 10.0  # S* of every run
EVERY = 10
N_TRAIN, HIDDEN, ACTIVATION = 256, (8, 8), "tanh"
RUNS = [("gd", 0.0), ("hb", 0.5), ("nag", 0.5), ("hb", 0.8), ("nag", 0.8)]


def lr_for(method, beta):
    """The lr whose edge is EDGE: h*/EDGE."""
    return float(cf.edge_sharpness(method, 1.0, beta)) / EDGE


def discrete(method, beta, lr, steps):
    """The loop's full-batch run; parameters and λ_max recorded at every probe."""
    config = RunConfig(model="mlp", data="linreg", opt=method, lr=lr, momentum=beta, steps=steps, batch_size=0,
                       probe_every=EVERY, hutchinson_samples=0, noise_microbatches=0,
                       data_args={"n_train": N_TRAIN}, model_args={"hidden": HIDDEN, "activation": ACTIVATION},
                       threads=1)
    params = []

    def on_probe(tracer):
        params.append(torch.cat([p.detach().reshape(-1) for p in tracer.model.parameters()]).double().numpy())

    trace, summary = train(config, on_probe=on_probe)
    return trace, np.array(params), summary


def network_loss():
    data = load_data("linreg", n_train=N_TRAIN)
    torch.manual_seed(0)  # as train() builds it: right after seeding with config.seed
    model = build_model("mlp", data.info, hidden=HIDDEN, activation=ACTIVATION)
    return NetworkLoss(model, data.x_train, data.y_train, data.info.task, lanczos_iters=60, lanczos_tol=1e-9)


def window_mean(values, probe_steps, width=EVERY):
    """Mean of a per-step series over the ``width`` steps centred on each probe step."""
    out = []
    for p in probe_steps:
        lo, hi = max(p - width // 2, 0), min(p + (width + 1) // 2, len(values))
        out.append(np.nanmean(values[lo:hi]))
    return np.array(out)


def window_lag1(trace, probe_steps, width=EVERY):
    """Per layer, Σ g_t·g_{t−1} / sqrt(Σ|g_t|² Σ|g_{t−1}|²) over the ``width`` steps centred on
    each probe: the link's estimator (experiments.linking.measure.measured_window)."""
    meas = measured_window(trace, probe_steps=np.asarray(probe_steps), window=width, align="center")
    return meas["meas_grad_corr"].transpose("probe_step", "layer").values


def late_averages(series, start):
    """Time averages over the probes from step ``start`` on (the discrete run's bursts of
    oscillation, its self-stabilisation cycles, are averaged out, as the central flow intends):
    measured over predicted − 1 for the loss and the squared gradient norm, by the central flow
    and by the gradient flow, and the lag-1 correlation per layer."""
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


def one_run(method, beta, steps, shift_start=True):
    lr = lr_for(method, beta)
    loss = network_loss()
    t0 = time.perf_counter()
    trace, params, summary = discrete(method, beta, lr, steps)
    t_discrete = time.perf_counter() - t0
    probe_steps = np.arange(0, steps, EVERY)
    w0 = loss.w0  # the loop starts at b = 0: the flows start where those iterates lag to, or at w0
    if shift_start:
        w0 = w0 + md.initial_layer_shift(loss, loss.w0, method, lr, beta)
    t_eval = lr * probe_steps
    n0 = loss.n_hvp
    t0 = time.perf_counter()
    flow = cf.solve_central_flow(loss, w0, method, lr, beta, lr * steps, t_eval=t_eval, max_edge=1,
                                 rtol=1e-6, atol=1e-9)
    t_flow = time.perf_counter() - t0
    hvp_flow = loss.n_hvp - n0
    pred = cf.predict(loss, flow, loss.blocks)
    gflow = md.solve_flow("first_order", loss, w0, method, lr, beta, lr * steps, rtol=1e-6, atol=1e-9)
    gf_w = gflow.x[probe_steps]
    gf_loss = np.array([loss.value(w) for w in gf_w])
    meas_loss = window_mean(trace["loss"].values, probe_steps)
    meas_gsq = window_mean(trace["grad_norm_global"].values ** 2, probe_steps)
    meas_sharp = trace["sharpness_global"].values if "sharpness_global" in trace else None
    lag = window_lag1(trace, probe_steps)
    edge_phase = flow.active[: len(probe_steps)] > 0
    rel = lambda a, b: np.abs(a / b - 1)  # noqa: E731
    n = min(len(probe_steps), flow.t.size)
    later = probe_steps[:n] >= 2 * EVERY  # skip the first windows (initial layer of momentum)
    gf_gsq = np.array([np.sum(loss.grad(w) ** 2) for w in gf_w[:n]])
    res = {
        "method": method, "momentum": beta, "lr": lr, "edge": flow.edge, "steps": steps,
        "flow_start": "w0 + initial_layer_shift" if shift_start else "w0",
        "events_step": [round(t / lr, 1) for t, _, _ in flow.events],
        "edge_phase_fraction": float(edge_phase.mean()),
        "loss_rel_err_flow_median": float(np.median(rel(meas_loss[:n], pred.loss[:n])[later])),
        "loss_rel_err_flow_max": float(np.max(rel(meas_loss[:n], pred.loss[:n])[later])),
        "loss_rel_err_gradient_flow_median": float(np.median(rel(meas_loss[:n], gf_loss[:n])[later])),
        "grad_sq_rel_err_flow_median": float(np.median(rel(meas_gsq[:n], pred.grad_sq[:n])[later])),
        "grad_sq_rel_err_gradient_flow_median": float(np.median(rel(meas_gsq[:n], gf_gsq)[later])),
        "dist_end_flow": float(np.linalg.norm(params[n - 1] - flow.w[n - 1])),
        "dist_end_gradient_flow": float(np.linalg.norm(params[n - 1] - gf_w[n - 1])),
        "seconds_discrete": t_discrete, "seconds_flow": t_flow, "hvp_flow": int(hvp_flow),
        "flow_nfev": flow.nfev, "flow_success": flow.success,
    }
    if meas_sharp is not None:
        probe_sharp = meas_sharp[~np.isnan(meas_sharp)][:n]
        res["sharpness_over_edge_in_edge_phase_mean"] = float(np.mean(probe_sharp[edge_phase[:n]] / flow.edge))
        res["sharpness_over_edge_in_edge_phase_median"] = float(np.median(probe_sharp[edge_phase[:n]] / flow.edge))
    series = {"step": probe_steps[:n], "loss_measured": meas_loss[:n], "loss_flow": pred.loss[:n],
              "loss_flow_mean_only": pred.loss_mean[:n], "loss_gradient_flow": gf_loss[:n],
              "grad_sq_measured": meas_gsq[:n], "grad_sq_flow": pred.grad_sq[:n],
              "grad_sq_gradient_flow": gf_gsq, "sigma2": flow.sigma2[:n],
              "sharpness_flow": flow.eigenvalues[:n, 0],
              "sharpness_measured": meas_sharp[:n] if meas_sharp is not None else np.full(n, np.nan),
              "lag1_measured": lag[:n], "lag1_flow": pred.block_lag1[:n]}
    res["series"] = {k: np.round(np.asarray(v, float), 6).tolist() for k, v in series.items()}
    res["second_half_averages"] = late_averages(series, steps // 2)
    ph = edge_phase[:n] & later
    if ph.sum() > 2:
        rho = spearmanr(lag[:n][ph].ravel(), pred.block_lag1[:n][ph].ravel()).statistic
        res["lag1_spearman_layers_x_time"] = float(rho)
        res["lag1_mean_measured_per_layer"] = np.nanmean(lag[:n][ph], 0).round(3).tolist()
        res["lag1_mean_predicted_per_layer"] = np.nanmean(pred.block_lag1[:n][ph], 0).round(3).tolist()
    return res


def main(argv=()):
    torch.set_num_threads(1)
    if "--plain-start" in argv:  # momentum 0.8 again, flows started at w0 (added to the same file)
        out = json.loads(OUT.read_text())
        out["runs_plain_start"] = [one_run(m, b, 300, shift_start=False) for m, b in RUNS if b == 0.8]
        for r in out["runs_plain_start"]:
            r["second_half_averages"] = late_averages(r["series"], r["steps"] // 2)
        store.atomic_write_json(OUT, out)
        return
    if "--summarise" in argv:  # recompute the second-half averages from the stored series
        out = json.loads(OUT.read_text())
        for r in out["runs"]:
            r["second_half_averages"] = late_averages(r["series"], r["steps"] // 2)
            print(r["method"], r["momentum"], json.dumps(r["second_half_averages"]))
        store.atomic_write_json(OUT, out)
        return
    quick = "--quick" in argv
    steps = 100 if quick else 300
    runs = RUNS[:1] if quick else RUNS
    out = {"command": "python -m analyses central_flow" + (" --quick" if quick else ""),
           "network": f"mlp hidden={HIDDEN} {ACTIVATION} on linreg n_train={N_TRAIN}, MSE, full batch "
                      f"(discrete float32 through the training loop, flows float64)",
           "edge": EDGE, "runs": []}
    for m, b in runs:  # written after each run: a long analysis leaves its finished part
        out["runs"].append(one_run(m, b, steps))
        out["complete"] = len(out["runs"]) == len(runs)
        if not quick:
            store.atomic_write_json(OUT, out)
        print(json.dumps(out["runs"][-1], indent=1), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
