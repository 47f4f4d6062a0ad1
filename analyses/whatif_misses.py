"""Where the predictor in use misses the norm-change sign (docs/findings/whatif.md, "Eighth round"):
per change kind, over the checks of the named groups of :data:`analyses.whatif_scores.GROUPS`
(default: :func:`analyses.whatif_scores.default_groups`), the layer-windows whose fork norm moved
by more than 10 % from window 0 (the ``norm_sign`` cases), split into rises and falls, with the
fraction the predictor in use gets right; and, for the falls, the median measured and predicted
*effect* (the fork's norm over the unchanged run's, the same data order). Prints one line per
change kind; then, per check whose run
has an lr × 2 fork, its h̄ (the network h/edge before k), λ̄/λ_0 (:func:`sharpened`) and the
measured h/edge after k (the mean over the probes of the two windows) over h̄, for the lr × 2 fork
and for the unchanged run, and their ratio (2 at a fixed curvature, 1 at the held level); runs
held at h̄ ≥ :data:`HELD` first:

    .venv/bin/python -m analyses whatif_misses                       # ~5 min (the forks are in the store)
    .venv/bin/python -m analyses whatif_misses development evaluation_3
    .venv/bin/python -m analyses whatif_misses --candidate sharpen_decay_run     # another candidate's misses

Then, per change kind, the *effect* cases (the ``effect_sign`` score's: the fork's norm over the
unchanged run's moved by more than 10 %): the fraction with the sign right, how often the measured
and the predicted effect are rises, and their medians.
"""

import collections

import numpy as np

from analyses.whatif_scores import CANDIDATES, GROUPS, checks
from experiments import store
from experiments.whatif.check import check
from experiments.whatif.predict import PREDICTOR

MOVED = np.log(1.1)  # the norm-sign score's threshold
HELD = 0.2  # h̄ from which a run's λ_max is taken as held by its lr (the seed setting's 0.20-0.23)


def kind(label):
    """The change's kind: its label without the momentum's or the method's value (``lr×2`` stays)."""
    return label.split("=")[0]


def tally(ds, out):
    """Add one check's (``experiments.whatif.check.check`` dataset) moved cases to ``out``:
    {kind: {"rise": [right...], "fall": [right...], "fall_effect": [(measured, predicted)...],
    "effect": [(measured, predicted)...]}}; ``effect``: the effect (the fork's norm over the
    unchanged run's, same window) where it moved by more than 10 % (the ``effect_sign`` cases)."""
    base = ds.persist_grad_norm.isel(change=0, window=1).values
    for c in range(1, ds.sizes["change"]):
        rows = out[kind(str(ds.label.values[c]))]
        for w in range(1, ds.sizes["window"]):
            meas = ds.meas_grad_norm.isel(change=c, window=w).values / base
            pred = ds.pred_grad_norm.isel(change=c, window=w).values / base
            meas_ref = ds.meas_grad_norm.isel(change=0, window=w).values / base
            pred_ref = ds.pred_grad_norm.isel(change=0, window=w).values / base
            for i in np.flatnonzero(np.isfinite(meas) & (np.abs(np.log(meas)) > MOVED)):
                right = bool(np.sign(np.log(pred[i])) == np.sign(np.log(meas[i])))
                rows["rise" if meas[i] > 1 else "fall"].append(right)
                if meas[i] < 1:
                    rows["fall_effect"].append((meas[i] / meas_ref[i], pred[i] / pred_ref[i]))
            eff_m, eff_p = meas / meas_ref, pred / pred_ref
            for i in np.flatnonzero(np.isfinite(eff_m) & (np.abs(eff_m - 1) > 0.1)):  # check.GROWTH_THRESHOLD
                rows["effect"].append((eff_m[i], eff_p[i]))


def sharpened(run_dir, at, smooth=3):
    """λ̄/λ_0: the network's λ_max, the mean over the last ``smooth`` probes at or before ``at``,
    over the first probe's (how far the run sharpened from its initialization)."""
    trace = store.load_run(run_dir)
    lam = trace["sharpness_global"].sel(probe_step=trace["probe_step"].values <= at).values
    return float(np.mean(lam[-smooth:]) / lam[0])


def main(argv=()):
    import torch

    torch.set_num_threads(1)
    argv = list(argv)
    predictor, name = PREDICTOR, "the predictor in use"
    if "--candidate" in argv:
        i = argv.index("--candidate")
        name = argv[i + 1] if i + 1 < len(argv) else ""
        if name not in CANDIDATES:
            raise ValueError(f"candidate={name!r} is unknown; valid: {', '.join(CANDIDATES)}")
        predictor, argv = CANDIDATES[name], argv[:i] + argv[i + 2:]
    bad = [g for g in argv if g not in GROUPS]
    if bad:
        raise ValueError(f"groups={bad}: not among the valid groups {list(GROUPS)}")
    print(f"predictor: {name}")
    out = collections.defaultdict(lambda: {"rise": [], "fall": [], "fall_effect": [], "effect": []})
    held, lazy = [], []
    for group, items in checks(list(argv) or None).items():
        for key, (run_dir, at, changes) in items.items():
            ds = check(run_dir, at, changes, n_windows=2, predictor=predictor)
            tally(ds, out)
            h0, labels = ds.attrs["persist_h_edge"], list(ds.label.values)
            if "lr×2" in labels:
                after = [float(np.nanmean(ds.meas_h_edge.isel(change=labels.index(c)).values[1:])) / h0
                         for c in ("lr×2", "scheduled")]
                line = (f"{group} {key}: h̄ {h0:.2f}, λ̄/λ_0 {sharpened(run_dir, at):.1f}; h/edge after / h̄: "
                        f"lr×2 {after[0]:.2f}, unchanged {after[1]:.2f}, ratio {after[0] / after[1]:.2f}")
                (held if h0 >= HELD else lazy).append(line)
    for name, rows in sorted(out.items()):
        eff = np.array(rows["fall_effect"]).reshape(-1, 2)
        print(f"{name:10s} rises {len(rows['rise']):4d} right {np.mean(rows['rise']):.2f} | falls "
              f"{len(rows['fall']):4d} right {np.mean(rows['fall']):.2f}; effect in the falls: median measured "
              f"x{np.median(eff[:, 0]):.2f}, predicted x{np.median(eff[:, 1]):.2f}, measured < 1 in "
              f"{np.mean(eff[:, 0] < 1):.0%}")
    print("\nthe effect (fork / unchanged run, same window) where it moved by more than 10 %:")
    for name, rows in sorted(out.items()):
        e = np.array(rows["effect"]).reshape(-1, 2)
        if len(e):
            right = np.mean(np.sign(e[:, 0] - 1) == np.sign(e[:, 1] - 1))
            print(f"{name:10s} n {len(e):4d}: sign right {right:.2f}; measured up {np.mean(e[:, 0] > 1):.2f}, "
                  f"predicted up {np.mean(e[:, 1] > 1):.2f}; median measured x{np.median(e[:, 0]):.2f}, "
                  f"predicted x{np.median(e[:, 1]):.2f}")
    print("\n".join(held))
    print("\nruns at h̄ < HELD:\n" + "\n".join(lazy))
    return 0
