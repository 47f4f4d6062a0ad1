"""whatif: the model's update moments, plans, the plug-in predictor, forks and scores, the CLI."""

import functools

import numpy as np
import pytest
import torch
import xarray as xr

from dynamics.nqm.schedule import schedule_prediction
from dynamics.quadratic import stability_edge
from experiments import store
from experiments.cli import main
from experiments.runs.config import RunConfig, run_id
from experiments.runs.loop import run
from experiments.whatif.check import check, scores
from experiments.whatif.curvature import CurvatureForecast
from experiments.whatif.predict import Change, changes_from, fork_config, nqm_predictor, plan, whatif

TINY = dict(model="seed-cnn", data="digits", model_args={"channels": 4, "hidden": 16}, steps=60, batch_size=64,
            threads=1, seed=1, lr=0.05, momentum=0.9, probe_every=10, probe_batch_size=128, hutchinson_samples=2,
            noise_microbatches=4)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    cfg = RunConfig(**TINY)
    run(cfg, root / run_id(cfg))
    return root / run_id(cfg)


def test_update_sq_and_method_switch_match_pytorch_sgd():
    # chains of the NQM stepped by torch.optim.SGD itself: HB for 30 steps, then NAG with a
    # lower momentum and lr. From x0 = 0 every Δθ is a zero-mean Gaussian, so the mean of
    # Δθ² over N chains has standard error √(2/N)·E[Δθ²] per mode; summed over modes it is at
    # most √(2/N)·Σ E[Δθ²]. 5 standard errors.
    lam, s2, N, T = np.array([0.4, 3.0]), np.array([1.0, 0.3]), 20000, 60
    lrs = np.r_[np.full(30, 0.3), np.full(30, 0.2)]
    moms = np.r_[np.full(30, 0.9), np.full(30, 0.5)]
    methods = ["hb"] * 30 + ["nag"] * 30
    pred = schedule_prediction(methods, lrs, moms, lam, s2)
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(N, 2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([x], lr=0.3, momentum=0.9)
    lam_t, sd = torch.tensor(lam), torch.tensor(np.sqrt(s2))
    u2 = np.empty(T)
    for t in range(T):
        g = opt.param_groups[0]
        g.update(lr=lrs[t], momentum=moms[t], nesterov=methods[t] == "nag")
        x.grad = lam_t * x.detach() + sd * torch.randn(N, 2, generator=gen, dtype=torch.float64)
        before = x.detach().clone()
        opt.step()
        u2[t] = ((x.detach() - before) ** 2).sum(1).mean().item()
    se = np.sqrt(2 / N) * pred["update_sq"]
    assert np.all(np.abs(u2 - pred["update_sq"]) < 5 * se)
    with pytest.raises(ValueError, match="method has 3 entries"):
        schedule_prediction(["hb"] * 3, lrs, 0.9, lam, s2)


def test_plan_and_fork_config():
    cfg = RunConfig(**{**TINY, "schedule": "step", "step_every": 40, "step_gamma": 0.1}).to_dict()
    p = plan(cfg, 20, Change("x", lr_factor=0.5, momentum=0.6, method="nag"), 60)
    np.testing.assert_allclose(p["lr"], np.r_[np.full(20, 0.05), np.full(20, 0.025), np.full(20, 0.0025)])
    assert list(p["momentum"][[19, 20]]) == [0.9, 0.6] and list(p["method"][[19, 20]]) == ["hb", "nag"]
    assert plan(cfg, 20, Change("gd", method="gd"), 60)["momentum"][20] == 0.0
    f = fork_config(cfg, "0123456789abcdef", 20, Change("x", lr_factor=2.0), 50)
    assert (f["lr"], f["fork_from"], f["steps"], f["checkpoint_every"]) == (0.1, "0123456789abcdef@20", 50, 0)
    assert fork_config({**cfg, "schedule": "cosine"}, "0123456789abcdef", 20, Change("x"), 50)["steps"] == 60
    labels = [c.label for c in changes_from([0.5], [0.1], [0.6], ["nag"])]
    assert labels == ["scheduled", "lr×0.5", "decay×0.1", "momentum=0.6", "method=nag"]
    with pytest.raises(ValueError, match="momentum=1.0 is outside the valid range"):
        Change("m", momentum=1.0)
    with pytest.raises(ValueError, match="method='adam' is unknown"):
        Change("m", method="adam")


def constant_model(trace, config, at, plans, windows):
    dims = ("change", "window", "layer")
    shape = (len(plans), len(windows), trace.sizes["layer"])
    return xr.Dataset({k: (dims, np.full(shape, 0.5)) for k in ("grad_corr", "grad_sq", "update_sq")},
                      coords={"layer": trace["layer"].values})


def test_a_predictor_plugs_in_and_a_model_without_change_is_persistence(tiny_run):
    trace = store.load_run(tiny_run)
    ds = whatif(trace, 40, changes_from([0.5]), window=10, predictor=constant_model)
    for v in ("grad_corr", "grad_norm", "update_ratio"):
        xr.testing.assert_allclose(ds[f"pred_{v}"], ds[f"persist_{v}"])
    fixed = functools.partial(nqm_predictor, curvature=None)  # the curvature held fixed: h/edge scales with the lr
    nqm = whatif(trace, 40, changes_from([0.5, 2.0]), window=10, predictor=fixed)
    assert nqm.pred_h_edge.sel(window=1).values.tolist() == pytest.approx(
        [nqm.pred_h_edge.values[0, 1] * f for f in (1, 0.5, 2)])
    ratio = nqm.model_update_sq.isel(window=1) / nqm.model_update_sq.isel(window=0)
    assert (ratio.isel(change=1) < 1).all() and (ratio.isel(change=2) > 1).all()  # smaller lr, smaller steps


def test_with_the_forecast_off_the_predictions_are_the_fixed_curvature_ones(tiny_run):
    trace = store.load_run(tiny_run)
    changes = changes_from([0.5, 2.0], [0.1], [0.6], ["nag"])
    fixed = whatif(trace, 40, changes, window=10, predictor=functools.partial(nqm_predictor, curvature=None))
    off = whatif(trace, 40, changes, window=10,
                 predictor=functools.partial(nqm_predictor,
                                             curvature=CurvatureForecast(cap=False, sharpening=False)))
    edge_cap = functools.partial(nqm_predictor, curvature=CurvatureForecast(level="edge"))
    on = whatif(trace, 40, changes_from([500.0]), window=10, predictor=edge_cap)  # h/edge ≈ 0.003 × 500
    # no cap, no sharpening: the fixed curvature (up to rounding)
    for v in ("pred_grad_corr", "pred_grad_norm", "pred_update_ratio"):
        xr.testing.assert_allclose(fixed[v], off[v], rtol=1e-12)
    lam = float(trace.sharpness_global.sel(probe_step=40))
    lr_edge = 0.05 / float(stability_edge("hb", 0.9))
    np.testing.assert_allclose(fixed.pred_h_edge.isel(change=0), lam * lr_edge)  # the probe's λ, held fixed
    assert float(on.persist_h_edge) * 500 > 1  # past the edge without the cap
    np.testing.assert_allclose(on.pred_h_edge.isel(change=1, window=slice(1, None)), 0.95)  # capped below it
    xr.testing.assert_identical(on.model_grad_sq.isel(window=0, change=0), fixed.model_grad_sq.isel(window=0, change=0))
    # the run-level cap: the run's own schedule, unchanged, keeps its curvature; lr x2 lowers it
    run_cap = whatif(trace, 40, changes, window=10,
                     predictor=functools.partial(nqm_predictor, curvature=CurvatureForecast(level="run")))
    for v in ("pred_grad_corr", "pred_grad_norm", "pred_update_ratio"):
        xr.testing.assert_allclose(fixed[v].isel(change=0), run_cap[v].isel(change=0), rtol=1e-9)
    assert not np.allclose(run_cap.pred_grad_norm.isel(change=2), fixed.pred_grad_norm.isel(change=2), rtol=1e-3)
    # the stochastic-edge cap on a trace without the batch sharpness: the edge cap only
    gated = whatif(trace, 40, changes, window=10,
                   predictor=functools.partial(nqm_predictor, curvature=CurvatureForecast(level="stochastic")))
    edge = whatif(trace, 40, changes, window=10, predictor=edge_cap)
    xr.testing.assert_allclose(gated.pred_grad_norm, edge.pred_grad_norm, rtol=1e-12)


def test_the_run_level_is_measured_with_the_lr_before_a_decay_due_at_the_change(tiny_run):
    # a decay ×0.1 due at step 40: the probes up to 40 were reached with the lr before it (0.05), so
    # h̄ = 0.05 λ̄/edge; a change ×20 on top of the decay trains at 0.1, and the run-level cap holds
    # h/edge there at h̄ (λ_max halved), not at a level measured with the decayed lr
    trace = store.load_run(tiny_run)
    config = {**trace.attrs["config"], "schedule": "step", "step_every": 40, "step_gamma": 0.1}
    out = whatif(trace, 40, changes_from([20.0]), window=10, config=config,
                 predictor=functools.partial(nqm_predictor, curvature=CurvatureForecast(level="run")))
    lam_bar = float(trace.sharpness_global.sel(probe_step=[20, 30, 40]).mean())  # the spectra's 3-probe mean
    h_bar = 0.05 * lam_bar / float(stability_edge("hb", 0.9))
    assert h_bar < 0.95
    assert float(out.pred_h_edge.sel(window=1).isel(change=1)) == pytest.approx(h_bar, rel=1e-12)
    assert float(out.pred_h_edge.sel(window=1).isel(change=0)) == pytest.approx(h_bar / 10, rel=1e-12)


def test_whatif_errors(tiny_run):
    trace = store.load_run(tiny_run)
    with pytest.raises(ValueError, match=r"at=70 is outside the valid range \[10, 60\]"):
        whatif(trace, 70, changes_from(), window=10)
    with pytest.raises(ValueError, match="changes is empty"):
        whatif(trace, 40, [], window=10)
    with pytest.raises(ValueError, match="--check forks need the run in a store root under a run id"):
        check(tiny_run.parent, 40, changes_from(), window=10)
    with pytest.raises(ValueError, match="no probe steps"):
        whatif(trace.isel(probe_step=slice(0, 0)), 40, changes_from(), window=10)


@pytest.mark.slow
def test_check_runs_the_forks_and_scores_them(tiny_run, capsys):
    ds = check(tiny_run, 30, changes_from([0.5], momenta=[0.5]), window=10, n_windows=2)
    forks = [d for d in tiny_run.parent.iterdir() if d != tiny_run and store.is_done(d)]
    assert len(forks) == 2 and (tiny_run / "checkpoints" / "step-00000030.pt").exists()
    fork = store.load_run(forks[0])
    base = store.load_run(tiny_run)
    np.testing.assert_array_equal(fork.loss.values[:30], base.loss.values[:30])
    own = np.sqrt((base.grad_norm.values[30:40] ** 2).mean(0))  # "scheduled": the run itself, window 1
    np.testing.assert_allclose(ds.meas_grad_norm.isel(change=0, window=1).values, own, rtol=1e-12)
    sc = ds.attrs["scores"]
    assert sc["model"]["n"] == sc["persistence"]["n"] == 3 * 2 * 7
    assert sc["persistence"]["norm_sign"] == 0.0 or np.isnan(sc["persistence"]["norm_sign"])  # it predicts no change
    assert scores(ds) == sc
    assert main(["whatif", str(tiny_run), "--at", "30", "--lr-factor", "0.5", "--window", "10", "--check"]) == 0
    out = capsys.readouterr().out
    assert "lr×0.5: steps 30-39" in out and "corr_spearman" in out


def test_cli_whatif_and_diagnose(tiny_run, capsys, tmp_path):
    assert main(["whatif", str(tiny_run), "--at", "40", "--decay", "0.1", "--window", "10", "--windows", "1"]) == 0
    out = capsys.readouterr().out
    assert "decay×0.1: steps 40-49; network top mode h/edge" in out
    assert main(["whatif", str(tiny_run), "--at", "40", "--decay", "0.1", "--window", "10", "--windows", "1",
                 "--base", "trend"]) == 0
    trend = capsys.readouterr().out
    assert "decay×0.1: steps 40-49" in trend and trend != out  # the unchanged run's trend moves the levels
    assert main(["whatif", str(tiny_run), "--at", "40", "--decay", "0.1", "--window", "10", "--windows", "1",
                 "--base", "escape"]) == 0
    assert "decay×0.1: steps 40-49; network top mode h/edge" in capsys.readouterr().out
    assert main(["whatif", str(tiny_run), "--at", "40", "--momentum", "1.5"]) == 2
    assert "momentum=1.5 is outside the valid range [0, 1)" in capsys.readouterr().err
    fig = tmp_path / "d.png"
    assert main(["diagnose", str(tiny_run), "--figure", str(fig), "--out", str(tmp_path / "d.txt")]) == 0
    out = capsys.readouterr().out
    assert "[ratio." in out and "[clip." in out and fig.exists()
    assert (tmp_path / "d.txt").read_text().strip() == out.strip()
