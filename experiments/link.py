r"""The link: per-layer predictions of the noisy quadratic model (NQM), fed with what the
tracer measured, set beside what the tracer measured, and scored (DESIGN.md, data flow 3;
THEORY.md §2, §4, §5).

For every probe step :math:`p` and layer :math:`l` of a run:

- :math:`h_l = \alpha_p \lambda_{\max,l}` (the layer's top block curvature times the lr in
  force at :math:`p`) and its ratio to the method's stability edge (2 for GD,
  :math:`2(1+\beta)` for HB, :math:`2(1+\beta)/(1+2\beta)` for NAG): ``edge_ratio`` ≥ 1
  means the layer's top mode is past the edge of stability (Cohen et al. 2021, THEORY.md
  §5); ``edge_ratio_global`` is the same for the network's top eigenvalue;
- the regime (monotone / ripple / flip / divergent) of the layer's top mode (THEORY.md §2);
- the predicted successive-gradient correlation
  :math:`\rho = \sum_i E[g_{t,i} g_{t-1,i}] / \sum_i E[g_{t,i}^2]` and squared gradient
  norm :math:`\sum_i E[g_{t,i}^2]` of the NQM layer model (:mod:`dynamics.nqm_layer`),
  whose spectrum is rebuilt from the measured ``sharpness``, ``hessian_trace`` and
  ``n_params`` (power-law shape) with the network's top mode put in
  (:func:`with_global_mode`), whose noise is the measured ``grad_noise`` spread over the
  modes in proportion to curvature, and which is run through the run's lr sequence
  (:func:`schedule_predict_layers`; ``prediction="stationary"`` takes each probe's
  stationary state instead);
- the measured counterparts over a window of W steps centred on the probe
  (:func:`measured_window`).

Agreement (:func:`agreement_scores`, :func:`link_scores`) pools layers × probe steps × runs.

Optionally (``signal``, :func:`with_signal`) a mean-gradient part measured by the probe
(``grad_signal`` = ‖E g‖², less the NQM's own E‖Hx‖²) is mixed in, with the lag-1
correlation of the network top mode's stationary fluctuation ("fluct",
:func:`fluctuation_correlation`), of its dominant root ("root", :func:`mean_part_correlation`)
or +1 ("drift").

What the seed-CNN sweep says (12 runs, 672 layer-probe points;
``python -m paper_figures.link_scores`` → ``results/link_seed_cnn.json``). Spearman / sign
agreement of the correlation, probe on the step's 32 examples (``link_seed_cnn.toml``): the
plain per-layer model (diagonal block, stationary) 0.34 / 63 %; with the network's top mode
0.70 / 77 %; run through the lr schedule 0.74 / 78 %. Probed on 512 drawn examples with 8
Hutchinson vectors and 16 micro-batches (``link_seed_cnn_probe.toml``; default) 0.76 / 76 %
(Pearson 0.74 → 0.82, calibration error 0.086 → 0.059, log-norm error 0.42 → 0.32 decades).
Target (issue 7): 0.8 / 90 % — not reached. Which assumptions fail, in order of effect:

1. *Block-diagonal curvature.* The strongly negative correlations (down to −0.8) appear in
   every layer when the network's h = α λ_max(H) nears the edge, while every block's
   h_l stays below 0.34 of it: the oscillating direction spans layers. Putting that mode
   in each layer (its share estimated as λ_max,l / λ_max(H)) doubles the Spearman score.
2. *Stationarity.* Windows that straddle an lr decay, and the relaxation after it, need the
   NQM recursion through the schedule (probe 600: Spearman 0.52 → 0.81).
3. *Noise-driven fluctuations only.* Where every mode has small h (plateau at the start,
   after the decay) the NQM predicts |ρ| ≲ 0.05, but the measured ρ is +0.1 … +0.45. This
   is where the remaining misses are (h/edge < 0.05: Spearman 0.24, sign 65 %; where the
   model predicts |ρ| > 0.1: Spearman 0.82, sign 97 %). The suspect is the gradient's
   mean (signal) part, which the noise-driven model leaves out, but it cannot simply be
   added (``results/link_assumption_checks.py`` → ``.json``, a rerun of the 12 runs with extra
   probe measurements): the *exact* full-batch gradient at each probe (eval mode) carries
   a median of only 2–34 % of ‖g‖², and a drift term built from it,
   ρ' = (Σ lag1 + c·D)/(Σ E g² + D) with D = max(‖∇f_l‖² − E‖Hx‖²_NQM, 0), lowers the
   Spearman score to 0.50–0.57 (c = 1 … 0.5): near the edge the excess is oscillation,
   not drift. At fixed parameters (``--fixed-theta``) the two regimes separate: on the
   plateau and after the decay (HB, α = 0.02, β = 0.6; probes 100, 700) independent
   mini-batch gradients share a part (mean pairwise cosine −0.08 … +0.40, close to the
   measured ρ = 0.0 … +0.25), a mean gradient that persists because the parameters barely
   move; at the edge (NAG, α = 0.05, β = 0.9, probe 300) the shared part is larger still
   (signal fraction 0.8, pairwise cosine 0.85 in the conv layers) yet ρ = −0.48: the mean
   gradient itself flips sign from step to step. A signal term therefore needs the signal
   energy (not recorded by the tracer) *and* its lag-1 correlation per regime.
   Measuring each layer's share ‖v_l‖² of the network's top Ritz vector instead
   of estimating it by λ_max,l/λ_max(H) changes nothing (Spearman 0.738 vs 0.741): where
   the top mode matters the estimate is close to the measured share (same script).
4. *Noise model.* Curvature-proportional noise beats isotropic noise (Spearman 0.54).
5. *The signal term* (measured ‖E g‖² from the 512-example probe) fixes the small-h regime
   (h/edge < 0.05: Spearman 0.31 → 0.58, sign 60 → 78 % with "fluct") and raises the sign
   agreement overall (76 → 82 %), but lowers the Spearman score (0.76 → 0.72; "root" 0.65,
   "drift" 0.54), so it is not the default. Where 0.05 < h/edge the measured excess
   ‖E g‖² − E‖Hx‖² has a lag-1 correlation ≈ 0 (0.05–0.5) to −0.6 (> 0.5) (solved from the
   measurements), below what the top mode's dynamics give (fluct 1 − 2·h/edge for HB): the
   excess is not a persistent drift there. The mean gradient lies mostly along the layer's
   piece of the network's top Ritz vector (``grad_signal_top`` / ``grad_signal``: median 0.77
   where the signal is ≥ 20 % of the batch gradient's energy); giving that part the top
   mode's correlation and the rest +1 scored lower still (Spearman 0.63, "root"). A single
   probe's ‖Hx_p‖² is one draw, so max(excess, 0) is biased up even without any drift (on
   the quadratic network at 1 of 8 probes).

On the quadratic network (tests) the prediction matches the tracer within the Monte-Carlo
tolerance, for HB and NAG.

The parts live in :mod:`experiments.link_measure` (the measured side),
:mod:`experiments.link_predict` (the NQM per probe and layer), :mod:`experiments.link_signal`
(the signal term) and :mod:`experiments.link_report` (scores, per-layer table); their public
names are importable from here too.
"""

