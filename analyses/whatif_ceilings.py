"""Noise ceilings of the what-if scores (issue 15; docs/findings/whatif.md, "Noise ceilings"):
how much of the two scored quantities a perfect model of the change could get right, measured
on the forks themselves, no model involved.

Every check of ``analyses/whatif_scores`` (development, the seen and the new evaluation
settings; :func:`analyses.whatif_scores.checks`) is run twice: with the forks of the scores
(data order of the parent, shared by all changes) and with *replicate* forks from the same
checkpoints that differ from them only in the data order after the change
(``RunConfig.fork_data_seed`` = :data:`DATA_SEED`). Per check and pooled:

- ``control_moved``: of the layer-windows of the unchanged continuation (``scheduled``;
  windows holding no scheduled lr change), the fraction whose gradient norm moved by more
  than 10 % from window 0 (the sign score's threshold): moves with no change made;
- ``growth_sign_repeat``: where a fork's norm moved > 10 % from window 0 (the scored
  ``norm_sign`` cases), the fraction in which its replicate moved the same way (both
  directions pooled); ``effect_sign_repeat`` the same for the effect (fork over the unchanged
  run of the same data order, ``effect_sign``'s cases). With q that agreement and p the
  probability that one fork's sign is that of the expected change (the same p for both
  replicates, independent errors), q = p² + (1 − p)², so a model predicting the expected sign
  scores p = (1 + √(2q − 1))/2 (``*_ceiling``): the sign score's ceiling;
- ``corr_split_half`` / ``corr_split_alt``: :func:`experiments.linking.scores.noise_ceiling` of
  the forks' window correlations over the scored points (layers × changes × windows after the
  change) from :func:`experiments.linking.measure.split_half_windows` (first/second half and
  even/odd steps, ``align="after"`` as the what-if windows); ``corr_repeat``: the same from the
  two replicates' whole-window correlations (test-retest: the reliability is their Spearman r,
  the ceiling √r), the noise a held-out prediction actually faces;
- ``drift_share``: of the scored ``norm_sign`` cases of the changes (not ``scheduled``), the
  fraction in which the unchanged run moved by more than 10 % the same way in the same window
  (the run's own drift, there whatever the change), and the default model's norm sign on those
  cases and on the others (``model_sign_drift`` / ``model_sign_own``);
- the default model's scores against the replicate forks (``model_on_replicate``).

Writes ``results/whatif_ceilings.json`` (every group of :func:`analyses.whatif_scores.default_groups`;
with group names as arguments only those, replacing their entries in the file and keeping the others):

    .venv/bin/python -m analyses whatif_ceilings     # replicate forks the first time (~10 s each)
    .venv/bin/python -m analyses whatif_ceilings evaluation_5 evaluation_6
"""

from pathlib import Path

import numpy as np

from analyses.whatif_scores import GROUPS, checks, default_groups
from experiments.linking.measure import split_half_windows
from experiments.linking.scores import noise_ceiling
from experiments.store import atomic_write_json, load_run, read_json
from experiments.whatif.check import GROWTH_THRESHOLD, check

OUT = Path(__file__).resolve().parents[1] / "results" / "whatif_ceilings.json"
DATA_SEED = 1


def sign_repeat(a, b, threshold=GROWTH_THRESHOLD):
    """Agreement of the sign of ``a − 1`` and ``b − 1`` (ratios of two replicates) where one of
    them moved by more than ``threshold`` (each pair counted once per replicate that moved), its
    count, and the implied ceiling p = (1 + √(2q − 1))/2 (0.5 where q ≤ 0.5)."""
    a, b = np.ravel(a), np.ravel(b)
    ok = np.isfinite(a) & np.isfinite(b) & (a > 0) & (b > 0)
    a, b = a[ok], b[ok]
    agree = np.sign(a - 1) == np.sign(b - 1)
    moved = np.concatenate([np.abs(a - 1) > threshold, np.abs(b - 1) > threshold])
    if not moved.any():
        return {"n": 0, "repeat": float("nan"), "ceiling": float("nan")}
    q = float(np.mean(np.concatenate([agree, agree])[moved]))
    return {"n": int(moved.sum()), "repeat": q, "ceiling": float((1 + np.sqrt(max(2 * q - 1, 0.0))) / 2)}


