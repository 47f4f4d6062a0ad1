"""whatif, diagnose, link and the CLI on settings the what-if families do not cover: a diverged
run, a fork that diverges, a schedule whose lr depends on the run's length, a momentum set on gd,
a block with negative curvature, line search, clipping, weight decay, Adam, missing probe inputs,
bad outputs (docs/findings/faults.md). Each test failed before the fix it names."""

import json

import numpy as np
import pytest

from experiments import store
from experiments.cli import main
from experiments.runs.config import RunConfig, run_id
from experiments.runs.loop import run
from experiments.runs.optim import lr_factors
from experiments.whatif.check import check, format_scores
from experiments.whatif.predict import SCHEDULED, changes_from, diverged_step, format_whatif, plan, whatif

SMALL = dict(probe_every=10, probe_batch_size=64, hutchinson_samples=2, noise_microbatches=4, threads=1, seed=0,
             steps=60)


def _run(root, **kw):
    cfg = RunConfig(**{**SMALL, **kw})
    run(cfg, root / run_id(cfg), progress=False)
    return root / run_id(cfg)


@pytest.fixture(scope="module")
def diverged_run(tmp_path_factory):
    # lr 50 on the seed CNN: the loss is non-finite within a few steps
    return _run(tmp_path_factory.mktemp("store"), model="seed-cnn", data="digits", lr=50.0, momentum=0.9,
                batch_size=64, model_args={"channels": 4, "hidden": 16})


