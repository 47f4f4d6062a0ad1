r"""The link: per-layer predictions of the noisy quadratic model (NQM), fed with what the
tracer measured, set beside what the tracer measured, and scored (docs/design.md, data flow 3;
docs/theory.md §2, §4, §5).

For every probe step :math:`p` and layer :math:`l` of a run:

- :math:`h_l = \alpha_p \lambda_{\max,l}` (the layer's top block curvature times the lr in
  force at :math:`p`) and its ratio to the method's stability edge (2 for GD,
  :math:`2(1+\beta)` for HB, :math:`2(1+\beta)/(1+2\beta)` for NAG): ``edge_ratio`` ≥ 1
  means the layer's top mode is past the edge of stability (Cohen et al. 2021, docs/theory.md
  §5); ``edge_ratio_global`` is the same for the network's top eigenvalue;
- the regime (monotone / ripple / flip / divergent) of the layer's top mode (docs/theory.md §2);
- the predicted successive-gradient correlation
  :math:`\rho = \sum_i E[g_{t,i} g_{t-1,i}] / \sum_i E[g_{t,i}^2]` and squared gradient
  norm :math:`\sum_i E[g_{t,i}^2]` of the NQM layer model (:mod:`dynamics.nqm.layer`),
  whose spectrum is rebuilt from the measured ``sharpness``, ``hessian_trace`` and
  ``n_params`` (power-law shape) with the network's top mode put in
  (:func:`experiments.linking.predict.with_global_mode`), whose noise is the measured ``grad_noise`` spread over the
  modes in proportion to curvature, and which is run through the run's lr sequence
  (:func:`schedule_predict_layers`; ``prediction="stationary"`` takes each probe's
  stationary state instead);
- the measured counterparts over a window of W steps centred on the probe
  (:func:`measured_window`).

Where the probe recorded them (``probe_curvature=True``), the default prediction is the response
model instead (``prediction="auto"`` → "response"; :mod:`experiments.linking.response`,
:mod:`dynamics.nqm.response`): per layer the noise as one NQM mode at its noise-weighted curvature
:math:`h_N = \alpha\,\mathrm{tr}(H\Sigma)_{ll}/\mathrm{tr}\,\Sigma_{ll}` plus the part of the mean
gradient the noise does not explain (a drift) with its one-step response
:math:`1 - \alpha(c_g m^\top Hm + c_b m^\top Hb)/\|m\|^2`, all measured at the probe; the NQM
predictions above stay beside it (``nqm_grad_corr``, ``nqm_grad_sq_norm``).

Baselines (docs/theory.md §9; :func:`experiments.linking.response.baselines`) on the same points:
persistence (the previous probe window's measured value), one mode at the network's h, the
constant 0. A block whose measured top eigenvalue is ≤ 0 (BatchNorm at initialisation) has regime
'undefined'; the rest of the run is linked.

Agreement (:func:`agreement_scores`, :func:`link_scores`) pools layers × probe steps × runs;
:func:`experiments.linking.report.protocol_scores` gives the protocol (baselines, regimes of the
network's h/edge, within-probe layer ranking, log10-norm error, the measurement's noise ceiling from
the window's two halves), printed by ``optdyn link``.

Optionally (``signal``, :func:`with_signal`) a mean-gradient part measured by the probe
(``grad_signal`` = ‖E g‖², less the NQM's own E‖Hx‖²) is mixed in, with the lag-1
correlation of the network top mode's stationary fluctuation ("fluct",
:func:`fluctuation_correlation`), of its dominant root ("root", :func:`mean_part_correlation`)
or +1 ("drift").

Measured findings on the seed-CNN sweeps (which assumptions fail and by how much) are in
``docs/findings/link.md``, each with the command that reproduces it.

On the quadratic network (tests) the prediction matches the tracer within the Monte-Carlo
tolerance, for HB and NAG.

The parts live in :mod:`experiments.linking.measure` (the measured side),
:mod:`experiments.linking.predict` (the NQM per probe and layer), :mod:`experiments.linking.signal`
(the signal term), :mod:`experiments.linking.report` (scores, per-layer table) and
:mod:`experiments.linking.scores` (agreement scores).
"""

