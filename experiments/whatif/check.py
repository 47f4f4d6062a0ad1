r"""``whatif --check``: make each change for real (a fork from the run's checkpoint at k,
:mod:`experiments.runs.checkpoint`) and score the predictions against the forks, beside
persistence (docs/theory.md §9).

Scores (:func:`scores`, over layers × changes × the windows after k):

- ``corr_spearman`` / ``corr_mae``: rank correlation and mean absolute error of the predicted
  vs forked successive-gradient correlation;
- ``norm_sign``: where the forked gradient norm moved by more than 10 % from window 0, the
  fraction whose predicted change has the same sign (persistence predicts no change: 0);
- ``norm_factor_1p5``: the fraction whose predicted norm growth (window j / window 0) is
  within a factor 1.5 of the forked one; ``norm_log_mae`` the mean |log10 pred/meas|;
- ``ratio_mae``: mean absolute error of the update:parameter ratio (decades);
- ``h_edge_rel_error``: median |pred/meas − 1| of the network's h/edge; ``regime_agreement``;
  ``h_edge_layer_rel_error`` and ``regime_layer_agreement`` the same per layer (block top mode);
- ``effect_sign`` / ``effect_factor_1p5``: the same two norm scores for the *effect* of the
  change, the norm in the fork over the norm in the unchanged run in the same window (the
  ``scheduled`` change, which must then be among the changes). The forks share the data
  order and random streams from k on, so this paired ratio cancels the fluctuation common to
  all of them, which no model of the change can predict (persistence: no effect, 0).

Each score is given for the model, persistence and the trend baseline (window 0 carried along the
run's own trend before k, :func:`experiments.whatif.predict.whatif`'s ``trend_*``): persistence
predicts no norm move, so its norm sign is 0 by construction; the trend baseline shows how many
of the norm moves a forecaster without theory gets right. Neither predicts an effect (0).
"""

import re
from pathlib import Path

import numpy as np
import xarray as xr
from scipy import stats

from experiments import store
from experiments.linking.core import run_method
from experiments.runs import checkpoint
from experiments.runs.config import RunConfig, run_id
from experiments.runs.loop import run, train
from experiments.whatif.predict import diverged_step, fork_config, measure_windows, whatif, window_bounds

GROWTH_THRESHOLD = 0.10  # a norm change counts (for the sign score) above 10 %
FACTOR = 1.5


def check(run_dir, at, changes, *, window=None, n_windows=2, predictor=None, data_dir=None, progress=False,
          data_seed=0):
    """:func:`experiments.whatif.predict.whatif` of the run at ``run_dir`` plus, per change,
    the fork's measured windows (``meas_*``) and ``attrs["scores"]`` (:func:`scores`). Forks
    go to the run's store root (``run_dir``'s parent), under their run ids; a change that
    changes nothing (``scheduled``) is read from the run itself when it is long enough.
    ``data_seed`` ≥ 1: every fork (``scheduled`` too) draws its data order afresh from ``at``
    on with that seed (a replicate of the check that differs only in the data order); the
    fork directories are in ``attrs["fork_dirs"]``. ``meas_diverged_step`` (change): the step at
    which the fork diverged (non-finite loss or gradient) inside the horizon, −1 if it did not;
    the windows it falls in or after have no measurement (NaN, left out of the scores)."""
    run_dir = Path(run_dir)
    if not re.fullmatch(r"[0-9a-f]{16}", run_dir.name):
        raise ValueError(f"run_dir={str(run_dir)!r}: --check forks need the run in a store root under a run id "
                         f"(ROOT/<16 hex digits>, as sweeps write it); forks are written beside it")
    trace = store.load_run(run_dir)
    config = trace.attrs["config"]
    ds = whatif(trace, at, changes, window=window, n_windows=n_windows, predictor=predictor)
    windows = window_bounds(at, ds.attrs["window"], ds.attrs["n_windows"])
    horizon = windows[-1][1]
    measured, dirs, diverged = [], [], []
    for change in changes:
        overrides = change.fork_overrides(config)
        if not overrides and not data_seed and trace.sizes["step"] >= horizon:
            forked, fork_dir = trace, run_dir
        else:
            ensure_checkpoint(run_dir, at, data_dir=data_dir)
            fork = RunConfig.from_dict(fork_config(config, run_dir.name, at, change, horizon, data_seed=data_seed))
            fork_dir = run_dir.parent / run_id(fork)
            run(fork, fork_dir, data_dir=data_dir, progress=progress)
            forked = store.load_run(fork_dir)
        dirs.append(str(fork_dir))
        div = diverged_step(forked)  # a fork that diverges is a result: its windows from then on are not measured
        diverged.append(-1 if div is None or div >= horizon else div)
        method, momentum = run_method({**config, **overrides})
        m = measure_windows(forked, windows, method, momentum, after=at)
        if diverged[-1] >= 0:  # a window the divergence falls in has no finite mean: not measured
            gone = xr.DataArray([b > diverged[-1] for _, b in windows], dims="window")
            m = m.assign({k: m[k].where(~gone) if m[k].dtype.kind == "f" else m[k].where(~gone, "")
                          for k in m.data_vars})
        measured.append(m)
    meas = xr.concat(measured, dim="change").assign_coords(change=ds.change)
    for k in ("grad_corr", "grad_norm", "update_ratio", "h_edge", "regime", "h_edge_layer", "regime_layer"):
        ds[f"meas_{k}"] = meas[k]
    ds["meas_diverged_step"] = ("change", np.array(diverged, dtype=int))
    ds = ds.transpose("change", "window", "layer")
    ds.attrs["scores"] = scores(ds)
    ds.attrs["fork_dirs"] = dirs
    return ds


