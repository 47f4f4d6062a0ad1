r"""Noise ceiling of the seed-setting target (issue 15; docs/findings/whatif.md, "Seventeenth
round"): how much of each layer's norm growth after the decay a perfect model of the state at
step 1000 could get right, measured on the runs themselves, no model involved.

The target (:func:`analyses.whatif_scores.seed_decay_growth`): at step 1000, before the decay,
predict each layer's growth g = |g|(window 9) / |g|(window 1) over the nine 100-step windows
after it; a layer is *right* when the sign of g − 1 is right and the size within ×1.5. A
predictor sees the run up to 1000 only, so whatever happens after 1000 for reasons that state
does not fix is noise to it. Two kinds are measured here, per seed-setting run, by
*replicate continuations* from the run's own checkpoint at 1000 with the config unchanged:

- ``data``: the data order after 1000 redrawn (``RunConfig.fork_data_seed`` = 1, 2, 3:
  :data:`DATA_SEEDS`), beside the run itself (replicate 0);
- ``kernels``: the same data order, torch's CPU kernels dispatched to another instruction set
  (``ATEN_CPU_CAPABILITY`` = ``avx2``, ``default``: :data:`KERNELS`, in a subprocess), beside a
  continuation on this machine's own (bit-identical to the run: checked). Round-off alone, as
  between two machines. (On a machine whose best is AVX2 the ``avx2`` replicate is the native
  one again: ``capabilities`` records what each ran on.)

With replicates G_1..G_R (per layer), the ceiling takes as the prediction of G_r the geometric
mean of the others (leave one out: what a model that knew the expected growth given the state
at 1000 would predict, estimated from R − 1 draws, so a slight underestimate of that model's
score) and scores it as the target does, averaged over r (``ceiling_*``). ``pairwise_*``: one
replicate as the prediction of another (every ordered pair): the agreement of two draws.
``spread``: per layer, max/min of G over the replicates. ``model`` / ``trend``: the predictor in
use (:data:`experiments.whatif.predict.PREDICTOR`) and the trend baseline scored against every
replicate, averaged: their expected score over the noise, beside the one draw the target scores.

``climatology``: a third no-theory baseline, the growth of a typical run of the setting: the
geometric mean over layers and data-order replicates of the *other* entries' runs (leave one
entry out; for a held-out entry, of the development entries only), the same for every layer,
scored against every replicate.

Results per run and pooled over runs (layer-weighted) in ``results/whatif_seed_ceiling.json``:

    .venv/bin/python -m analyses whatif_seed_ceiling              # every entry (~1 min a run: ~25 min)
    .venv/bin/python -m analyses whatif_seed_ceiling --kernels    # adds the kernel replicates (~40 s a run)
    .venv/bin/python -m analyses whatif_seed_ceiling              # then writes them into the results
    .venv/bin/python -m analyses whatif_seed_ceiling seed_decay_growth_eval3   # one entry (names: SEED_SPECS)
    .venv/bin/python -m analyses whatif_seed_ceiling --stored     # stored predictions vs the replicates

Each run's parts are kept in ``store/seed_ceiling/`` (atomic; ``RUN_ID.json`` the data orders and
the predictions, ``RUN_ID_k.json`` the instruction sets, made from the first): a killed command resumes, and two commands over disjoint entries can run at once; the results file is
written from those files by the command that finds them all.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from analyses import whatif_scores as ws
from experiments import store
from experiments.linking.core import run_method
from experiments.linking.measure import default_window
from experiments.runs.config import RunConfig, run_id
from experiments.runs.loop import run, versions
from experiments.sweeps import SPECS_DIR, expand, load_spec
from experiments.whatif.check import check, ensure_checkpoint
from experiments.whatif.core import measure_windows
from experiments.whatif.predict import PREDICTOR, SCHEDULED, fork_config, window_bounds

OUT = Path(__file__).resolve().parents[1] / "results" / "whatif_seed_ceiling.json"
CACHE = Path("store/seed_ceiling")
AT, N_WINDOWS = 1000, 9
DATA_SEEDS = (1, 2, 3)
KERNELS = ("avx2", "default")
FACTOR = 1.5


def seed_configs(name):
    """The RunConfigs of the seed-setting entry ``name`` of :data:`analyses.whatif_scores.SEED_SPECS`."""
    if name not in ws.SEED_SPECS:
        raise ValueError(f"name={name!r}: not among the valid entries {list(ws.SEED_SPECS)}")
    if ws.SEED_SPECS[name] is None:
        return [ws.seed_config()]
    return list(expand(load_spec(SPECS_DIR / f"{ws.SEED_SPECS[name]}.toml")))


def growth(grad_norm):
    """Per layer, the last window's norm over the first after the decay (window 1); ``grad_norm``
    (window, layer) with window 0 the one before the decay."""
    g = np.asarray(grad_norm, dtype=float)
    return g[-1] / g[1]


right = ws.growth_right  # the seed target's per-layer tests (sign, within ×1.5, both)


def ceiling(replicates, factor=FACTOR):
    """Leave-one-out ceiling and pairwise agreement of the target's three scores over the rows
    of ``replicates`` (R × layers, R ≥ 2): the mean over r of the score of the geometric mean
    of the other rows as the prediction of row r; the mean over ordered pairs r ≠ s of row s as
    the prediction of row r."""
    g = np.log(np.asarray(replicates, dtype=float))
    r = g.shape[0]
    if r < 2:
        raise ValueError(f"replicates has {r} row(s): a ceiling needs at least 2")
    loo = [right(np.exp((g.sum(0) - g[i]) / (r - 1)), np.exp(g[i]), factor) for i in range(r)]
    pairs = [right(np.exp(g[s]), np.exp(g[i]), factor) for i in range(r) for s in range(r) if s != i]
    mean = lambda parts, k: float(np.mean([p[k] for p in parts]))  # noqa: E731
    return {**{f"ceiling_{k}": mean(loo, k) for k in ("sign", "within", "right")},
            **{f"pairwise_{k}": mean(pairs, k) for k in ("sign", "within", "right")}}


def against(pred, replicates, factor=FACTOR):
    """The target's scores of one prediction, averaged over the replicates it is scored against."""
    parts = [right(pred, rep, factor) for rep in np.asarray(replicates, dtype=float)]
    return {k: float(np.mean([p[k] for p in parts])) for k in ("sign", "within", "right")}