def growth_and_effect(ds):
    """The measured norm growth (windows after the change over window 0) and effect (fork over
    the unchanged run in the same window), arrays (change, window, layer) / (change − 1, ...)."""
    g = ds["meas_grad_norm"].values
    grow = g[:, 1:] / g[:, :1]
    labels = list(ds["label"].values)
    i = labels.index("scheduled")
    effect = np.delete(g[:, 1:] / g[i:i + 1, 1:], i, axis=0)
    return grow, effect


def control_mask(ds):
    """Windows after the change (1..n) whose steps keep the lr in force just before it."""
    lr = load_run(ds.attrs["fork_dirs"][0])["lr"].values
    at = ds.attrs["at"]
    return np.array([np.all(lr[a:b] == lr[at - 1]) for a, b in zip(ds.start.values[1:], ds.stop.values[1:])])


def split_halves(ds):
    """Per scored point (change, window after, layer) the two split-half correlation pairs."""
    starts = ds.start.values[1:]
    width = int(ds.attrs["window"])
    halves = {k: [] for k in ("meas_half1_grad_corr", "meas_half2_grad_corr", "meas_alt1_grad_corr",
                              "meas_alt2_grad_corr")}
    for fork_dir in ds.attrs["fork_dirs"]:
        sh = split_half_windows(load_run(fork_dir), starts, width, align="after").transpose("probe_step", "layer")
        for k in halves:
            halves[k].append(sh[k].values)
    return {k: np.stack(v) for k, v in halves.items()}


def drift_share(ds):
    """``drift_share`` of the module docstring: (cases, drift cases, of those with the predicted
    sign right, of the other cases with it right)."""
    grow, _ = growth_and_effect(ds)
    i = list(ds["label"].values).index("scheduled")
    others, base = np.delete(grow, i, axis=0), grow[i][None]
    moved = np.abs(others - 1) > GROWTH_THRESHOLD
    same = moved & (np.abs(base - 1) > GROWTH_THRESHOLD) & (np.sign(base - 1) == np.sign(others - 1))
    right = np.zeros_like(moved)
    if "pred_grad_norm" in ds:
        pred = ds["pred_grad_norm"].values
        pred = np.delete(pred[:, 1:] / ds["meas_grad_norm"].values[:, :1], i, axis=0)
        right = np.sign(pred - 1) == np.sign(others - 1)
    return int(moved.sum()), int(same.sum()), int((same & right).sum()), int((moved & ~same & right).sum())


def _drift_scores(counts):
    n, drift, right_drift, right_own = counts
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {"drift_share": ratio(drift, n), "model_sign_drift": ratio(right_drift, drift),
            "model_sign_own": ratio(right_own, n - drift), "drift_n": [n, drift]}