class _Stop(Exception):
    pass


def ensure_checkpoint(run_dir, step, *, data_dir=None):
    """Make sure the finished run ``run_dir`` has a checkpoint after ``step`` steps: if it has
    none, train its config up to ``step`` again and save the state there. That is the run's own
    state only where training repeats the run bit for bit: on the CPU, the same ``threads`` and
    the same instruction set of torch's kernels (``cpu_capability``; docs/findings/faults.md).
    The remade steps' losses are compared with the run's trace; where they differ (a store made
    on another machine) no checkpoint is saved and a ValueError says so: forks from it would
    start from another trajectory than the one the prediction reads."""
    if checkpoint.path(run_dir, step).exists():
        return
    parent = store.read_json(Path(run_dir) / store.CONFIG)
    config = RunConfig.from_dict({**parent, "checkpoint_every": int(step)})
    if not 1 <= step <= config.steps:
        raise ValueError(f"step={step} is outside the valid range [1, steps={config.steps}]")
    trace = store.load_run(run_dir)
    stored = trace["loss"].values[:step]

    def keep(state):
        remade = state["record"]["losses"].numpy()
        differ = ~((remade == stored) | (np.isnan(remade) & np.isnan(stored)))
        if differ.any():
            raise ValueError(_not_repeated(run_dir, step, int(np.argmax(differ)), stored, remade,
                                           trace.attrs.get("summary", {})))
        state["config"] = RunConfig.from_dict(parent).to_dict()
        checkpoint.save(run_dir, state)
        raise _Stop

    try:
        train(config, data_dir=data_dir, on_checkpoint=keep)
    except _Stop:
        return
    raise ValueError(f"run_dir={str(run_dir)!r}: the run ended (diverged?) before step {step}")


def _not_repeated(run_dir, step, first, stored, remade, summary):
    import torch

    made = f"cpu_capability={summary.get('cpu_capability', 'not recorded')}, threads={summary.get('threads')}"
    here = f"cpu_capability={torch.backends.cpu.get_cpu_capability()}, threads={torch.get_num_threads()}"
    return (f"run_dir={str(run_dir)!r}: remaking its checkpoint at step {step} does not repeat the run (its loss "
            f"first differs at step {first}: {float(stored[first]):.9g} stored, {float(remade[first]):.9g} here; made with {made}, "
            f"here {here}); make the checkpoints where the run was made (checkpoint_every) or train it again here")


