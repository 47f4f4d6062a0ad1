"""Where the plateau-escape forecast (:mod:`experiments.whatif.escape`) acts (docs/findings/
whatif.md, "Fifth round"): per what-if check of the groups named (default: all of
:data:`analyses.whatif_scores.GROUPS`), the network's λ_max at the probes at or before k and
at the run's next two probes, the fitted escape rate, the changes for which the escape is due
within the horizon and, for those, the forecast h/edge at each window's first step against the
fork's measurement (its probe at k + 100; the probe at k is an input, so window 1 has none):

    .venv/bin/python -m analyses whatif_escape_due [GROUP ...]   # seconds (the forks are in the store)
"""

import sys

import numpy as np

from analyses.whatif_scores import GROUPS, setting_checks
from experiments.linking.core import run_method
from experiments.store import load_run
from experiments.whatif.check import check
from experiments.whatif.curvature import flow_time
from experiments.whatif.escape import escape_path, fit_escape, predictor
from experiments.whatif.predict import plan


def main(argv=()):
    import torch

    torch.set_num_threads(1)
    groups = list(argv) or list(GROUPS)
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        print(f"groups={bad} are unknown; valid: {', '.join(GROUPS)}", file=sys.stderr)
        return 2
    for g in groups:
        for key, (run_dir, at, changes) in setting_checks(*GROUPS[g]).items():
            trace = load_run(run_dir)
            config = trace.attrs["config"]
            _, momentum = run_method(config)
            p = trace["probe_step"].values
            keep = p[p <= at]
            lam = trace["sharpness_global"].sel(probe_step=keep).values
            esc = fit_escape(flow_time(trace["lr"].values, momentum)[keep], lam)
            horizon = at + 2 * (keep[-1] - keep[-2] if keep.size > 1 else 100)
            due = [ch.label for ch in changes if escape_path(esc, at, plan(config, at, ch, horizon))[2]]
            later = trace["sharpness_global"].sel(probe_step=p[(p > at) & (p <= horizon)]).values
            print(f"{g} {key}: λ_max at the probes ≤ k {np.round(lam, 3).tolist()}, after k "
                  f"{np.round(later, 2).tolist()}; rate {esc.rate:.3g}; due for {due}")
            if due:
                ds = check(run_dir, at, changes, n_windows=2, predictor=predictor())
                for c, label in enumerate(ds.label.values):
                    if label in due:
                        print(f"    {label}: h/edge forecast {np.round(ds.pred_h_edge.isel(change=c).values[1:], 3)}"
                              f", fork {np.round(ds.meas_h_edge.isel(change=c).values[1:], 3)}")
    return 0