def one_check(run_dir, at, changes):
    base = check(run_dir, at, changes, n_windows=2)
    rep = check(run_dir, at, changes, n_windows=2, data_seed=DATA_SEED)
    grow_a, eff_a = growth_and_effect(base)
    grow_b, eff_b = growth_and_effect(rep)
    sched = list(base["label"].values).index("scheduled")
    ctrl = control_mask(base)
    ctrl_a, ctrl_b = grow_a[sched][ctrl], grow_b[sched][ctrl]
    h = split_halves(base)
    corr_a, corr_b = base["meas_grad_corr"].values[:, 1:], rep["meas_grad_corr"].values[:, 1:]
    rep_r = noise_ceiling(corr_a, corr_b)["split_half"]  # Spearman r of the two replicates
    counts = drift_share(base)
    return {
        **_drift_scores(counts),
        "control_n": int(ctrl_a.size),
        "control_moved": float(np.mean(np.abs(ctrl_a - 1) > GROWTH_THRESHOLD)) if ctrl_a.size else float("nan"),
        "control_moved_replicate": float(np.mean(np.abs(ctrl_b - 1) > GROWTH_THRESHOLD)) if ctrl_b.size
        else float("nan"),
        "growth_sign": sign_repeat(grow_a, grow_b),
        "effect_sign": sign_repeat(eff_a, eff_b),
        "growth_within_1p5_repeat": float(np.mean(np.abs(np.log(grow_a / grow_b)) <= np.log(1.5))),
        "effect_within_1p5_repeat": float(np.mean(np.abs(np.log(eff_a / eff_b)) <= np.log(1.5))),
        "corr_split_half": noise_ceiling(h["meas_half1_grad_corr"], h["meas_half2_grad_corr"]),
        "corr_split_alt": noise_ceiling(h["meas_alt1_grad_corr"], h["meas_alt2_grad_corr"]),
        "corr_repeat": {"r": rep_r, "ceiling": float(np.sqrt(max(rep_r, 0.0)))},
        "model": {k: base.attrs["scores"]["model"][k] for k in ("corr_spearman", "norm_sign", "effect_sign")},
        "model_on_replicate": {k: rep.attrs["scores"]["model"][k] for k in ("corr_spearman", "norm_sign",
                                                                           "effect_sign")},
        "_arrays": (grow_a, grow_b, eff_a, eff_b, ctrl_a, ctrl_b, corr_a, corr_b, h),
        "_drift": counts,
    }


def pool(rows):
    """The pooled numbers over several checks (the arrays concatenated)."""
    cat = lambda i: np.concatenate([np.ravel(r["_arrays"][i]) for r in rows])  # noqa: E731
    grow_a, grow_b, eff_a, eff_b, ctrl_a, ctrl_b, corr_a, corr_b = (cat(i) for i in range(8))
    h = {k: np.concatenate([np.ravel(r["_arrays"][8][k]) for r in rows]) for k in rows[0]["_arrays"][8]}
    rep_r = noise_ceiling(corr_a, corr_b)["split_half"]
    return {**_drift_scores([sum(r["_drift"][i] for r in rows) for i in range(4)]), "control_n": int(ctrl_a.size),
            "control_moved": float(np.mean(np.abs(ctrl_a - 1) > GROWTH_THRESHOLD)),
            "control_moved_replicate": float(np.mean(np.abs(ctrl_b - 1) > GROWTH_THRESHOLD)),
            "growth_sign": sign_repeat(grow_a, grow_b), "effect_sign": sign_repeat(eff_a, eff_b),
            "growth_within_1p5_repeat": float(np.mean(np.abs(np.log(grow_a / grow_b)) <= np.log(1.5))),
            "effect_within_1p5_repeat": float(np.mean(np.abs(np.log(eff_a / eff_b)) <= np.log(1.5))),
            "corr_split_half": noise_ceiling(h["meas_half1_grad_corr"], h["meas_half2_grad_corr"]),
            "corr_split_alt": noise_ceiling(h["meas_alt1_grad_corr"], h["meas_alt2_grad_corr"]),
            "corr_repeat": {"r": rep_r, "ceiling": float(np.sqrt(max(rep_r, 0.0)))}}


def main(argv=()):
    import torch

    torch.set_num_threads(1)
    groups = list(argv) or default_groups()
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise ValueError(f"groups={bad}: not among the valid groups {list(GROUPS)}")
    out = read_json(OUT) if argv and OUT.exists() else {}
    out.update({"command": "python -m analyses whatif_ceilings", "data_seed": DATA_SEED})
    for group, items in checks(groups).items():
        rows = {}
        for key, (run_dir, at, changes) in items.items():
            rows[key] = one_check(run_dir, at, changes)
            print(group, key, {k: v for k, v in rows[key].items() if not k.startswith("_")}, flush=True)
        pooled = pool(list(rows.values()))
        out[group] = {"settings": {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in rows.items()},
                      "pooled": pooled}
        print(group, "pooled", pooled, flush=True)
        atomic_write_json(OUT, out)  # after each group: an interrupted run keeps the groups done
    return 0