import inspect
from pathlib import Path

import numpy as np
import xarray as xr

from dynamics.quadratic import regime, stability_edge
from experiments import store
from experiments.linking.measure import measured_window, split_half_windows
from experiments.linking.predict import EDGE_MARGIN, layer_spectra, predict_layers, schedule_predict_layers
from experiments.linking.signal import SIGNALS, fluctuation_correlation, mean_part_correlation, with_signal
from experiments.linking.response import baselines, forecast_link, has_response_inputs, response_predict


LINK_FILE = "link.nc"
PREDICTIONS = ("auto", "response", "schedule", "stationary")
COMBINES = ("persistence", "none", "residual", "change", "persistence2")
LINKED_METHODS = ("gd", "hb", "nag")


def run_method(config):
    """(method, momentum) of a run config dict; the link covers SGD-type optimizers only."""
    method = config.get("opt")
    if method not in LINKED_METHODS:
        raise ValueError(f"opt={method!r} is not linked; valid: {', '.join(LINKED_METHODS)} "
                         f"(the NQM describes SGD with or without momentum)")
    return method, (0.0 if method == "gd" else float(config.get("momentum", 0.0)))


def trace_config(trace, opt=None, lr=None, momentum=None):
    """The config the link needs (``opt``, ``lr``, ``momentum``) of a trace: its run's
    ``attrs["config"]`` (:func:`experiments.store.load_run`), else what the tracer recorded
    of the optimizer (``opt``, ``lr0``, ``momentum`` attrs:
    :func:`experiments.trace.tracer.optimizer_attrs`); a value given here overrides either."""
    a = trace.attrs
    config = dict(a["config"]) if isinstance(a.get("config"), dict) else {
        k: a[src] for k, src in (("opt", "opt"), ("lr", "lr0"), ("momentum", "momentum")) if src in a}
    given = {"opt": opt, "lr": lr, "momentum": momentum}
    config.update({k: v for k, v in given.items() if v is not None})
    if "opt" not in config:
        raise ValueError("opt=None: the trace records no optimizer (a trace from an older tracer "
                         "or a hand-made one); give it: gd, hb or nag (and lr, momentum)")
    return config


