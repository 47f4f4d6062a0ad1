"""The ``optdyn`` command line: every subcommand's arguments, and the handlers that turn
them into library calls (the logic lives in the library: :mod:`experiments.runs`,
:mod:`experiments.sweeps`, :mod:`experiments.linking`).

Bad input (a ValueError from the library, or an argparse error) prints one line on
stderr and exits with status 2. Every output location is checked writable before any work
(:func:`experiments.store.check_writable`). Ctrl-C on a sweep prints one line, exit 130.
"""

import argparse
import dataclasses
import json
import os
import signal
import sys
import tomllib

from experiments import store
from experiments.linking.core import OPTIONS, link
from experiments.linking.report import format_report, link_scores, protocol_scores
from experiments.runs.config import DTYPES, RunConfig
from experiments.runs.data import DATASETS
from experiments.runs.loop import run
from experiments.runs.models import MODELS
from experiments.runs.optim import CLIPS, OPTIMIZERS, SCHEDULES
from experiments.sweeps.collect import collect, to_table
from experiments.sweeps.runner import SweepInterrupted, format_counts, format_hints, plan, run_sweep


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    parser = _Parser(prog="optdyn", description="optimizer dynamics: train, sweep, collect, link")
    parser.add_argument("--version", action="version", version=f"optdyn {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(subparsers)
    _add_sweep_and_collect(subparsers)
    _add_link(subparsers)
    _add_viewers(subparsers)
    _add_whatif(subparsers)
    _add_diagnose(subparsers)
    return parser


def _version():
    from experiments.runs.loop import versions

    v = versions()
    return f"{v['optdyn']} (torch {v['torch']}, numpy {v['numpy']}, python {v['python']})"


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ValueError as err:
        print(f"optdyn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of stdout has gone (``| head``): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


# --------------------------------------------------------------------------- train
FIELD_HELP = {
    "model": f"one of {', '.join(MODELS)}", "data": f"one of {', '.join(DATASETS)}",
    "opt": f"one of {', '.join(OPTIMIZERS)} (PyTorch SGD convention; adam: momentum is beta1)",
    "lr": "learning rate > 0", "momentum": "in [0, 1)", "schedule": f"one of {', '.join(SCHEDULES)}",
    "step_every": "steps between decays (schedule step)", "step_gamma": "decay factor (schedule step)",
    "final_lr_factor": "final lr / lr (cosine, linear)", "batch_size": "0 = full batch",
    "clip": f"one of {', '.join(CLIPS)}", "clip_value": "max norm (global, layer) or max |g| (value)",
    "line_search": "golden-section search of the step-size multiplier in [0, line-search-max]",
    "probe_every": "sharpness/noise probe every k steps (0 = off)",
    "probe_batch_size": "examples the probe draws (0 = the step's training batch)",
    "hutchinson_samples": "Rademacher vectors per probe (trace)", "noise_microbatches": "0 (off) or >= 2",
    "probe_curvature": "probe the curvature along the gradient and the momentum buffer (link response model)",
    "eval_every": "test eval every k steps",
    "per_tensor": "trace per parameter tensor instead of per module", "threads": "torch threads (0 = leave)",
    "device": "cpu, cuda, cuda:N", "dtype": f"one of {', '.join(DTYPES)}",
    "checkpoint_every": "checkpoint every k steps (0 = none); a killed run resumes from the last",
    "fork_from": "RUN_ID@STEP: start from that run's checkpoint (same store root)",
}


def _add_train(subparsers):
    """``optdyn train``: flags for every RunConfig field (override ``--config FILE.toml``)."""
    p = subparsers.add_parser("train", help="train one network and write its run directory",
                              description="Train one network with a per-layer trace. Flags override "
                                          "the TOML file given by --config (top-level RunConfig keys).")
    p.add_argument("--config", metavar="FILE.toml", help="RunConfig keys in a TOML file")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--data-dir", help=f"directory with local dataset files (default ${'OPTDYN_DATA'})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else "{}"
        doc = f"{FIELD_HELP.get(f.name, '')} (default {default})".lstrip()
        if f.type is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=doc)
        elif f.type is dict:
            p.add_argument(flag.removesuffix("s"), dest=f.name, action="append", metavar="KEY=VALUE",
                           help=f"one entry of {f.name} (VALUE parsed as TOML, else a string); repeatable")
        else:
            p.add_argument(flag, dest=f.name, type=f.type, default=None, help=doc)
    p.set_defaults(func=_train_main)


def _toml_value(text):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def config_from_args(args):
    """RunConfig from the TOML file (if any) updated by the flags that were given."""
    d = {}
    if args.config:
        try:
            with open(args.config, "rb") as f:
                d = tomllib.load(f)
        except OSError as err:
            raise ValueError(f"config={args.config!r} cannot be read: {err.strerror}") from None
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config={args.config!r} is not valid TOML: {err}") from None
    for f in dataclasses.fields(RunConfig):
        value = getattr(args, f.name)
        if value is None:
            continue
        if f.type is dict:
            entries = dict(d.get(f.name, {}))
            for item in value:
                key, sep, text = item.partition("=")
                if not sep or not key:
                    raise ValueError(f"{f.name} entry {item!r} is not KEY=VALUE")
                entries[key] = _toml_value(text)
            value = entries
        d[f.name] = value
    return RunConfig.from_dict(d)


def _train_main(args):
    config = config_from_args(args)
    was_done = store.is_done(args.out)
    summary = run(config, args.out, data_dir=args.data_dir, progress=not args.no_progress)
    if was_done:
        print(f"optdyn train: nothing trained: {args.out} already holds this finished run "
              f"(same config and data); its summary follows", file=sys.stderr)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


# --------------------------------------------------------------------------- sweep, collect
def _add_sweep_and_collect(subparsers):
    p = subparsers.add_parser("sweep", help="run a sweep spec (resumable)",
                              description="Run every unfinished run of SPEC. Final line: finished "
                              "(computed now, diverged included) / skipped (already finished) / "
                              "diverged / failed. Exit 1 if any run failed.")
    p.add_argument("spec", help="sweep spec, TOML")
    p.add_argument("--root", help="store root (default: the spec's root, relative to the CWD)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, help="local worker processes (default: core count; 0: in-process)")
    where.add_argument("--scheduler", help="Dask scheduler address, tcp://HOST:PORT")
    where.add_argument("--dask-local", type=int, metavar="N", help="start a Dask LocalCluster of N workers")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their status; run nothing")
    p.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    p.add_argument("--data-dir", help="directory with local dataset files (default $OPTDYN_DATA)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_sweep_main)

    c = subparsers.add_parser("collect", help="stack finished runs into one table/dataset")
    c.add_argument("source", help="a store root directory, or a sweep spec (.toml)")
    c.add_argument("--root", help="store root when SOURCE is a spec (default: the spec's root)")
    c.add_argument("--traces", action="store_true", help="include the traces, not only summaries")
    c.add_argument("--csv", help="write a tidy CSV table here")
    c.add_argument("--parquet", help="write a tidy Parquet table here (needs pyarrow)")
    c.add_argument("--strict", action="store_true", help="exit 1 unless every point is finished")
    c.set_defaults(func=_collect_main)


def _sweep_main(args):
    if args.dry_run:
        the_plan = plan(args.spec, root=args.root)
        keys = the_plan.varying_keys()
        for rid, config, status in zip(the_plan.ids, the_plan.configs, the_plan.status):
            values = config.to_dict()
            print(rid, f"{status:6s}", " ".join(f"{k}={values[k]!r}" for k in keys))
        c = the_plan.counts()
        print(f"{len(the_plan.ids)} runs in {the_plan.root}: done {c['done']} / failed {c['failed']} "
              f"/ to run {c['todo'] + (c['failed'] if args.retry_failed else 0)}")
        return 0
    try:
        counts = run_sweep(args.spec, root=args.root, workers=args.workers, scheduler=args.scheduler,
                           dask_local=args.dask_local, retry_failed=args.retry_failed,
                           progress=not args.no_progress, data_dir=args.data_dir)
    except SweepInterrupted as stop:
        c = stop.counts
        print(f"interrupted: {c['finished'] + c['skipped']} of {c['total']} runs finished; rerun to resume",
              file=sys.stderr)
        return 130
    print(format_counts(counts))
    for hint in format_hints(counts):
        print(hint, file=sys.stderr)
    return 1 if counts["failed"] else 0


def _report_status(command, ds, strict):
    """One line on stderr: finished / missing / failed / diverged; the exit status."""
    status = store.status_from_attrs(ds.attrs)
    if status is None:
        return 0
    print(f"optdyn {command}: {store.format_status(status)} (in {ds.attrs.get('root', 'the source')})",
          file=sys.stderr)
    return 1 if strict and status["finished"] < status["total"] else 0


def _collect_main(args):
    if args.root is not None and not str(args.source).endswith(".toml"):
        raise ValueError(f"--root is only for a spec SOURCE; source={args.source!r} is a root already")
    for path, name in ((args.csv, "csv"), (args.parquet, "parquet")):
        if path:
            store.check_writable(path, name)
    ds = collect(args.source, traces=args.traces) if args.root is None else \
        collect(args.root, traces=args.traces, spec=args.source)
    for path, fmt in ((args.csv, "csv"), (args.parquet, "parquet")):
        if path:
            table = to_table(ds, path, fmt)
            print(f"wrote {len(table)} rows to {path}")
    if not (args.csv or args.parquet):
        print(ds)
    return _report_status("collect", ds, args.strict)


# --------------------------------------------------------------------------- link
def _add_link(subparsers):
    p = subparsers.add_parser("link", help="predicted vs measured per-layer oscillation and norm, with scores",
                              description="Link a run (or every finished run of a store root or sweep "
                              "spec): NQM predictions from the measured per-layer sharpness, Hessian trace "
                              "and gradient noise, beside the measured successive-gradient correlation and "
                              "gradient norm. Writes link.nc beside each run; prints a per-layer table and "
                              "the agreement scores.")
    p.add_argument("source", help="a run directory, a store root, a sweep spec (.toml), or a trace file / "
                   "a directory with trace.nc from one's own loop (Tracer.dataset() saved)")
    p.add_argument("--root", help="store root when SOURCE is a spec (default: the spec's root)")
    p.add_argument("--opt", help="for a trace without a run config: gd, hb or nag (default: the trace's attrs)")
    p.add_argument("--lr", type=float, help="for a trace without a run config: the initial lr (default: attrs)")
    p.add_argument("--momentum", type=float, help="for a trace without a run config (default: attrs)")
    p.add_argument("--window", type=int, help="measurement window in steps (default: probe spacing)")
    p.add_argument("--align", default="center", help="measurement window: center (default) or after the probe")
    p.add_argument("--noise-model", default="curvature", help="additive or curvature (default)")
    p.add_argument("--shape", default="power", help="spectrum shape from the summary: power (default), two-level")
    p.add_argument("--on-unstable", default="exclude", help="modes past the edge: exclude (default), nan")
    p.add_argument("--smooth", type=int, default=3, help="probes in the rolling mean of the probe estimates")
    p.add_argument("--prediction", default="auto",
                   help="auto (default: response where the probe recorded its inputs, else schedule), response "
                   "(drift + noise-driven mode, dynamics.nqm.response), schedule (NQM run through the lr sequence) "
                   "or stationary")
    p.add_argument("--response-smooth", type=int, default=1, help="probes (at or before each probe) in the "
                   "trailing mean of the response model's inputs (default 1: raw)")
    p.add_argument("--combine", default="persistence", help="persistence (default: the forecast is the "
                   "theory's averaged with the previous window's measurement), none (the theory alone), or the "
                   "alternatives residual, change, persistence2 (docs/findings/link.md)")
    p.add_argument("--signal", default="none", help="mean-gradient term from the probe's grad_signal: none "
                   "(default), fluct / root (lag-1 of the network top mode's fluctuation / dominant root), drift (+1)")
    p.add_argument("--block-only", action="store_true",
                   help="per-layer diagonal-block spectra only (no network top mode in each layer)")
    p.add_argument("--recompute", action="store_true", help="ignore existing link.nc files")
    p.add_argument("--json", help="also write the scores (and options) as JSON here")
    p.add_argument("--strict", action="store_true", help="exit 1 unless every point is finished")
    p.set_defaults(func=_link_main)


def _link_main(args):
    if args.json:
        store.check_writable(args.json, "json")
    ds = link(args.source, root=args.root, recompute=args.recompute, window=args.window, align=args.align,
              noise_model=args.noise_model, shape=args.shape, on_unstable=args.on_unstable, smooth=args.smooth,
              global_mode=not args.block_only, prediction=args.prediction, signal=args.signal,
              response_smooth=args.response_smooth, combine=args.combine, opt=args.opt, lr=args.lr,
              momentum=args.momentum)
    print(format_report(ds))
    if args.json:
        store.atomic_write_json(args.json, _nan_to_null({"scores": link_scores(ds), "protocol": protocol_scores(ds),
                                                         "options": {k: ds.attrs.get(k) for k in OPTIONS},
                                                         "source": str(args.source)}))
    return _report_status("link", ds, args.strict)


# --------------------------------------------------------------------------- export, plot
def _add_viewers(subparsers):
    p = subparsers.add_parser("export", help="a trace as TensorBoard scalars or a tidy table",
                              description="Export a run's trace (a run directory, a trace file, or a "
                              "directory with trace.nc): per-layer TensorBoard scalars grouped by layer, "
                              "and/or a tidy (step, layer) table.")
    p.add_argument("run", help="a run directory, a trace file, or a directory with trace.nc")
    p.add_argument("--tensorboard", metavar="DIR", help="write TensorBoard event files here "
                   "(pip install 'optdyn[tensorboard]')")
    p.add_argument("--csv", help="write the tidy table as CSV here")
    p.add_argument("--parquet", help="write the tidy table as Parquet here (needs pyarrow)")
    p.set_defaults(func=_export_main)


    q = subparsers.add_parser("plot", help="the per-layer dashboard of a run (PNG or PDF)",
                              description="One figure per run: per-layer gradient norm, successive-gradient "
                              "cosine, update:parameter ratio with DL4J's bands, h/edge at probes, lr, loss. "
                              "With many layers, a few are coloured and all lie in a grey range band.")
    q.add_argument("run", help="a run directory, a trace file, or a directory with trace.nc")
    q.add_argument("--out", help="PNG or PDF file (default: dashboard.png in the run directory, or "
                   "NAME.dashboard.png beside a trace file)")
    q.add_argument("--layers", nargs="+", metavar="NAME", help="layers to colour (names or patterns like 'features.*')")
    q.add_argument("--max-layers", type=int, default=8, help="layers coloured at most (1..8, default 8)")
    q.add_argument("--smooth", type=int, default=10, help="steps in the cosine's rolling mean (default 10)")
    q.set_defaults(func=_plot_main)


def _plot_main(args):
    from pathlib import Path

    from experiments.viewers.dashboard import dashboard, save_dashboard
    trace = store.read_trace(args.run, "run")
    run = Path(args.run)
    out = args.out or (run / "dashboard.png" if run.is_dir() else run.with_name(run.stem + ".dashboard.png"))
    fig, _ = dashboard(trace, layers=args.layers, max_layers=args.max_layers, smooth=args.smooth,
                       title=run.name)
    print(f"wrote {save_dashboard(fig, out)}")
    return 0


def _export_main(args):
    from experiments.viewers.export import write_table, write_tensorboard

    if not (args.tensorboard or args.csv or args.parquet):
        raise ValueError("export needs --tensorboard DIR, --csv FILE or --parquet FILE")
    trace = store.read_trace(args.run, "run")
    if args.tensorboard:
        print(f"wrote {write_tensorboard(trace, args.tensorboard)} scalars to {args.tensorboard}")
    for path, suffix in ((args.csv, ".csv"), (args.parquet, ".parquet")):
        if path:
            if not path.endswith(suffix):
                raise ValueError(f"path={path!r} must end with {suffix}")
            print(f"wrote {len(write_table(trace, path))} rows to {path}")
    return 0


# --------------------------------------------------------------------------- whatif, diagnose
def _add_whatif(subparsers):
    p = subparsers.add_parser("whatif", help="predict what a change of lr/momentum/method at a step would do",
                              description="From RUN's trace and probes up to STEP, predict per layer and "
                              "change, over the following windows: successive-gradient correlation, gradient "
                              "norm, update:parameter ratio, h/edge and regime (the link's NQM through the "
                              "changed schedule), beside persistence. The run's own schedule ('scheduled') "
                              "is always one of the changes. --check runs the forks and scores.")
    p.add_argument("run_dir", metavar="RUN", help="a finished run directory (with probes)")
    p.add_argument("--at", type=int, required=True, metavar="STEP", help="the step the change is made at")
    p.add_argument("--lr-factor", type=float, nargs="+", default=[], help="lr multiplied by F from STEP on")
    p.add_argument("--decay", type=float, nargs="+", default=[], help="a decay by G at STEP (lr x G from STEP on)")
    p.add_argument("--momentum", type=float, nargs="+", default=[], help="momentum set to M from STEP on")
    p.add_argument("--method", nargs="+", default=[], help="method (gd, hb, nag) from STEP on")
    p.add_argument("--window", type=int, help="window in steps (default: the probe spacing)")
    p.add_argument("--windows", type=int, default=2, help="windows after STEP (default 2)")
    p.add_argument("--check", action="store_true", help="run the forks (from a checkpoint at STEP) and score")
    p.add_argument("--base", choices=("window0", "persistence", "trend", "escape", "drift-steps", "drift-flow",
                                      "since-escape", "sharpen-decay", "bulk-sharpening", "bulk-loss-level",
                                      "bulk-trend-blend"),
                   help="the unchanged run's level: window0 (the model anchored on the window before STEP), "
                   "persistence or trend (a forecast of the unchanged run times the model's effect of the "
                   "change), escape (window0 with the plateau escape forecast where one is due), drift-steps / "
                   "drift-flow (window0 with the norm's post-escape drift, continued in steps / flow time), since-escape (the "
                   "predictor in use with the drift fitted since the plateau escape, or after the first window, on "
                   "batch means), sharpen-decay (the predictor in use until the eleventh round: escape and the "
                   "sharpening after an lr decrease, with drift-flow), bulk-sharpening (the predictor in use from the "
                   "eleventh round to the fourteenth: rho from sharpen-decay, the norm from the flow-time "
                   "sharpening of the bulk and the noise), bulk-loss-level (the predictor in use in the fourteenth "
                   "round: bulk-sharpening, with the unchanged run's norm following the training loss where it is "
                   "below 0.2 nats and falling), bulk-trend-blend (the predictor in use in the fifteenth round: "
                   "bulk-loss-level, with the unchanged run's level there the geometric mean of the loss's forecast "
                   "and the run's own trend); default: the predictor in use (bulk-trend-blend, its norm the geometric "
                   "mean of those under three forecasts of the bulk's curvature: its flow-time sharpening, a power "
                   "of the flow time, and held)")
    p.add_argument("--data-dir", help="directory with local dataset files")
    p.add_argument("--out", help="write the predictions (and measurements) as netCDF here")
    p.add_argument("--json", help="with --check: write the scores as JSON here")
    p.set_defaults(func=_whatif_main)


def _whatif_main(args):
    from experiments.whatif.check import check, format_scores
    from experiments.whatif.predict import BASES, changes_from, format_whatif, whatif

    if args.json and not args.check:
        raise ValueError(f"json={args.json!r} writes the scores of --check; valid only with --check")
    for path, name in ((args.out, "out"), (args.json, "json")):
        if path:
            store.check_writable(path, name)
    changes = changes_from(args.lr_factor, args.decay, args.momentum, args.method)
    pr = None if args.base is None else BASES[args.base]
    if args.check:
        ds = check(args.run_dir, args.at, changes, window=args.window, n_windows=args.windows,
                   data_dir=args.data_dir, predictor=pr)
    else:
        ds = whatif(store.load_run(args.run_dir), args.at, changes, window=args.window, n_windows=args.windows,
                    predictor=pr)
    print(format_whatif(ds))
    if args.check:
        print("\nscores over layers x changes x windows after the change\n" + format_scores(ds.attrs["scores"]))
        if args.json:
            store.atomic_write_json(args.json, {"run": str(args.run_dir), "at": args.at,
                                                "changes": [str(x) for x in ds.label.values],
                                                "scores": _nan_to_null(ds.attrs["scores"])})
    if args.out:
        store.atomic_write_dataset(args.out, ds.drop_attrs())
    return 0


def _nan_to_null(scores):
    """The scores with an undefined (NaN) score as null: standard JSON, not a number."""
    if isinstance(scores, dict):
        return {k: _nan_to_null(v) for k, v in scores.items()}
    if isinstance(scores, (list, tuple)):
        return [_nan_to_null(v) for v in scores]
    return None if isinstance(scores, float) and scores != scores else scores


def _add_diagnose(subparsers):
    p = subparsers.add_parser("diagnose", help="per-layer diagnosis of a run, with the rule behind each statement",
                              description="Print, per layer, DL4J's update:parameter ratio against its bands, "
                              "vanishing/exploding gradients, h/edge and regime, oscillation, norm growth "
                              "and its cause, and clipping advice; write a one-page figure.")
    p.add_argument("run_dir", metavar="RUN", help="a finished run directory")
    p.add_argument("--clip", type=float, help="clip threshold to advise on (default: the median global norm)")
    p.add_argument("--last", type=int, help="steps at the end the diagnosis is about (default: a quarter)")
    p.add_argument("--until", type=int, help="diagnose the run as it was before this step (default: the end)")
    p.add_argument("--figure", help="write the one-page figure here (PDF or PNG; default RUN/diagnose.pdf)")
    p.add_argument("--out", help="also write the printed diagnosis to this file")
    p.set_defaults(func=_diagnose_main)


def _diagnose_main(args):
    from pathlib import Path

    from experiments.whatif.diagnose import check_figure, diagnose, format_diagnosis, plot_diagnosis

    figure = args.figure or Path(args.run_dir) / "diagnose.pdf"
    check_figure(figure)
    if args.out:
        store.check_writable(args.out, "out")
    d = diagnose(store.load_run(args.run_dir), clip=args.clip, last=args.last, until=args.until)
    text = format_diagnosis(d)
    print(text)
    if args.out:
        store.atomic_write_text(args.out, text + "\n")
    plot_diagnosis(d, figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
