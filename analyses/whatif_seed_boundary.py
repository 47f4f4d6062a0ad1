"""The seed setting's runs before their decay (docs/findings/whatif.md, "Eighth round"): per run of
the seed setting seen so far (``seed_cnn.toml``'s seed 0 and ``whatif_eval{3,4,8,9}_decay.toml``'s),
whether its layers' sharpness rose after the step-1000 decay (the mean over the probes 1500–1900
over the mean over 1000–1400, the median over layers > 1) and its norms grew (the median layer's
growth from the window 1000–1099 to 1800–1899 > 1), beside what the run showed before the decay,
over the probes 700–1000: the network's λ_max, h/edge (lr·λ_max over the method's edge), the
gradient's signal:noise (Σ‖E g_l‖² over Σ tr Σ_l / B, the probe's ``grad_signal`` / ``grad_noise``)
and the mean training loss of steps 900–999. Prints one line per run, writes
``results/whatif_seed_boundary.json``:

    .venv/bin/python -m analyses whatif_seed_boundary     # seconds (reads the store)
"""

from pathlib import Path

import numpy as np

from analyses.whatif_scores import ROOT, seed_config
from dynamics.quadratic import stability_edge
from experiments.linking.core import run_method
from experiments.runs.config import run_id
from experiments.store import atomic_write_json, load_run
from experiments.sweeps import SPECS_DIR, expand, load_spec

OUT = Path(__file__).resolve().parents[1] / "results" / "whatif_seed_boundary.json"
SPECS = ("whatif_eval3_decay", "whatif_eval4_decay", "whatif_eval8_decay", "whatif_eval9_decay")


def before_and_after(trace):
    """The module docstring's quantities of one run of the seed setting."""
    p = trace["probe_step"].values
    method, momentum = run_method(trace.attrs["config"])
    before = (p >= 700) & (p <= 1000)
    lam = float(trace["sharpness_global"].values[before].mean())
    sh = trace["sharpness"].transpose("probe_step", "layer").values
    rise = sh[(p >= 1500) & (p < 2000)].mean(0) / sh[(p >= 1000) & (p < 1500)].mean(0)
    g2 = trace["grad_norm"].transpose("step", "layer").values ** 2
    growth = np.sqrt(g2[1800:1900].mean(0) / g2[1000:1100].mean(0))
    signal = float(trace["grad_signal"].sum("layer").values[before].mean())
    noise = float(trace["grad_noise"].sum("layer").values[before].mean())
    return {"lr": float(trace.attrs["config"]["lr"]), "seed": int(trace.attrs["config"]["seed"]),
            "sharpness_rose": bool(np.median(rise) > 1), "norms_grew": bool(np.median(growth) > 1),
            "sharpness_rise": rise.tolist(), "growth": growth.tolist(), "lambda_max": lam,
            "h_edge": float(trace["lr"].values[999]) * lam / float(stability_edge(method, momentum)),
            "signal_to_noise": signal / noise, "loss": float(np.mean(trace["loss"].values[900:1000]))}


def main(argv=()):
    configs = [seed_config(), *(c for s in SPECS for c in expand(load_spec(SPECS_DIR / f"{s}.toml")))]
    rows = []
    for c in sorted(configs, key=lambda c: c.lr):
        r = before_and_after(load_run(ROOT / run_id(c)))
        rows.append(r)
        print(f"lr {r['lr']:<5g} seed {r['seed']}: sharpness rose {r['sharpness_rose']!s:5}, norms grew "
              f"{r['norms_grew']!s:5} (median x{np.median(r['growth']):.2f}); before: λ_max {r['lambda_max']:.1f}, "
              f"h/edge {r['h_edge']:.2f}, signal:noise {r['signal_to_noise']:.2f}, loss {r['loss']:.2f}")
    atomic_write_json(OUT, {"command": "python -m analyses whatif_seed_boundary", "runs": rows})
    return 0