def link_trace(trace, config=None, *, window=None, align="center", noise_model="curvature", shape="power",
               on_unstable="exclude", smooth=3, global_mode=True, prediction="auto", signal="none",
               spectra=None, top_mode_shares=None, response_smooth=1, combine="persistence"):
    """Predicted and measured per-layer oscillation and norm of one run, side by side.

    ``trace`` is a run's trace (``experiments.store.load_run`` puts the config in its
    attrs; or pass ``config``). The probe's estimates are noisy (one Hutchinson vector, four
    micro-batches: a single probe's trace can even be negative), so the model is fed their
    centred rolling mean over ``smooth`` probes (1: raw); ``sharpness`` etc. in the output
    stay raw, and ``h``, ``edge_ratio`` and ``regime`` use the raw sharpness.
    ``combine``: "persistence" (default) makes ``pred_*`` the forecast combination of the theory
    and the previous probe window's measurement (:func:`experiments.linking.response.forecast`;
    the theory alone stays as ``theory_grad_corr``, ``theory_grad_sq_norm``), "none" leaves
    ``pred_*`` the theory's; "residual", "change", "persistence2" are the alternatives tried on the
    development families (:func:`experiments.linking.response.forecast`; not better there).
    ``prediction``: "response" (:mod:`experiments.linking.response`: the probe's curvature along the
    gradient and the momentum buffer in :func:`dynamics.nqm.response.response_model`; its inputs
    are fed raw, or as the trailing mean over ``response_smooth`` probes at or before each probe); "auto" (default) is "response" where the trace
    has its inputs (``probe_curvature=True``) and "schedule" otherwise; the NQM predictions
    below stay in the output as ``nqm_grad_corr`` and ``nqm_grad_sq_norm`` either way.
    "schedule" runs the NQM through the run's actual lr sequence
    (:func:`schedule_predict_layers`), "stationary" takes each probe's stationary state
    (:func:`predict_layers`; its ``pred_effective_dim`` and ``pred_n_unstable`` are kept in
    both cases). ``global_mode`` puts the network's top mode in every layer
    (:func:`experiments.linking.predict.with_global_mode`); ``top_mode_shares`` (probe_step, layer), if given, are the
    layers' measured shares of that mode instead of the estimate λ_max,l/λ_max(H).
    Returns a Dataset over (probe_step, layer) with ``lr``,
    ``h`` = lr·sharpness, ``edge`` (the method's stability edge in h), ``edge_ratio`` = h/edge,
    ``edge_ratio_global`` (the same for the network's sharpness),
    ``regime`` of the top mode, the measured inputs (``sharpness``, ``hessian_trace``,
    ``grad_noise``, ``n_params``, ``sharpness_global``), ``pred_*`` and ``meas_*``
    (:func:`measured_window`), ``meas_half1_grad_corr`` / ``meas_half2_grad_corr`` (the window's two
    halves, :func:`experiments.linking.measure.split_half_windows`: its noise ceiling); the options
    are in ``attrs``.
    """
    config = dict(trace_config(trace) if config is None else config)
    method, momentum = run_method(config)
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r} is unknown; valid: {', '.join(PREDICTIONS)}")
    requested = prediction
    if prediction == "auto":
        prediction = "response" if has_response_inputs(trace) and signal == "none" else "schedule"
    if "probe_step" not in trace.dims or trace.sizes["probe_step"] == 0:
        raise ValueError("the trace has no probe steps (run with probe_every > 0): the link needs "
                         "the measured sharpness, hessian_trace and grad_noise")
    probe = trace["probe_step"].values
    lr = trace["lr"].reindex(step=probe).rename(step="probe_step")
    h = lr * trace["sharpness"]
    edge = float(stability_edge(method, momentum))
    defined = np.isfinite(h.values) & (h.values > 0)  # a block whose top eigenvalue is <= 0 (BatchNorm at
    # initialisation, a saddle) has no regime: 'undefined', and regime() never sees it (it rejects h < 0)
    regime_top = xr.DataArray(np.where(defined, regime(method, np.where(defined, h.values, 1.0), momentum),
                                       "undefined"), dims=h.dims, coords=h.coords)
    if int(smooth) < 1:
        raise ValueError(f"smooth={smooth} is outside the valid range [1, inf)")
    fed = {k: trace[k].rolling(probe_step=int(smooth), center=True, min_periods=1).mean()
           for k in ("sharpness", "hessian_trace", "grad_noise", "sharpness_global")}
    built = layer_spectra(method, lr, momentum, fed["sharpness"], fed["hessian_trace"], trace["n_params"],
                          fed["grad_noise"], shape=shape, spectra=spectra,
                          sharpness_global=fed["sharpness_global"] if global_mode else None,
                          top_mode_shares=top_mode_shares)
    pred = predict_layers(method, lr, momentum, fed["sharpness"], fed["hessian_trace"], trace["n_params"],
                          fed["grad_noise"], noise_model=noise_model, on_unstable=on_unstable, built=built)
    meas = measured_window(trace, probe, window, align)
    if prediction in ("schedule", "response"):
        corr, sq, full = schedule_predict_layers(method, trace["lr"].values, momentum, probe, built,
                                                 meas.attrs["window"], align, noise_model, return_full=True)
        pred["pred_grad_corr"] = (("probe_step", "layer"), corr)
        pred["pred_grad_sq_norm"] = (("probe_step", "layer"), sq)
        pred["pred_full_grad_sq_norm"] = (("probe_step", "layer"), full)
    elif prediction != "stationary":
        raise ValueError(f"prediction={prediction!r} is unknown; valid: {', '.join(PREDICTIONS)}")
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
    pred = pred.assign(nqm_grad_corr=pred["pred_grad_corr"], nqm_grad_sq_norm=pred["pred_grad_sq_norm"])
    if prediction == "response":
        if signal != "none":
            raise ValueError(f"signal={signal!r} is not valid with prediction='response' (the response model "
                             f"has the mean gradient in it); valid: none")
        pred = pred.assign(response_predict(trace, method, momentum, smooth=response_smooth))
    base = baselines(meas, lr, trace["sharpness_global"], method, momentum)
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r} is unknown; valid: {', '.join(COMBINES)}")
    pred = pred.assign(theory_grad_corr=pred["pred_grad_corr"], theory_grad_sq_norm=pred["pred_grad_sq_norm"])
    if combine != "none":
        corr, sq = forecast_link(combine, pred["pred_grad_corr"], pred["pred_grad_sq_norm"], meas["meas_grad_corr"],
                                 meas["meas_grad_sq_norm"])
        pred = pred.assign(pred_grad_corr=corr, pred_grad_sq_norm=sq)
    halves = split_half_windows(trace, probe, meas.attrs["window"], align) if meas.attrs["window"] >= 2 else None
    ds = xr.merge([pred, meas.drop_attrs(), base] + ([halves] if halves is not None else []))
    h_global = lr * trace["sharpness_global"]
    ds = ds.assign(lr=lr, h=h, edge=edge, edge_ratio=h / edge, regime=regime_top,
                   sharpness_global=trace["sharpness_global"], edge_ratio_global=h_global / edge,
                   sharpness=trace["sharpness"], hessian_trace=trace["hessian_trace"],
                   grad_noise=trace["grad_noise"], n_params=trace["n_params"])
    for k in ("grad_signal", "grad_signal_top", "grad_curv", "grad_curv_mean", "buffer_curv", "batch_sharpness",
              "batch_sharpness_global"):
        if k in trace:
            ds[k] = trace[k]
    ds.attrs = {"method": method, "momentum": momentum, "lr0": float(config.get("lr", np.nan)),
                "window": meas.attrs["window"], "align": align, "noise_model": noise_model, "shape": shape,
                "on_unstable": on_unstable, "smooth": int(smooth), "global_mode": int(bool(global_mode)),
                "prediction": requested, "prediction_used": prediction, "combine": combine, "signal": signal, "response_smooth": int(response_smooth), "signal_recorded": int(recorded),
                "spectra": "given" if spectra else "summary"}
    return ds