def continuation(run_dir, root, windows, data_seed=0):
    """The measured per-layer growth of the run at ``run_dir`` continued from its checkpoint at
    the step the ``windows`` (:func:`experiments.whatif.predict.window_bounds`) start after, with
    its config unchanged (``data_seed`` ≥ 1: the data order redrawn); the fork is written under
    ``root``, which must hold the parent (``run_dir.name``)."""
    run_dir, root = Path(run_dir), Path(root)
    at = windows[0][1]
    ensure_checkpoint(run_dir, at)
    config = store.read_json(run_dir / store.CONFIG)
    fork = RunConfig.from_dict(fork_config(config, run_dir.name, at, SCHEDULED, windows[-1][1], data_seed=data_seed))
    run(fork, root / run_id(fork))
    trace = store.load_run(root / run_id(fork))
    method, momentum = run_method(config)
    return growth(measure_windows(trace, windows, method, momentum, after=at)["grad_norm"].values)


def kernel_continuation(run_dir, windows, kernel):
    """:func:`continuation` (data order unchanged) in a subprocess whose torch kernels dispatch to
    ``kernel`` (``ATEN_CPU_CAPABILITY``), its fork in ``store/kernel_<kernel>/`` (under the working
    directory) beside a link to the parent; returns (growth, the capability the subprocess reported)."""
    run_dir = Path(run_dir).resolve()
    ensure_checkpoint(run_dir, windows[0][1])  # here: remade under other kernels it would not be the run's
    root = Path(f"store/kernel_{kernel}").resolve()
    root.mkdir(parents=True, exist_ok=True)
    link = root / run_dir.name
    if not link.exists():
        link.symlink_to(run_dir, target_is_directory=True)
    code = ("import json, sys, torch; from analyses.whatif_seed_ceiling import continuation; "
            "g = continuation(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])); "
            "print(json.dumps([g.tolist(), torch.backends.cpu.get_cpu_capability()]))")
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "ATEN_CPU_CAPABILITY": kernel,
           "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)}
    out = subprocess.run([sys.executable, "-c", code, str(link), str(root), json.dumps(windows)], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"kernel={kernel!r}: the continuation failed: {out.stderr.strip().splitlines()[-1]}")
    g, capability = json.loads(out.stdout.strip().splitlines()[-1])
    return np.array(g), capability


