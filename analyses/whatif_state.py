"""The state of each what-if check's run at the fork step k (docs/findings/whatif.md, "Fourth
round"), from the run's trace alone: the network's λ_max at the first probe, at k and 200 steps
after k (capped at the run's last probe), h/edge at k (the lr of step k − 1 times λ_max at k over
the method's edge), and the default's, the trend base's and the escape forecast's correlation Spearman of the check
(from ``results/whatif_scores.json``). Prints one line per check:

    .venv/bin/python -m analyses whatif_state      # seconds (reads the store and the scores)
"""

import json

from analyses.whatif_scores import GROUPS, OUT, setting_checks
from dynamics.quadratic import stability_edge
from experiments.linking.core import run_method
from experiments.store import load_run


def main(argv=()):
    scores = json.loads(OUT.read_text())
    for group, (spec, steps) in GROUPS.items():
        for key, (run_dir, at, _) in setting_checks(spec, steps).items():
            trace = load_run(run_dir)
            method, momentum = run_method(trace.attrs["config"])
            lam = trace["sharpness_global"]
            last = int(trace["probe_step"].values.max())
            h = float(trace["lr"].values[at - 1] * lam.sel(probe_step=at)) / float(stability_edge(method, momentum))
            sc = scores.get(group, {}).get("settings", {}).get(key, {})
            sp = {n: round(sc[n]["corr_spearman"], 2) for n in ("model", "delta_trend", "escape") if n in sc}
            print(f"{group:36s} {key:26s} λ_max first {float(lam.values[0]):.2f}, at k {float(lam.sel(probe_step=at)):.2f}, "
                  f"k+200 {float(lam.sel(probe_step=min(at + 200, last))):.2f}; h/edge at k {h:.3f}; Spearman {sp}")
    return 0