# ---------------------------------------------------------------------------------------
# runs, sweeps, files

OPTIONS = ("window", "align", "noise_model", "shape", "on_unstable", "smooth", "global_mode", "prediction",
           "signal", "response_smooth", "combine")


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
        current = "meas_alt1_grad_sq_norm" in ds or int(ds.attrs.get("window", 0)) < 2  # older files lack the halves
        if current and all(_same_option(ds.attrs.get(k), int(v) if isinstance(v, bool) else v)
                           for k, v in wanted.items() if v is not None):
            return ds
    ds = link_trace(store.load_run(run_dir), **options)
    ds.attrs["run_id"] = run_dir.name
    if write:
        store.atomic_write_dataset(target, ds)
    return ds


def _same_option(saved, wanted):
    return saved is not None and str(saved) == str(wanted)


def candidate_dirs(source, root=None):
    """The run directories ``source`` names, finished or not: a run directory itself, a
    store root (every run directory in it; ``ROOT/runs`` if only that holds runs), or a
    sweep spec (``.toml``; its distinct runs under ``root`` or the spec's root)."""
    source = Path(source)
    if source.suffix == ".toml":
        from experiments.sweeps.spec import expand, load_spec, resolve_root, run_id

        spec = load_spec(source)
        base = resolve_root(spec, root)
        return [base / run_id(c) for c in expand(spec)]
    if store.is_done(source):
        return [source]
    if source.is_dir():
        return sorted(p for p in store.find_root(source).iterdir() if p.is_dir() and store.is_run_dir(p))
    raise ValueError(f"source={str(source)!r} is not a run directory, a store root or a sweep spec (.toml)")