def seed_run_ceiling(config):
    """The data-order part of one seed-setting run's ceilings (module docstring), a dict."""
    run_dir = ws.ROOT / run_id(config)
    run(config, run_dir)
    ds = check(run_dir, AT, [SCHEDULED], n_windows=N_WINDOWS, predictor=PREDICTOR)
    x = ds.isel(change=0)
    meas0 = growth(x.meas_grad_norm.values)
    data = [meas0] + [continuation(run_dir, ws.ROOT, run_windows(run_dir), s) for s in DATA_SEEDS]
    pred, trend = growth(x.pred_grad_norm.values), growth(x.trend_grad_norm.values)
    return {"run": run_id(config), "layers": [str(v) for v in ds.layer.values],
            "data": {"growth": np.array(data).tolist(), "spread": (np.max(data, 0) / np.min(data, 0)).tolist(),
                     **ceiling(data), "model": against(pred, data), "trend": against(trend, data)},
            "model_growth": pred.tolist(), "trend_growth": trend.tolist(),
            "model_on_the_run": against(pred, [meas0]), "trend_on_the_run": against(trend, [meas0])}


def run_windows(run_dir):
    """The target's windows of the run at ``run_dir``: the what-if default (the probe spacing)."""
    return window_bounds(AT, default_window(store.load_run(run_dir)["probe_step"].values), N_WINDOWS)


def kernel_ceiling(entry):
    """The instruction-set part of a run's ceilings from its :func:`seed_run_ceiling` ``entry``
    (the run, its measured growth and the two predictions): the native continuation (checked
    bit-identical to the run) and one per :data:`KERNELS`."""
    run_dir = ws.ROOT / entry["run"]
    windows = run_windows(run_dir)
    native = continuation(run_dir, ws.ROOT, windows)
    if not np.array_equal(native, entry["data"]["growth"][0]):
        raise RuntimeError(f"run {run_dir.name}: its continuation from {AT} on this machine's kernels is not "
                           "bit-identical to the run (store made on another machine?)")
    reps = [(native, "native")] + [kernel_continuation(run_dir, windows, k) for k in KERNELS]
    g = np.array([r for r, _ in reps])
    pred, trend = np.array(entry["model_growth"]), np.array(entry["trend_growth"])
    return {"capabilities": [c for _, c in reps], "growth": g.tolist(), "spread": (g.max(0) / g.min(0)).tolist(),
            **ceiling(g), "model": against(pred, g), "trend": against(trend, g)}


def pooled(entries, part):
    """Layer-weighted means over runs of the scores of ``part`` (``data`` or ``kernels``)."""
    runs = [e for e in entries if part in e]
    if not runs:
        return {}
    n = np.array([len(e["layers"]) for e in runs], dtype=float)
    avg = lambda get: float(np.sum(n * np.array([get(e) for e in runs])) / n.sum())  # noqa: E731
    keys = [k for k in runs[0][part] if k.startswith(("ceiling_", "pairwise_"))]
    out = {"runs": len(runs), "layers": int(n.sum()), **{k: avg(lambda e, k=k: e[part][k]) for k in keys}}
    for who in ("model", "trend", "climatology"):
        if all(who in e[part] for e in runs):
            out[who] = {k: avg(lambda e, k=k: e[part][who][k]) for k in ("sign", "within", "right")}
    out["median_spread"] = float(np.median(np.concatenate([e[part]["spread"] for e in runs])))
    return out


def add_climatology(entries, held_out=ws.HELD_OUT):
    """Score the climatology baseline (module docstring) into every run of ``entries``
    ({entry name: [run results]}), against the run's data-order replicates and against the run."""
    log_mean = {name: [np.log(e["data"]["growth"]).mean() for e in runs] for name, runs in entries.items()}
    for name, runs in entries.items():
        pool = [v for other, vals in log_mean.items() if other != name and other not in held_out for v in vals]
        for e in runs:
            pred = np.full(len(e["layers"]), np.exp(np.mean(pool)))
            e["climatology_growth"] = float(pred[0])
            e["data"]["climatology"] = against(pred, e["data"]["growth"])
            e["climatology_on_the_run"] = against(pred, e["data"]["growth"][:1])