def test_a_diverged_run_is_named_as_such_by_whatif(diverged_run, capsys):
    trace = store.load_run(diverged_run)
    div = trace.attrs["summary"]["diverged_step"]
    assert div is not None and div < 10
    no_summary = trace.copy()
    no_summary.attrs = {"config": trace.attrs["config"]}
    assert diverged_step(no_summary) == div  # read off the trace where no summary is at hand
    with pytest.raises(ValueError, match=rf"at=40 is outside every step \(none is: a window of 10 steps does not "
                                         rf"fit before step {div}\): the run diverged at step {div}"):
        whatif(trace, 40, changes_from([0.5]), window=10)
    with pytest.raises(ValueError, match=rf"at=40 is outside the valid range \[1, {div}\]: the run diverged"):
        whatif(trace, 40, changes_from([0.5]), window=1)
    ds = whatif(trace, div, changes_from([0.5]), window=1)  # up to the divergence: a prediction
    assert np.isfinite(ds.pred_grad_norm.values).all()
    assert main(["whatif", str(diverged_run), "--at", "40", "--lr-factor", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"the run diverged at step {div}" in err[0]


def test_whatif_names_at_when_at_is_zero(tmp_path):
    run_dir = _run(tmp_path, model="linear", data="linreg", opt="hb", lr=0.3, batch_size=8)
    with pytest.raises(ValueError, match=r"at=0 is outside the valid range \[10, 60\]"):
        whatif(store.load_run(run_dir), 0, changes_from([0.5]))
    with pytest.raises(ValueError, match=r"window=10 is outside the valid range \[1, at=5\] \(default: the probe"):
        whatif(store.load_run(run_dir), 5, changes_from([0.5]))  # the window was not given: say where it came from


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_plan_refuses_a_horizon_past_the_end_of_a_length_dependent_schedule(schedule):
    config = RunConfig(model="linear", data="linreg", schedule=schedule, steps=100, warmup_steps=10).to_dict()
    # within the run: the run's own lr at every step
    np.testing.assert_allclose(plan(config, 60, SCHEDULED, 100)["lr"], config["lr"] * lr_factors(
        schedule, 100, warmup_steps=10), rtol=1e-12)
    # past its end the schedule (computed over the run's length) is not defined: before the fix the
    # plan silently took a schedule over `horizon` steps, another lr before the change too
    with pytest.raises(ValueError, match=rf"horizon=120 is outside the valid range \[1, steps=100\]: the {schedule}"):
        plan(config, 80, SCHEDULED, 120)
    constant = {**config, "schedule": "constant"}  # a constant (or step) schedule continues past the end
    assert plan(constant, 80, SCHEDULED, 120)["lr"].shape == (120,)


def test_a_fork_that_diverges_is_reported_diverged_not_measured(tmp_path):
    # linear regression with HB near its (stochastic) edge; lr x10 at step 30 diverges within the horizon
    run_dir = _run(tmp_path, model="linear", data="linreg", opt="hb", lr=1.5, momentum=0.9, batch_size=8)
    ds = check(run_dir, 30, changes_from([10.0]), window=10, n_windows=2)
    div = int(ds.meas_diverged_step.values[1])
    assert ds.meas_diverged_step.values[0] == -1 and 30 <= div < 50
    gone = ds.stop.values > div
    assert np.isnan(ds.meas_grad_norm.isel(change=1).values[gone]).all()  # no finite mean over such a window
    assert np.isfinite(ds.meas_grad_norm.isel(change=1).values[~gone]).all()
    assert np.isfinite(ds.meas_grad_norm.isel(change=0).values).all()
    text = format_whatif(ds)
    assert f"fork: diverged at step {div}" in text and "nan" not in text
    assert "nan" not in format_scores(ds.attrs["scores"])
    out = tmp_path / "scores.json"
    assert main(["whatif", str(run_dir), "--at", "30", "--lr-factor", "10", "--window", "10", "--check",
                 "--json", str(out)]) == 0

    def no_nan(name):
        raise ValueError(f"{name} in the JSON")  # was: NaN tokens (not JSON) for undefined scores

    written = json.loads(out.read_text(), parse_constant=no_nan)
    undefined = {k for k, v in ds.attrs["scores"]["persistence"].items() if not np.isfinite(v)}
    assert undefined and all(written["scores"]["persistence"][k] is None for k in undefined)


def test_format_scores_says_why_a_score_is_missing():
    sc = {name: {"n": 2, "corr_spearman": np.nan} for name in ("model", "persistence")}
    text = format_scores(sc)
    assert "nan" not in text and "n/a" in text and "fewer than 3" in text


def _diagnose_trace(**kw):
    from tests.test_diagnose import trace

    return trace(**kw)


def test_diagnose_reports_a_divergence_and_diagnoses_the_steps_before_it():
    from experiments.whatif.diagnose import diagnose, format_diagnosis

    norm = np.ones(200)
    norm[150:] = np.nan  # layer a's gradient non-finite from step 150: the run diverged there
    d = diagnose(_diagnose_trace(norm={"a": norm}))
    assert d.info["diverged_step"] == 150 and d.info["steps"] == 150
    text = format_diagnosis(d)
    assert text.startswith("the run diverged at step 150") and "nan" not in text
    grad = {f.layer: f for f in d.findings if f.rule.startswith("grad.")}
    assert grad["a"].rule == "grad.exploding" and "non-finite at step 150" in grad["a"].statement
    assert grad["b"].rule == "grad.ok"  # its finite steps before the divergence are flat
    norm[1:] = np.nan
    with pytest.raises(ValueError, match="the run diverged at step 1 .*nothing to diagnose"):
        diagnose(_diagnose_trace(norm={"a": norm}))


def test_diagnose_of_adam_says_the_edge_is_undefined_and_a_missing_probe_ratio_is_named():
    from experiments.whatif.diagnose import diagnose, format_diagnosis

    ds = _diagnose_trace(norm=np.linspace(1, 3, 200))  # norm growth x > 1.1 in the last quarter
    ds = ds.sel(probe_step=[0])  # one probe, before the window: no probe ratio
    ds.attrs["config"] = {"opt": "adam", "momentum": 0.9, "lr": 1e-3}
    text = format_diagnosis(diagnose(ds, last=100))
    assert "network h/edge undefined (adam" in text and "nan" not in text
    assert "unmeasured: no probe in each half of the window" in text


def test_a_block_with_negative_curvature_has_an_undefined_regime(tmp_path):
    from experiments.whatif.predict import defined_regime, measure_windows

    run_dir = _run(tmp_path, model="mlp", data="linreg", opt="hb", lr=0.3, momentum=0.9, batch_size=8,
                   model_args={"hidden": [8]})
    trace = store.load_run(run_dir)
    layers = list(trace["layer"].values)
    neg = trace.copy(deep=True)
    neg["sharpness"].loc[{"layer": layers[0]}] = -0.01  # a saddle-like block (BatchNorm at initialisation)
    ds = whatif(neg, 40, changes_from([0.5]), window=10)
    assert (ds.pred_regime_layer.sel(layer=layers[0]).values == "undefined").all()  # was "monotone"
    assert (ds.pred_regime_layer.sel(layer=layers[1]).values != "undefined").all()
    m = measure_windows(neg, [(30, 40), (40, 50)], "hb", 0.9)
    assert (m.regime_layer.sel(layer=layers[0]).values == "undefined").all()
    nan_top = trace.copy(deep=True)
    nan_top["sharpness_global"][-3:] = np.nan  # a failed probe of the network's top eigenvalue
    ds = whatif(nan_top, 40, changes_from([0.5]), window=10)  # was: ValueError h=nan from regime()
    assert (ds.pred_regime.isel(window=slice(1, None)).values == "undefined").all()
    assert "undefined" in format_whatif(ds) and "nan" not in format_whatif(ds)
    assert defined_regime("hb", 0.5, 0.9) == "ripple"


def test_a_momentum_set_on_a_gd_run_makes_it_heavy_ball_in_the_plan_and_the_fork():
    from experiments.whatif.predict import Change, fork_config

    config = RunConfig(model="linear", data="linreg", opt="gd", lr=0.3, steps=100).to_dict()
    change = Change("momentum=0.6", momentum=0.6)
    p = plan(config, 40, change, 60)
    # PyTorch's SGD with momentum 0.6 from step 40 on: heavy ball (was: gd with the momentum dropped,
    # i.e. no change at all)
    assert list(p["method"][38:42]) == ["gd", "gd", "hb", "hb"] and list(p["momentum"][38:42]) == [0, 0, 0.6, 0.6]
    fork = RunConfig.from_dict(fork_config(config, "0" * 16, 40, change, 60))
    assert (fork.opt, fork.momentum) == ("hb", 0.6)
    nag = {**config, "opt": "nag", "momentum": 0.9}  # on a momentum method the method stays
    assert set(plan(nag, 40, change, 60)["method"]) == {"nag"}
    assert "opt" not in change.fork_overrides(nag)


def test_a_line_search_run_is_refused_and_a_binding_clip_is_noted(tmp_path, capsys):
    run_dir = _run(tmp_path, model="linear", data="linreg", opt="hb", lr=0.3, momentum=0.9, batch_size=8,
                   clip="global", clip_value=0.01)
    trace = store.load_run(run_dir)
    assert (trace["clip_factor_global"].values[30:40] < 1).all()  # the clip binds on every step
    text = format_whatif(whatif(trace, 40, changes_from([0.5]), window=10))
    assert "note: the global clip at 0.01 scaled 100% of window 0's steps" in text  # was: nothing said
    unclipped = trace.copy()
    unclipped.attrs = {**trace.attrs, "config": {**trace.attrs["config"], "clip": "none"}}
    assert "note:" not in format_whatif(whatif(unclipped, 40, changes_from([0.5]), window=10))
    decayed = trace.copy()
    decayed.attrs = {**trace.attrs, "config": {**trace.attrs["config"], "clip": "none", "weight_decay": 0.01}}
    assert "note: weight decay 0.01 adds 0.01 to every curvature" in format_whatif(
        whatif(decayed, 40, changes_from([0.5]), window=10))  # was: nothing said
    ls = trace.copy()
    ls.attrs = {**trace.attrs, "config": {**trace.attrs["config"], "line_search": True}}
    with pytest.raises(ValueError, match=r"line_search=True is not predicted \(valid: False\)"):
        whatif(ls, 40, changes_from([0.5]), window=10)  # was: a prediction at the unscaled lr


def test_diagnose_without_probes_names_the_missing_model_not_nan():
    from experiments.whatif.diagnose import diagnose, format_diagnosis

    ds = _diagnose_trace(cos=0.5).drop_dims("probe_step")  # a run with probe_every = 0
    text = format_diagnosis(diagnose(ds))
    assert "osc.persistent" in text and "the model's ρ_g is unknown" in text  # was: 'h/edge nan ... ρ_g +nan'
    assert "network h/edge unknown (no probes" in text and "nan" not in text


def test_link_report_names_an_undefined_score_instead_of_nan(tmp_path):
    from experiments.linking.core import link
    from experiments.linking.report import format_report

    run_dir = _run(tmp_path, model="mlp", data="linreg", opt="hb", lr=0.3, momentum=0.9, batch_size=8,
                   model_args={"hidden": [8]}, probe_every=30)  # two probes: no per-layer Spearman
    text = format_report(link(run_dir))
    assert "n/a" in text and "fewer than 3" in text
    assert "NaN" not in text and "=nan" not in text  # was: 'NaN' in the per-layer table


@pytest.mark.parametrize("name, option", [("hessian_trace", "hutchinson_samples >= 1"),
                                          ("grad_noise", "noise_microbatches >= 2")])
def test_a_trace_without_the_nqm_inputs_is_refused_by_whatif_and_link(tmp_path, name, option):
    from experiments.linking.core import link_trace

    run_dir = _run(tmp_path, model="linear", data="linreg", opt="hb", lr=0.3, momentum=0.9, batch_size=8)
    trace = store.load_run(run_dir)
    trace[name][:] = np.nan  # what hutchinson_samples=0 / noise_microbatches=0 record
    msg = rf"{name} is not finite at any probe \(run with {option}\)"
    with pytest.raises(ValueError, match=msg):  # was: every prediction NaN ('undefined'), the cause unnamed
        whatif(trace, 40, changes_from([0.5]), window=10)
    with pytest.raises(ValueError, match=msg):
        link_trace(trace)


def test_cli_refuses_ignored_or_unwritable_outputs_and_a_decay_above_one(tmp_path, capsys):
    # each was accepted before: --json without --check silently ignored, a .svg figure written as
    # PDF bytes, a 'decay' x1.5, an unwritable --out found only after the work
    run = str(tmp_path / "no-such-run")
    cases = [(["whatif", run, "--at", "10", "--lr-factor", "2", "--json", str(tmp_path / "s.json")],
              "valid only with --check"),
             (["whatif", run, "--at", "10", "--decay", "1.5"], r"decay=1.5 is outside the valid range (0, 1]"),
             (["whatif", run, "--at", "10", "--out", "/proc/x.nc"], "out='/proc/x.nc' is not writable"),
             (["diagnose", run, "--figure", str(tmp_path / "d.svg")], "format 'svg' is unknown; valid: .png, .pdf")]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    with pytest.raises(ValueError, match="decay=1.5"):
        changes_from(decays=[1.5])


def test_cli_stops_quietly_when_its_reader_has_gone(diverged_run, tmp_path):
    # `optdyn diagnose RUN | head -1`: the reader closes the pipe before the CLI prints
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "-m", "experiments.cli", "diagnose", str(diverged_run), "--figure",
                           str(tmp_path / "d.png")], stdout=write, stderr=subprocess.PIPE, env=env, text=True)
    os.close(write)
    assert "Traceback" not in done.stderr and done.returncode == 141  # was: a BrokenPipeError traceback, status 1


def test_link_json_writes_an_undefined_score_as_null(tmp_path):
    run_dir = _run(tmp_path, model="mlp", data="linreg", opt="hb", lr=0.3, momentum=0.9, batch_size=8,
                   model_args={"hidden": [8]}, probe_every=30)  # two probes: some scores undefined
    out = tmp_path / "link.json"
    assert main(["link", str(run_dir), "--json", str(out)]) == 0

    def no_nan(name):
        raise ValueError(f"{name} in the JSON")  # was: NaN tokens (not JSON)

    text = out.read_text()
    json.loads(text, parse_constant=no_nan)
    assert "null" in text