def run_dirs(source, root=None):
    """The finished run directories of ``source`` (see :func:`candidate_dirs`)."""
    return [d for d in candidate_dirs(source, root) if store.is_done(d)]


def loose_trace(source):
    """The trace file of ``source`` when it is not a run: a file (``.nc`` or any
    xarray-readable file), or a directory with ``trace.nc`` and no ``DONE``; else None."""
    source = Path(source)
    if source.is_file() and source.suffix != ".toml":
        return source
    if source.is_dir() and not store.is_done(source) and (source / store.TRACE).is_file():
        return source / store.TRACE
    return None


def link_file(path, *, opt=None, lr=None, momentum=None, write=True, **options):
    """:func:`link_trace` of a trace file (e.g. ``Tracer.dataset()`` saved by one's own loop),
    its config from the trace's attrs or the given ``opt``, ``lr``, ``momentum``
    (:func:`trace_config`); written beside it as ``link.nc`` (``NAME.link.nc`` for a file
    not named ``trace.nc``)."""
    path = Path(path)
    trace = store.read_trace(path)
    ds = link_trace(trace, trace_config(trace, opt, lr, momentum), **options)
    ds.attrs["run_id"] = path.parent.name if path.name == store.TRACE else path.stem
    if write:
        target = path.with_name(LINK_FILE if path.name == store.TRACE else path.stem + ".link.nc")
        store.atomic_write_dataset(target, ds)
    return ds


def link(source, *, root=None, recompute=False, write=True, opt=None, lr=None, momentum=None,
         **options):
    """The link of a run, or of every linkable finished run of a store root or sweep spec,
    or of a trace file / a directory with ``trace.nc`` and no config (:func:`link_file`;
    ``opt``, ``lr``, ``momentum`` there override the trace's attrs).

    One run: the Dataset of :func:`link_run` (dims probe_step, layer). Several: those
    stacked along a ``run`` dim (outer join: runs that diverged early have NaN after), with
    per-run coordinates ``opt``, ``lr0``, ``momentum``. Runs the NQM does not describe (Adam)
    or without probes are left out and named in ``attrs["skipped"]``. ``attrs`` ``n_finished``,
    ``n_missing``, ``n_failed``, ``n_diverged``, ``n_total`` count the points found (:func:`experiments.store.status_counts`).
    """
    trace_file = loose_trace(source)
    if trace_file is not None:
        return link_file(trace_file, opt=opt, lr=lr, momentum=momentum, write=write, **options)
    given = {k: v for k, v in (("opt", opt), ("lr", lr), ("momentum", momentum)) if v is not None}
    if given:
        name, value = next(iter(given.items()))
        raise ValueError(f"{name}={value!r} is only for a trace without a run config; "
                         f"source={str(source)!r} is a run, store root or spec (its configs say it)")
    candidates = candidate_dirs(source, root)
    status = store.status_counts(candidates)
    dirs = [d for d in candidates if store.is_done(d)]
    if not dirs:
        raise ValueError(f"source={str(source)!r} has no finished runs ({store.format_status(status)})")
    if len(dirs) == 1 and store.is_done(Path(source)):
        ds = link_run(dirs[0], recompute=recompute, write=write, **options)
        ds.attrs.update(store.status_attrs(status))
        return ds
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
    ds.attrs.update(store.status_attrs(status))
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