def stored_predictions(ceilings, scores, name="bulk_trend_blend_small_loss"):
    """Per run (list), the fraction right against the data-order replicates of ``ceilings``
    (this module's results) of: the predictor ``name``'s growth stored in ``scores``
    (``results/whatif_scores.json``'s seed entries; the former default by default), the predictor in
    use (``model``), and two rough diagnostics with the *measured* sharpness rise s (probes
    1500–1900 over 1000–1400, per layer) in place of the forecast ŝ, by the NQM's |g| ∝ √λ at a
    fixed lr and noise: ``name``'s growth × √(s/ŝ), and √s alone."""
    runs = {e["run"]: e for entries in ceilings["entries"].values() for e in entries}
    out = []
    for key, entry in scores.items():
        if not key.startswith("seed_decay_growth"):
            continue
        for x in [entry] if "run" in entry else [v for v in entry.values() if isinstance(v, dict) and "run" in v]:
            reps = runs[x["run"]]["data"]["growth"]
            pred, rise = np.array(x[name]["predicted_growth"]), np.array(x["measured_sharpness_rise"])
            out.append({"run": x["run"], "entry": key, name: against(pred, reps)["right"],
                        "model": runs[x["run"]]["data"]["model"]["right"],
                        "measured_rise_scaled": against(pred * np.sqrt(rise / x[name]["predicted_sharpness_rise"]),
                                                        reps)["right"],
                        "measured_rise_alone": against(np.sqrt(rise), reps)["right"]})
    return out


def main(argv=()):
    import torch

    argv = list(argv)
    if argv == ["--stored"]:
        rows = stored_predictions(store.read_json(OUT), store.read_json(ws.OUT))
        for k in [k for k in rows[0] if k not in ("run", "entry")]:
            d = np.array([r[k] for r in rows])
            print(f"{k:<32} right {d.mean():.3f} over {d.size} runs")
        d = np.array([r["model"] - r["bulk_trend_blend_small_loss"] for r in rows])
        print(f"model − bulk_trend_blend_small_loss per run: {d.mean():+.3f} (SE {d.std(ddof=1) / np.sqrt(d.size):.3f}; "
              f"better on {(d > 0).sum()}, worse on {(d < 0).sum()})")
        return 0
    kernels = "--kernels" in argv
    names = [a for a in argv if a != "--kernels"] or list(ws.SEED_SPECS)
    entries = {name: [(c, CACHE / f"{run_id(c)}{'_k' if kernels else ''}.json") for c in seed_configs(name)]
               for name in names}
    torch.set_num_threads(1)
    CACHE.mkdir(parents=True, exist_ok=True)
    for name, items in entries.items():
        for config, path in items:
            data = path.with_name(f"{run_id(config)}.json")
            if not data.exists():
                store.atomic_write_json(data, seed_run_ceiling(config))
            if kernels and not path.exists():
                store.atomic_write_json(path, {"kernels": kernel_ceiling(store.read_json(data))})
            print(name, run_id(config), "done", flush=True)
    every = {name: [(c, CACHE / f"{run_id(c)}.json") for c in seed_configs(name)] for name in ws.SEED_SPECS}
    if kernels or not all(p.exists() for items in every.values() for _, p in items):
        return 0  # the results file is written by the command that finds every run's file
    out = {"command": "python -m analyses whatif_seed_ceiling", "entries": {},
           "environment": {"cpu_capability": torch.backends.cpu.get_cpu_capability(), **versions()}}
    for name, items in every.items():
        runs = []
        for config, path in items:
            e = store.read_json(path)
            k = path.with_name(f"{run_id(config)}_k.json")
            if k.exists():
                e["kernels"] = store.read_json(k)["kernels"]
            runs.append(e)
        out["entries"][name] = runs
    add_climatology(out["entries"])
    flat = [e for runs in out["entries"].values() for e in runs]
    held = [e for name, runs in out["entries"].items() if name in ws.HELD_OUT for e in runs]
    out["pooled"] = {"data": pooled(flat, "data"), "kernels": pooled(flat, "kernels"),
                     "data_development": pooled([e for e in flat if e not in held], "data")}
    store.atomic_write_json(OUT, out)
    print(json.dumps(out["pooled"], indent=1))
    return 0