import inspect
from pathlib import Path

import numpy as np
import xarray as xr

from dynamics.quadratic import regime, stability_edge
from experiments import store
from experiments.link_measure import ALIGNS, default_window, measured_window  # noqa: F401 (re-exported)
from experiments.link_predict import (  # noqa: F401 (re-exported)
    EDGE_MARGIN, layer_spectra, predict_layers, schedule_predict_layers, with_global_mode)
from experiments.link_report import format_report, layer_table, link_scores  # noqa: F401 (re-exported)
from experiments.link_signal import (  # noqa: F401 (re-exported)
    SIGNALS, fluctuation_correlation, mean_part_correlation, with_signal)
from experiments.scores import SCORES, agreement_scores, calibration_error  # noqa: F401 (re-exported)


LINK_FILE = "link.nc"
LINKED_METHODS = ("gd", "hb", "nag")


def run_method(config):
    """(method, momentum) of a run config dict; the link covers SGD-type optimizers only."""
    method = config.get("opt")
    if method not in LINKED_METHODS:
        raise ValueError(f"opt={method!r} is not linked; valid: {', '.join(LINKED_METHODS)} "
                         f"(the NQM describes SGD with or without momentum)")
    return method, (0.0 if method == "gd" else float(config.get("momentum", 0.0)))


