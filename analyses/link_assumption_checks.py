"""Checks behind the link's failure analysis (docs/findings/link.md): rerun the
12 runs of ``experiments/specs/link_seed_cnn.toml`` (bit-identical to the store's: same
configs, one thread) with two extra measurements at every probe, then score model variants
that use them. Writes ``results/link_assumption_checks.json``. About 5 CPU-minutes:

    .venv/bin/python -m analyses link_assumption_checks [--fixed-theta]

1. Each layer's share ‖v_l‖² of the network's top Ritz vector (the tracer's Lanczos vector
   for ``sharpness_global``), used instead of the estimate λ_max,l / λ_max(H) of
   :func:`experiments.linking.predict.with_global_mode` (its ``share`` argument).
2. The exact full-batch gradient energy ‖∇f_l‖² (all 4000 training examples, eval mode), and
   a drift term built from it: predicted ρ' = (Σ lag1 + c·D)/(Σ E g² + D) with
   D = max(‖∇f_l‖² − E‖H x‖²_NQM, 0) and c ∈ {1, 0.8, 0.5}.
3. ``--fixed-theta`` (two runs, ~1 CPU-minute; merged into the same JSON): at probes 100,
   300 and 700 of a plateau run (HB, α = 0.02, β = 0.6) and an edge-of-stability run (NAG,
   α = 0.05, β = 0.9), 32 independent mini-batch gradients at the *fixed* parameters: the
   mean cosine of independent pairs and the signal fraction S/(S+N) (train mode, with
   dropout, and eval mode), to tell a shared mean gradient from correlation made by the
   motion of the parameters.
"""

import json
from pathlib import Path

import numpy as np
import torch

import xarray as xr

from experiments import store
from experiments.linking import core as link
from experiments.linking.report import link_scores
from experiments.linking.scores import agreement_scores
from experiments.runs.config import run_id
from experiments.runs.data import load_data
from experiments.runs.loop import make_loss_fn, train
from experiments.sweeps import SPECS_DIR, expand, load_spec

SPEC = SPECS_DIR / "link_seed_cnn.toml"
OUT = Path(__file__).resolve().parents[1] / "results" / "link_assumption_checks.json"


def measure():
    """{run_id: [(probe step, top-mode shares per layer, full-batch ‖∇f_l‖² per layer)]}."""
    data = load_data("mnist1d")
    loss_fn = make_loss_fn("classify")
    current = []

    def probe(self):
        v = self.global_top_vector.detach().double().cpu()
        layer_of = np.asarray(self.tensor_layer)
        share = np.zeros(len(self.layers))
        np.add.at(share, layer_of, [c.pow(2).sum().item() for c in v.split([p.numel() for p in self.params])])
        was = self.model.training
        self.model.eval()
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_fn(self.model, (data.x_train, data.y_train)), self.params)
        self.model.train(was)
        signal = np.zeros(len(self.layers))
        np.add.at(signal, layer_of, [g.double().pow(2).sum().item() for g in grads])
        current.append((int(self.step), share.tolist(), signal.tolist()))

    out = {}
    for config in expand(load_spec(SPEC)):
        current.clear()
        train(config, on_probe=probe)
        out[run_id(config)] = list(current)
    return out


def scores_with_measured_shares(measured, dirs):
    linked = []
    for d in dirs:
        trace = store.load_run(d)
        shares = xr.DataArray(np.array([p[1] for p in measured[d.name]]), dims=("probe_step", "layer"),
                              coords={"probe_step": trace.probe_step, "layer": trace.layer})
        ds = link.link_trace(trace, top_mode_shares=shares)
        ds.attrs["run_id"] = d.name
        linked.append(ds)
    return link_scores(link.stack_runs(linked))["grad_corr"]