def scores(ds):
    """The scores of the module docstring for the model (``pred_``), persistence (``persist_``)
    and, where ``ds`` has it, the trend baseline (``trend_``: its h/edge and regime are
    persistence's), over the windows after the change (a dict)."""
    after = ds.isel(window=slice(1, None))
    meas0 = ds["meas_grad_norm"].isel(window=0)
    out = {}
    names = [("model", "pred_"), ("persistence", "persist_")]
    names += [("trend", "trend_")] if "trend_grad_norm" in ds else []
    for name, prefix in names:
        corr_p, corr_m = _flat(after[f"{prefix}grad_corr"], after["meas_grad_corr"])
        grow_p, grow_m = _flat(after[f"{prefix}grad_norm"] / meas0, after["meas_grad_norm"] / meas0)
        ok = np.isfinite(grow_p) & np.isfinite(grow_m) & (grow_p > 0) & (grow_m > 0)
        moved = ok & (np.abs(grow_m - 1) > GROWTH_THRESHOLD)
        log_err = np.abs(np.log10(grow_p[ok] / grow_m[ok]))
        ratio_p, ratio_m = _flat(after[f"{prefix}update_ratio"], after["meas_update_ratio"])
        if prefix == "pred_":
            h_p, reg_p = after["pred_h_edge"].values.ravel(), after["pred_regime"].values.ravel()
        else:
            h_p = np.full(after["meas_h_edge"].size, ds.attrs["persist_h_edge"])
            reg_p = np.broadcast_to(ds["meas_regime"].isel(window=0).values[:, None],
                                    after["meas_regime"].shape).ravel()
        if prefix == "pred_":
            hl_p, rl_p = _flat(after["pred_h_edge_layer"], after["meas_h_edge_layer"])
            rl = xr.broadcast(after["pred_regime_layer"], after["meas_regime_layer"])
            rl_pred, rl_meas = rl[0].values.ravel(), rl[1].transpose(*rl[0].dims).values.ravel()
        else:
            hl_p, rl_p = _flat(ds["persist_h_edge_layer"], after["meas_h_edge_layer"])
            rl_meas = after["meas_regime_layer"].values
            rl_pred = np.broadcast_to(ds["meas_regime_layer"].isel(window=0).values[:, None, :], rl_meas.shape).ravel()
            rl_meas = rl_meas.ravel()
        hl_ok = rl_p > 0
        rl_ok = rl_meas != ""
        h_m, reg_m = after["meas_h_edge"].values.ravel(), after["meas_regime"].values.ravel()
        h_ok = np.isfinite(h_m) & np.isfinite(h_p) & (h_m > 0)
        reg_ok = reg_m != ""
        effect = _effect_scores(ds, prefix)
        out[name] = {
            "n": int(corr_p.size),
            "corr_spearman": _spearman(corr_p, corr_m),
            "corr_mae": float(np.mean(np.abs(corr_p - corr_m))) if corr_p.size else np.nan,
            "norm_n_moved": int(moved.sum()),
            "norm_sign": float(np.mean(np.sign(grow_p[moved] - 1) == np.sign(grow_m[moved] - 1)))
            if moved.any() else np.nan,
            "norm_factor_1p5": float(np.mean(log_err <= np.log10(FACTOR))) if ok.any() else np.nan,
            "norm_log_mae": float(np.mean(log_err)) if ok.any() else np.nan,
            "ratio_mae": float(np.mean(np.abs(ratio_p - ratio_m))) if ratio_p.size else np.nan,
            "h_edge_rel_error": float(np.median(np.abs(h_p[h_ok] / h_m[h_ok] - 1))) if h_ok.any() else np.nan,
            "regime_agreement": float(np.mean(reg_p[reg_ok] == reg_m[reg_ok])) if reg_ok.any() else np.nan,
            "h_edge_layer_rel_error": float(np.median(np.abs(hl_p[hl_ok] / rl_p[hl_ok] - 1)))
            if hl_ok.any() else np.nan,
            "regime_layer_agreement": float(np.mean(rl_pred[rl_ok] == rl_meas[rl_ok])) if rl_ok.any() else np.nan,
            **effect,
        }
    return out


def _effect_scores(ds, prefix):
    labels = list(ds["label"].values)
    if "scheduled" not in labels or len(labels) < 2:
        return {"effect_n_moved": 0, "effect_sign": np.nan, "effect_factor_1p5": np.nan}
    after = ds.isel(window=slice(1, None))
    base = after.isel(change=labels.index("scheduled"))
    others = after.isel(change=[i for i, lab in enumerate(labels) if lab != "scheduled"])
    eff_p, eff_m = _flat(others[f"{prefix}grad_norm"] / base[f"{prefix}grad_norm"],
                         others["meas_grad_norm"] / base["meas_grad_norm"])
    moved = np.abs(eff_m - 1) > GROWTH_THRESHOLD
    return {"effect_n_moved": int(moved.sum()),
            "effect_sign": float(np.mean(np.sign(eff_p[moved] - 1) == np.sign(eff_m[moved] - 1)))
            if moved.any() else np.nan,
            "effect_factor_1p5": float(np.mean(np.abs(np.log10(eff_p / eff_m)) <= np.log10(FACTOR)))
            if eff_p.size else np.nan}


def _flat(pred, meas):
    pred, meas = xr.broadcast(pred, meas)
    p, m = pred.values.astype(float), meas.transpose(*pred.dims).values.astype(float)
    keep = np.isfinite(p) & np.isfinite(m)
    return p[keep], m[keep]


def _spearman(p, m):
    if p.size < 3 or np.ptp(p) == 0 or np.ptp(m) == 0:
        return np.nan
    return float(stats.spearmanr(p, m).statistic)


def format_scores(sc):
    """The scores as a small table: model, persistence and, where scored, the trend baseline."""
    keys = list(next(iter(sc.values())))
    names = [n for n in ("model", "persistence", "trend") if n in sc]
    lines = ["".join([f"{'score':<18}{'model':>12}"] + [f"{n:>14}" for n in names[1:]])]
    cell = lambda v: f"{v:.3g}" if np.isfinite(v) else "n/a"  # noqa: E731
    for k in keys:
        vals = [cell(sc[name][k]) for name in names]
        lines.append("".join([f"{k:<18}{vals[0]:>12}"] + [f"{v:>14}" for v in vals[1:]]))
    if any(not np.isfinite(sc[name][k]) for name in names for k in keys):
        lines.append("n/a: not defined on these points (fewer than 3, a constant prediction or measurement, "
                     "or none that qualifies)")
    return "\n".join(lines)