def link_trace(trace, config=None, *, window=None, align="center", noise_model="curvature", shape="power",
               on_unstable="exclude", smooth=3, global_mode=True, prediction="schedule", signal="none",
               spectra=None):
    """Predicted and measured per-layer oscillation and norm of one run, side by side.

    ``trace`` is a run's trace (``experiments.store.load_run`` puts the config in its
    attrs; or pass ``config``). The probe's estimates are noisy (one Hutchinson vector, four
    micro-batches: a single probe's trace can even be negative), so the model is fed their
    centred rolling mean over ``smooth`` probes (1: raw); ``sharpness`` etc. in the output
    stay raw, and ``h``, ``edge_ratio`` and ``regime`` use the raw sharpness.
    ``prediction``: "schedule" (default) runs the NQM through the run's actual lr sequence
    (:func:`schedule_predict_layers`), "stationary" takes each probe's stationary state
    (:func:`predict_layers`; its ``pred_effective_dim`` and ``pred_n_unstable`` are kept in
    both cases). ``global_mode`` puts the network's top mode in every layer
    (:func:`with_global_mode`).
    Returns a Dataset over (probe_step, layer) with ``lr``,
    ``h`` = lr·sharpness, ``edge`` (the method's stability edge in h), ``edge_ratio`` = h/edge,
    ``edge_ratio_global`` (the same for the network's sharpness),
    ``regime`` of the top mode, the measured inputs (``sharpness``, ``hessian_trace``,
    ``grad_noise``, ``n_params``, ``sharpness_global``), ``pred_*`` and ``meas_*``
    (:func:`measured_window`); the options are in ``attrs``.
    """
    config = dict(trace.attrs.get("config", {}) if config is None else config)
    method, momentum = run_method(config)
    if "probe_step" not in trace.dims or trace.sizes["probe_step"] == 0:
        raise ValueError("the trace has no probe steps (run with probe_every > 0): the link needs "
                         "the measured sharpness, hessian_trace and grad_noise")
    probe = trace["probe_step"].values
    lr = trace["lr"].reindex(step=probe).rename(step="probe_step")
    h = lr * trace["sharpness"]
    edge = float(stability_edge(method, momentum))
    regime_top = xr.DataArray(np.where(np.isfinite(h) & (h > 0), regime(method, np.nan_to_num(h.values), momentum),
                                       "undefined"), dims=h.dims, coords=h.coords)
    if int(smooth) < 1:
        raise ValueError(f"smooth={smooth} is outside the valid range [1, inf)")
    fed = {k: trace[k].rolling(probe_step=int(smooth), center=True, min_periods=1).mean()
           for k in ("sharpness", "hessian_trace", "grad_noise", "sharpness_global")}
    built = layer_spectra(method, lr, momentum, fed["sharpness"], fed["hessian_trace"], trace["n_params"],
                          fed["grad_noise"], shape=shape, spectra=spectra,
                          sharpness_global=fed["sharpness_global"] if global_mode else None)
    pred = predict_layers(method, lr, momentum, fed["sharpness"], fed["hessian_trace"], trace["n_params"],
                          fed["grad_noise"], noise_model=noise_model, on_unstable=on_unstable, built=built)
    meas = measured_window(trace, probe, window, align)
    if prediction == "schedule":
        corr, sq, full = schedule_predict_layers(method, trace["lr"].values, momentum, probe, built,
                                                 meas.attrs["window"], align, noise_model, return_full=True)
        pred["pred_grad_corr"] = (("probe_step", "layer"), corr)
        pred["pred_grad_sq_norm"] = (("probe_step", "layer"), sq)
        pred["pred_full_grad_sq_norm"] = (("probe_step", "layer"), full)
    elif prediction != "stationary":
        raise ValueError(f"prediction={prediction!r} is unknown; valid: stationary, schedule")
    if signal not in SIGNALS:
        raise ValueError(f"signal={signal!r} is unknown; valid: {', '.join(SIGNALS)}")
    recorded = "grad_signal" in trace and signal != "none"
    if recorded:  # the signal raw: it changes between probes (0.65 vs 0.63 Spearman smoothed, "root")
        h_top = np.minimum(lr * trace["sharpness_global"], edge * (1 - EDGE_MARGIN))
        rho_mean = {"fluct": fluctuation_correlation, "root": mean_part_correlation}.get(
            signal, lambda *_: xr.ones_like(h_top))(method, h_top, momentum)
        corr, sq, mean_sq = with_signal(pred["pred_grad_corr"], pred["pred_grad_sq_norm"],
                                        pred["pred_full_grad_sq_norm"], trace["grad_signal"], rho_mean)
        pred = pred.assign(pred_grad_corr=corr, pred_grad_sq_norm=sq, pred_mean_sq_norm=mean_sq,
                           pred_mean_corr=rho_mean)
    ds = xr.merge([pred, meas.drop_attrs()])
    h_global = lr * trace["sharpness_global"]
    ds = ds.assign(lr=lr, h=h, edge=edge, edge_ratio=h / edge, regime=regime_top,
                   sharpness_global=trace["sharpness_global"], edge_ratio_global=h_global / edge,
                   sharpness=trace["sharpness"], hessian_trace=trace["hessian_trace"],
                   grad_noise=trace["grad_noise"], n_params=trace["n_params"])
    if "grad_signal" in trace:
        ds["grad_signal"] = trace["grad_signal"]
    ds.attrs = {"method": method, "momentum": momentum, "lr0": float(config.get("lr", np.nan)),
                "window": meas.attrs["window"], "align": align, "noise_model": noise_model, "shape": shape,
                "on_unstable": on_unstable, "smooth": int(smooth), "global_mode": int(bool(global_mode)),
                "prediction": prediction, "signal": signal, "signal_recorded": int(recorded),
                "spectra": "given" if spectra else "summary"}
    return ds