def scores_with_drift(measured, dirs):
    out = {}
    linked = []
    for d in dirs:
        ds = link.link_run(d)
        stationary = link.link_run(d, prediction="stationary", write=False)
        ds["signal"] = (("probe_step", "layer"), np.array([p[2] for p in measured[d.name]]))
        ds["fluct"] = stationary["pred_full_grad_sq_norm"]
        linked.append(ds)
    ds = link.stack_runs(linked)
    lag = ds.pred_grad_corr * ds.pred_grad_sq_norm
    drift = np.maximum(ds.signal - ds.fluct, 0)
    for c in (1.0, 0.8, 0.5):
        out[f"c={c}"] = agreement_scores((lag + c * drift) / (ds.pred_grad_sq_norm + drift), ds.meas_grad_corr)
    fraction = ds.signal / ds.meas_grad_sq_norm
    out["median_signal_fraction_by_probe_step"] = dict(zip(
        map(int, ds.probe_step.values), np.round(fraction.median(["run", "layer"]).values, 4).tolist()))
    return out


def fixed_theta(settings=(("hb", 0.02, 0.6), ("nag", 0.05, 0.9)), steps=(100, 300, 700), batches=32):
    """{run label: {probe step: {layer: {pair_cos, signal_fraction_train, signal_fraction_eval}}}}."""
    import torch.nn.functional as F

    data = load_data("mnist1d")
    x, y = data.x_train, data.y_train
    loss_fn = make_loss_fn("classify")
    found = {}

    def probe(self):
        if self.step not in steps:
            return
        gen = torch.Generator().manual_seed(self.step)
        was = self.model.training
        flat = lambda gs: torch.cat([g.flatten() for g in gs]).double()  # noqa: E731
        with torch.enable_grad(), torch.random.fork_rng():
            self.model.train()
            G = torch.stack([flat(torch.autograd.grad(loss_fn(self.model, (x[i], y[i])), self.params))
                             for i in (torch.randperm(len(y), generator=gen)[:32] for _ in range(batches))])
            self.model.eval()
            full = flat(torch.autograd.grad(loss_fn(self.model, (x, y)), self.params))
        self.model.train(was)
        owner = np.repeat(np.asarray(self.tensor_layer), [p.numel() for p in self.params])
        row = {}
        for li, layer in enumerate(self.layers):
            M = G[:, torch.as_tensor(owner == li)]
            mean = M.mean(0)
            noise = ((M - mean) ** 2).sum(1).mean().item() * batches / (batches - 1)
            s_train = (mean ** 2).sum().item() - noise / batches
            s_eval = (full[torch.as_tensor(owner == li)] ** 2).sum().item()
            row[layer] = {"pair_cos": float(np.mean([F.cosine_similarity(M[2 * k], M[2 * k + 1], 0).item()
                                                     for k in range(batches // 2)])),
                          "signal_fraction_train": s_train / (s_train + noise),
                          "signal_fraction_eval": s_eval / (s_eval + noise)}
        found.setdefault("now", {})[int(self.step)] = row

    out = {}
    for config in expand(load_spec(SPEC)):
        if (config.opt, config.lr, config.momentum) in settings:
            found.clear()
            train(config, on_probe=probe)
            out[f"{config.opt} lr={config.lr:g} momentum={config.momentum:g}"] = found["now"]
    return out


def main(argv=()):
    torch.set_num_threads(1)
    if "--fixed-theta" in argv:
        result = json.loads(OUT.read_text()) if OUT.exists() else {}
        result["fixed_theta"] = fixed_theta()
        store.atomic_write_json(OUT, result)
        print(json.dumps(result["fixed_theta"], indent=1))
        return
    measured = measure()
    dirs = link.run_dirs(SPEC)
    if len(dirs) != len(measured):
        raise SystemExit(f"run the sweep first: optdyn sweep {SPEC} --workers 1")
    result = {
        "command": "python -m analyses link_assumption_checks",
        "default": link_scores(link.stack_runs([link.link_run(d) for d in dirs]))["grad_corr"],
        "measured_top_mode_shares": scores_with_measured_shares(measured, dirs),
        "drift_from_full_batch_gradient": scores_with_drift(measured, dirs),
    }
    if OUT.exists() and "fixed_theta" in json.loads(OUT.read_text()):
        result["fixed_theta"] = json.loads(OUT.read_text())["fixed_theta"]
    store.atomic_write_json(OUT, result)
    print(json.dumps(result, indent=1))