# ---------------------------------------------------------------------------------------
# runs, sweeps, files

OPTIONS = ("window", "align", "noise_model", "shape", "on_unstable", "smooth", "global_mode", "prediction",
           "signal")


def link_run(run_dir, *, recompute=False, write=True, **options):
    """:func:`link_trace` of a finished run directory, written beside it as ``link.nc``
    (atomically, :mod:`experiments.store`). An existing ``link.nc`` made with the same
    options from the same trace is read instead unless ``recompute``."""
    run_dir = Path(run_dir)
    target = run_dir / LINK_FILE
    defaults = inspect.signature(link_trace).parameters
    wanted = {k: options.get(k, defaults[k].default) for k in OPTIONS}
    if not recompute and target.exists() and target.stat().st_mtime >= (run_dir / store.TRACE).stat().st_mtime:
        with xr.open_dataset(target, engine="scipy") as cached:
            ds = cached.load()
        if all(_same_option(ds.attrs.get(k), int(v) if isinstance(v, bool) else v)
               for k, v in wanted.items() if v is not None):
            return ds
    ds = link_trace(store.load_run(run_dir), **options)
    ds.attrs["run_id"] = run_dir.name
    if write:
        store.atomic_write_dataset(target, ds)
    return ds


def _same_option(saved, wanted):
    return saved is not None and str(saved) == str(wanted)


def run_dirs(source, root=None):
    """The finished run directories of ``source``: a run directory itself, a store root
    (every finished run in it), or a sweep spec (``.toml``; its runs under ``root`` or the
    spec's root)."""
    source = Path(source)
    if source.suffix == ".toml":
        from experiments.sweep import expand, load_spec, resolve_root, run_id

        spec = load_spec(source)
        base = resolve_root(spec, root)
        dirs = [base / run_id(c) for c in expand(spec)]
    elif store.is_done(source):
        return [source]
    elif source.is_dir():
        dirs = sorted(p for p in source.iterdir() if p.is_dir())
    else:
        raise ValueError(f"source={str(source)!r} is not a run directory, a store root or a sweep spec (.toml)")
    return [d for d in dirs if store.is_done(d)]


def link(source, *, root=None, recompute=False, write=True, **options):
    """The link of a run, or of every linkable finished run of a store root or sweep spec.

    One run: the Dataset of :func:`link_run` (dims probe_step, layer). Several: those
    stacked along a ``run`` dim (outer join: runs that diverged early have NaN after), with
    per-run coordinates ``opt``, ``lr0``, ``momentum``. Runs the NQM does not describe (Adam)
    or without probes are left out and named in ``attrs["skipped"]``.
    """
    dirs = run_dirs(source, root)
    if not dirs:
        raise ValueError(f"source={str(source)!r} has no finished runs")
    if len(dirs) == 1 and store.is_done(Path(source)):
        return link_run(dirs[0], recompute=recompute, write=write, **options)
    linked, skipped = [], []
    for d in dirs:
        try:
            linked.append(link_run(d, recompute=recompute, write=write, **options))
        except ValueError as err:
            skipped.append(f"{d.name}: {err}")
    if not linked:
        raise ValueError(f"source={str(source)!r}: no run could be linked; " + "; ".join(skipped[:3]))
    ds = stack_runs(linked)
    ds.attrs["skipped"] = "; ".join(skipped)
    return ds


def stack_runs(datasets):
    """Per-run link Datasets stacked along ``run`` (outer join over probe steps), with the
    run coordinates ``opt``, ``lr0``, ``momentum``."""
    return xr.concat([_run_coords(x) for x in datasets], dim="run", join="outer",
                     combine_attrs="drop_conflicts", data_vars="all")


def _run_coords(ds):
    a = ds.attrs
    ds = ds.expand_dims(run=[a["run_id"]])
    return ds.assign_coords(opt=("run", [a["method"]]), lr0=("run", [a["lr0"]]),
                            momentum=("run", [a["momentum"]]))


def add_command(subparsers):
    p = subparsers.add_parser("link", help="predicted vs measured per-layer oscillation and norm, with scores",
                              description="Link a run (or every finished run of a store root or sweep "
                              "spec): NQM predictions from the measured per-layer sharpness, Hessian trace "
                              "and gradient noise, beside the measured successive-gradient correlation and "
                              "gradient norm. Writes link.nc beside each run; prints a per-layer table and "
                              "the agreement scores.")
    p.add_argument("source", help="a run directory, a store root, or a sweep spec (.toml)")
    p.add_argument("--root", help="store root when SOURCE is a spec (default: the spec's root)")
    p.add_argument("--window", type=int, help="measurement window in steps (default: probe spacing)")
    p.add_argument("--align", default="center", help="measurement window: center (default) or after the probe")
    p.add_argument("--noise-model", default="curvature", help="additive or curvature (default)")
    p.add_argument("--shape", default="power", help="spectrum shape from the summary: power (default), two-level")
    p.add_argument("--on-unstable", default="exclude", help="modes past the edge: exclude (default), nan")
    p.add_argument("--smooth", type=int, default=3, help="probes in the rolling mean of the probe estimates")
    p.add_argument("--prediction", default="schedule",
                   help="schedule (default: NQM run through the lr sequence) or stationary")
    p.add_argument("--signal", default="none", help="mean-gradient term from the probe's grad_signal: none "
                   "(default), fluct / root (lag-1 of the network top mode's fluctuation / dominant root), drift (+1)")
    p.add_argument("--block-only", action="store_true",
                   help="per-layer diagonal-block spectra only (no network top mode in each layer)")
    p.add_argument("--recompute", action="store_true", help="ignore existing link.nc files")
    p.add_argument("--json", help="also write the scores (and options) as JSON here")
    p.set_defaults(func=_link_main)


def _link_main(args):
    ds = link(args.source, root=args.root, recompute=args.recompute, window=args.window, align=args.align,
              noise_model=args.noise_model, shape=args.shape, on_unstable=args.on_unstable, smooth=args.smooth,
              global_mode=not args.block_only, prediction=args.prediction, signal=args.signal)
    print(format_report(ds))
    if args.json:
        store.atomic_write_json(args.json, {"scores": link_scores(ds), "options": {
            k: ds.attrs.get(k) for k in OPTIONS}, "source": str(args.source)})
    return 0
