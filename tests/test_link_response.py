"""Tests of the link's response model (dynamics.nqm.response, experiments.linking.response), the
probe's curvature along the gradient (experiments.trace.probes.microbatch_curvature) and the link
of a network whose block curvature is negative (issue 16)."""

import numpy as np
import pytest
import torch

from dynamics.nqm.response import one_step_response, response_model, stationary_terms
from dynamics.quadratic import stability_edge
from dynamics.nqm.stationary import gradient_autocorrelation, mode_factors, update_coefficients

CASES = [("gd", 0.0), ("hb", 0.5), ("hb", 0.9), ("nag", 0.6), ("nag", 0.9)]


@pytest.mark.parametrize("method,beta", CASES)
def test_one_step_response_of_the_stationary_nqm_is_its_lag1_correlation(method, beta):
    # the one-step forecast averaged over the stationary state must be the NQM's closed form
    # (docs/theory.md §4) -- an identity, so to rounding
    h = np.linspace(0.01, 0.98, 25) * float(stability_edge(method, beta))
    lam = 3.0
    terms = stationary_terms(method, lam, h / lam, beta, 0.7)
    rho, sq, _ = one_step_response(method, h / lam, beta, **terms)
    np.testing.assert_allclose(rho, gradient_autocorrelation(method, h, beta), atol=1e-10)
    v, _ = mode_factors(method, h, beta)
    np.testing.assert_allclose(sq, 0.7 * (1 + v), rtol=1e-10)


@pytest.mark.parametrize("method,beta", CASES)
def test_response_model_without_drift_is_the_one_mode_nqm(method, beta):
    # inputs of one stationary NQM mode (no drift): the model must be that mode's NQM
    h = np.linspace(0.02, 0.9, 12) * float(stability_edge(method, beta))
    lam, sigma2 = 2.0, 0.3
    t = stationary_terms(method, lam, h / lam, beta, sigma2)
    out = response_model(method, h / lam, beta, t["signal"], t["noise"], t["grad_curv"],
                         lam * t["signal"], t["buffer_curv"])
    np.testing.assert_allclose(out["h_noise"], h, rtol=1e-10)
    np.testing.assert_allclose(out["drift"], 0.0, atol=1e-10 * sigma2)
    np.testing.assert_allclose(out["corr"], gradient_autocorrelation(method, h, beta), atol=1e-10)


def test_response_model_undefined_points_are_nan_not_errors():
    out = response_model("hb", 0.1, 0.9, np.array([1.0, 1.0, np.nan, 1.0]), np.array([1.0, 0.0, 1.0, 1.0]),
                         np.array([-5.0, 1.0, 1.0, 1.0]), np.array([0.0, 0.0, 0.0, 0.0]),
                         np.array([0.0, 0.0, 0.0, np.nan]))
    # negative curvature along the noise is the flat-mode limit (defined); zero noise, a missing
    # input: undefined
    assert np.isfinite(out["corr"][0]) and np.isnan(out["corr"][1:]).all()


def _simulate_drift_and_edge_mode(method, beta, h1, sigma1, c, chains=4000, steps=600, burn=300, seed=0):
    """A 2-d quadratic layer: coordinate 0 has curvature λ1 (h1 = lr·λ1) and noise σ1; coordinate 1
    is flat with a constant gradient c (a persistent drift), no noise. Returns per-step gradients
    after burn-in, (steps-burn, chains, 2), and lr, λ1."""
    rng = np.random.default_rng(seed)
    lam1, lr = 1.0, h1
    cg, cb, bb = (float(np.asarray(v)) for v in update_coefficients(method, beta))
    x = np.zeros((chains, 2))
    buf = np.zeros((chains, 2))
    out = []
    for t in range(steps):
        g = np.stack([lam1 * x[:, 0] + sigma1 * rng.standard_normal(chains), np.full(chains, c)], axis=1)
        step = cg * g + cb * buf
        buf = bb * buf + g
        x = x - lr * step
        if t >= burn:
            out.append(g)
    return np.array(out), lr, lam1


@pytest.mark.parametrize("method,beta", [("gd", 0.0), ("hb", 0.9), ("nag", 0.9)])
def test_drift_and_edge_mode_parts_against_simulation(method, beta):
    # a persistent drift (flat direction, gradient c) beside a noise-driven mode at 0.9 of the
    # edge: each part's energy and lag-1 correlation, and the total, against Monte-Carlo
    h1 = 0.9 * float(stability_edge(method, beta))
    sigma1 = 1.0
    t = stationary_terms(method, 1.0, h1, beta, sigma1**2)
    c = float(np.sqrt(t["signal"] + sigma1**2))  # the drift carries half the gradient's energy
    g, lr, lam1 = _simulate_drift_and_edge_mode(method, beta, h1, sigma1, c)
    S = c**2 + t["signal"]
    out = response_model(method, lr, beta, S, sigma1**2, t["grad_curv"], lam1 * t["signal"], t["buffer_curv"])
    # parts: fluctuation energy E(λ1 x)² = E g0² − σ1², drift energy c², noise mode lag-1
    g0 = g[..., 0]
    per_chain_sq = (g0**2).mean(0)  # chains are independent: SE from their spread
    fluct = per_chain_sq - sigma1**2
    assert abs(fluct.mean() - float(out["fluct"])) < 4 * fluct.std() / np.sqrt(fluct.size)
    assert float(out["drift"]) == pytest.approx(c**2, rel=1e-9)
    lag0 = (g0[1:] * g0[:-1]).mean(0)
    rho0 = lag0.mean() / per_chain_sq.mean()
    se0 = lag0.std() / np.sqrt(lag0.size) / per_chain_sq.mean()
    assert abs(rho0 - float(out["noise_corr"])) < 4 * se0 + 0.01  # + the ratio estimator's O(1/n) bias
    assert float(out["drift_corr"]) == pytest.approx(1.0)
    # the total: Σ E[g_t·g_{t-1}] / Σ E‖g‖² over both coordinates
    lag = (g[1:] * g[:-1]).sum(-1).mean(0)
    sq = (g**2).sum(-1).mean(0)
    rho = lag.mean() / sq.mean()
    se = lag.std() / np.sqrt(lag.size) / sq.mean()
    assert abs(rho - float(out["corr"])) < 4 * se + 0.01
    assert abs(sq.mean() - float(out["grad_sq"])) < 4 * sq.std() / np.sqrt(sq.size)
    # and the drift matters: without it the prediction would be off by many SE
    no_drift = response_model(method, lr, beta, t["signal"], sigma1**2, t["grad_curv"], lam1 * t["signal"],
                              t["buffer_curv"])
    assert abs(rho - float(no_drift["corr"])) > 10 * se


# ------------------------------------------------------------------------- probe: curvature

def _mlp_and_batch(seed=0, n=24):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x = torch.randn(n, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (n,))
    return model, (x, y)


def _loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_probe_makes_one_pass_per_microbatch_for_moments_and_curvature():
    """probe(curvature=True) runs each micro-batch forward once (not once for the moments and
    again for the curvature) and gives the values of the two estimators called apart."""
    from experiments.trace.probes import ProbeState, microbatch_curvature, microbatch_moments, probe

    model, batch = _mlp_and_batch()
    params = list(model.parameters())
    blocks = [[0, 1], [2, 3]]
    M = 4
    buffer = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    calls = []

    def counting_loss(model, batch):
        calls.append(len(batch[1]))
        return _loss(model, batch)

    res = probe(model, params, blocks, counting_loss, batch, state=ProbeState(0), iters=0,
                hutchinson_samples=0, microbatches=M, curvature=True, buffer=buffer)
    assert calls == [len(batch[1]) // M] * M
    noise, signal = microbatch_moments(model, params, blocks, _loss, batch, M)
    curv = microbatch_curvature(model, params, blocks, _loss, batch, M, buffer=buffer)
    np.testing.assert_allclose(res.grad_noise, noise.numpy(), rtol=1e-12)
    np.testing.assert_allclose(res.grad_signal, signal.numpy(), rtol=1e-12)
    for key in ("grad_curv", "grad_curv_mean", "buffer_curv", "batch_sharpness"):
        np.testing.assert_allclose(getattr(res, key), curv[key].numpy(), rtol=1e-12, err_msg=key)
    np.testing.assert_allclose(res.batch_sharpness_global, float(curv["batch_sharpness_global"]), rtol=1e-12)
    # passes without graphs, or graphs already used, are refused (not silently recomputed)
    from experiments.trace.probes import microbatch_gradients
    with pytest.raises(ValueError, match="micro holds no graphs"):
        microbatch_curvature(model, params, blocks, _loss, batch, M,
                             micro=microbatch_gradients(model, params, _loss, batch, M))
    micro = microbatch_gradients(model, params, _loss, batch, M, create_graph=True)
    microbatch_curvature(model, params, blocks, _loss, batch, M, micro=micro)
    with pytest.raises(ValueError, match="0 unused graphs of 4"):
        microbatch_curvature(model, params, blocks, _loss, batch, M, micro=micro)


def test_microbatch_curvature_equals_dense_minibatch_hessians():
    from experiments.trace.probes import microbatch_curvature, split_batch

    model, batch = _mlp_and_batch()
    params = list(model.parameters())
    blocks = [[0, 1], [2, 3]]
    M = 4
    buffer = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    got = microbatch_curvature(model, params, blocks, _loss, batch, M, noise_batch_size=12, buffer=buffer)
    # brute force: dense Hessian and gradient of each micro-batch
    micro, b, B = split_batch(batch, M)
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def f(flat, mb):
        ws = [w.reshape(s) for w, s in zip(flat.split(sizes), shapes)]
        out = torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], ws)), (mb[0],))
        return torch.nn.functional.cross_entropy(out, mb[1])

    Hs = [torch.autograd.functional.hessian(lambda w: f(w, mb), flat0) for mb in micro]
    gs = [torch.autograd.functional.jacobian(lambda w: f(w, mb), flat0) for mb in micro]
    idx = np.cumsum([0] + sizes)
    cols = [torch.cat([torch.arange(idx[i], idx[i + 1]) for i in blk]) for blk in blocks]
    q = np.zeros(2)
    a = np.zeros(2)
    c = np.zeros(2)
    bs = np.zeros(2)
    bsg = 0.0
    for k in range(M):
        g1, g2 = gs[(k + 1) % M], gs[(k + 2) % M]
        h1, hk, hb = Hs[k] @ g1, Hs[k] @ gs[k], Hs[k] @ buffer
        for j, col in enumerate(cols):
            q[j] += float(g1[col] @ h1[col]) / M
            a[j] += float(g2[col] @ h1[col]) / M
            c[j] += float(g1[col] @ hb[col]) / M
            bs[j] += float(gs[k][col] @ hk[col] / (gs[k][col] @ gs[k][col])) / M
        bsg += float(gs[k] @ hk / (gs[k] @ gs[k])) / M
    np.testing.assert_allclose(got["grad_curv_mean"].numpy(), a, rtol=1e-10)
    np.testing.assert_allclose(got["grad_curv"].numpy(), a + (b / 12) * (q - a), rtol=1e-10)
    np.testing.assert_allclose(got["buffer_curv"].numpy(), c, rtol=1e-10)
    np.testing.assert_allclose(got["batch_sharpness"].numpy(), bs, rtol=1e-10)
    assert float(got["batch_sharpness_global"]) == pytest.approx(bsg, rel=1e-10)


def test_grad_curv_is_unbiased_for_the_population_curvature_along_the_gradient():
    # a quadratic loss with per-example Hessians: E_B[g_Bᵀ H g_B] over fresh micro-batches is the
    # population value mᵀHm + tr(HΣ)/B; the estimator averaged over 300 draws hits it within 4 SE,
    # while the same-batch batch sharpness numerator (g_Bᵀ H_B g_B) is biased up
    from experiments.trace.probes import microbatch_curvature

    torch.manual_seed(1)
    d = 3
    lin = torch.nn.Linear(d, 1, bias=False).double()
    params = list(lin.parameters())

    def loss(model, batch):
        return 0.5 * ((model(batch[0]).squeeze(-1) - batch[1]) ** 2).mean()

    scale = torch.tensor([2.0, 1.0, 0.3], dtype=torch.float64)
    w_star = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    b = 8
    est = []
    for r in range(300):
        x = torch.randn(4 * b, d, dtype=torch.float64) * scale
        y = x @ w_star + 0.5 * torch.randn(4 * b, dtype=torch.float64)
        est.append(float(microbatch_curvature(lin, params, [[0]], loss, (x, y), 4, noise_batch_size=b)["grad_curv"][0]))
    # population value by a very large sample: per-example g_i = x_i(x_iᵀw − y_i), H = E xxᵀ
    big = 400000
    x = torch.randn(big, d, dtype=torch.float64) * scale
    y = x @ w_star + 0.5 * torch.randn(big, dtype=torch.float64)
    w = params[0].detach().reshape(-1)
    gi = x * (x @ w - y)[:, None]
    H = torch.diag(scale**2)
    m = gi.mean(0)
    Sigma = torch.cov(gi.T)
    target = float(m @ H @ m + torch.trace(H @ Sigma) / b)
    est = np.array(est)
    assert abs(est.mean() - target) < 4 * est.std() / np.sqrt(est.size) + 0.01 * target


# ------------------------------------------------------------------------- link: negative curvature

def test_batchnorm_network_with_negative_block_curvature_links(tmp_path):
    # a ResNet (BatchNorm) trace whose block top eigenvalues are <= 0 at step 0 (as measured on
    # ResNet sweeps: -9e-5 ... -5e-6): such points are 'undefined', the rest is linked
    from experiments import store
    from experiments.linking.core import link_trace
    from experiments.runs import RunConfig, run

    config = RunConfig(model="resnet", data="mnist1d", data_args={"n_train": 512}, model_args={"width": 4},
                       opt="hb", lr=0.05, momentum=0.9, batch_size=16, steps=40, probe_every=20,
                       noise_microbatches=4, probe_curvature=True, threads=1)
    run(config, tmp_path / "r")
    trace = store.load_run(tmp_path / "r")
    layer = str(trace["layer"].values[1])
    sharp = trace["sharpness"].copy()
    sharp.loc[{"probe_step": 0, "layer": layer}] = -9e-5  # the measured case, forced so it is always there
    sharp.loc[{"probe_step": 0, "layer": str(trace["layer"].values[2])}] = 0.0
    trace["sharpness"] = sharp
    trace["sharpness_global"] = trace["sharpness_global"].where(trace["probe_step"] > 0, -1e-6)
    for prediction in ("response", "schedule"):
        ds = link_trace(trace, prediction=prediction)
        assert ds["regime"].sel(probe_step=0, layer=layer).item() == "undefined"
        later = ds["pred_grad_corr"].sel(probe_step=ds["probe_step"] > 0)
        assert np.isfinite(later).mean() > 0.9  # the rest is linked
    assert np.isfinite(ds["base_persist_corr"].sel(probe_step=20)).all()
    assert np.isnan(ds["base_one_mode_corr"].sel(probe_step=0)).all()  # λ_max <= 0: undefined


def test_probe_curvature_keeps_existing_run_ids_and_needs_three_microbatches():
    from experiments.runs.config import RunConfig, canonical_config, run_id

    off, on = RunConfig(), RunConfig(probe_curvature=True)
    assert "probe_curvature" not in canonical_config(off)  # ids of runs made before the field: unchanged
    assert canonical_config(on)["probe_curvature"] is True and run_id(on) != run_id(off)
    with pytest.raises(ValueError, match="noise_microbatches=2"):
        RunConfig(probe_curvature=True, noise_microbatches=2)


def test_persistence_forecast_halves_independent_errors_and_falls_back_to_the_theory():
    """Bates & Granger: two unbiased forecasts with independent errors of variance σ² combine with
    weights ½ to error variance σ²/2. With 20,000 draws the sample variance's relative standard
    error is √(2/20000) = 1 %, so the ratio is checked to ±5 %. The default forecast reads the
    measured window before p: measured[p − 1] = b[p] here."""
    import xarray as xr

    from experiments.linking.response import forecast_link

    rng = np.random.default_rng(0)
    truth = rng.uniform(-0.8, 0.8, 20000)
    a, b = truth + rng.normal(0, 0.1, truth.size), truth + rng.normal(0, 0.1, truth.size)
    da = lambda x: xr.DataArray(x, dims="probe_step")  # noqa: E731
    before = lambda x: np.append(x[1:], np.nan)  # noqa: E731  (the window before p holds x[p])
    corr, sq = forecast_link("persistence", da(a), da(np.exp(a)), da(before(b)), da(np.exp(before(b))))
    ratio = np.var(corr.values[1:] - truth[1:]) / np.var(a[1:] - truth[1:])
    assert abs(ratio - 0.5) < 0.025
    np.testing.assert_allclose(np.log(sq.values[1:]), 0.5 * (a + b)[1:], rtol=0, atol=1e-12)  # geometric mean
    b[:10] = np.nan  # no previous window (and none at p = 0): the theory alone
    corr, sq = forecast_link("persistence", da(a), da(np.exp(a)), da(before(b)), da(np.exp(before(b))))
    np.testing.assert_array_equal(corr.values[:10], a[:10])
    np.testing.assert_allclose(sq.values[:10], np.exp(a[:10]), rtol=1e-15, atol=0)


@pytest.fixture(scope="module")
def quadratic_run_with_curvature(tmp_path_factory):
    """A linear-regression run (an exact quadratic) with the response model's probe inputs."""
    from experiments import store
    from experiments.runs import RunConfig, run

    out = tmp_path_factory.mktemp("quad") / "r"
    run(RunConfig(model="linear", data="linreg", opt="hb", lr=0.5, momentum=0.5, batch_size=8, steps=120,
                  probe_every=20, noise_microbatches=4, probe_curvature=True, threads=1), out)
    return store.load_run(out)


def test_link_default_forecast_is_theory_combined_with_persistence(quadratic_run_with_curvature):
    from experiments.linking.core import link_trace

    ds = link_trace(quadratic_run_with_curvature)
    theory, pers = ds["theory_grad_corr"], ds["base_persist_corr"]
    later = np.isfinite(pers)
    assert later.sum() > 0 and (~later).sum() > 0
    np.testing.assert_allclose(ds["pred_grad_corr"].where(later), (0.5 * (theory + pers)).where(later))
    np.testing.assert_array_equal(ds["pred_grad_corr"].where(~later), theory.where(~later))
    alone = link_trace(quadratic_run_with_curvature, combine="none")
    np.testing.assert_array_equal(alone["pred_grad_corr"], theory)
    with pytest.raises(ValueError, match="combine='mean'"):
        link_trace(quadratic_run_with_curvature, combine="mean")


def test_link_carries_the_window_halves_and_the_protocol_reports_the_ceiling(quadratic_run_with_curvature):
    """The halves cover the full window's step pairs: the full estimate is λ₁·half₁ + λ₂·half₂ with
    λ_k = √(S_k P_k / (S P)) ≥ 0 and λ₁ + λ₂ ≤ 1 (Cauchy–Schwarz; S, P the sums of ‖g_t‖², ‖g_{t−1}‖²),
    so it lies in the hull of 0 and the two halves."""
    from experiments.linking.core import link_trace
    from experiments.linking.report import format_protocol, protocol_scores

    ds = link_trace(quadratic_run_with_curvature)
    a, b, full = (ds[k].values for k in ("meas_half1_grad_corr", "meas_half2_grad_corr", "meas_grad_corr"))
    ok = np.isfinite(a) & np.isfinite(b)
    assert ok.sum() > 0
    lo, hi = np.minimum(np.minimum(a, b), 0)[ok], np.maximum(np.maximum(a, b), 0)[ok]
    assert np.all(full[ok] >= lo - 1e-12) and np.all(full[ok] <= hi + 1e-12)
    sc = protocol_scores(ds)
    assert set(sc["ceiling"]) == {"n", "split_half", "reliability", "ceiling"} and sc["ceiling"]["n"] <= sc["n"]
    assert set(sc["ceiling_regimes"]) == {"h/edge<0.05", "0.05-0.5", ">=0.5"}
    assert set(sc["ceiling_layer_ranking"]) == {"probes", "split_half", "reliability", "ceiling"}
    assert set(sc["ceiling_alternate"]) == {"n", "split_half", "reliability", "ceiling"}
    alt = np.stack([ds["meas_alt1_grad_corr"].values, ds["meas_alt2_grad_corr"].values])
    ok = np.isfinite(alt).all(0)
    assert np.all(full[ok] >= np.minimum(alt.min(0), 0)[ok] - 1e-12) and np.all(full[ok] <= np.maximum(alt.max(0), 0)[ok] + 1e-12)
    assert "noise ceiling" in format_protocol(sc)


def _series(values):
    import xarray as xr

    values = np.asarray(values, dtype=float)
    return xr.DataArray(values, dims=("probe_step", "layer"),
                        coords={"probe_step": 25 * np.arange(values.shape[0]), "layer": [f"l{i}" for i in range(values.shape[1])]})


def test_residual_and_change_forecasts_undo_a_constant_per_layer_offset_exactly():
    """A theory off by a constant per layer, the truth stepping down (an lr decay persistence misses):
    "residual" and "change" recover the measured window exactly from the second probe on; the norm
    (a constant factor per layer) likewise in log space; the first probe is the theory's."""
    from experiments.linking.response import forecast, forecast_link

    p = np.arange(12)[:, None]
    truth = np.where(p < 6, 0.4, -0.3) + 0.05 * np.sin(p + np.arange(4))  # (probe, layer)
    offset = np.array([0.2, -0.1, 0.05, 0.3])
    theory, meas = _series(truth + offset), _series(truth)
    for mode in ("residual", "change"):
        got = forecast(mode, theory, meas)
        np.testing.assert_allclose(got.values[1:], truth[1:], atol=1e-12)
        np.testing.assert_array_equal(got.values[0], theory.values[0])
        corr, sq = forecast_link(mode, theory, np.exp(theory), meas, np.exp(meas))
        np.testing.assert_allclose(np.log(sq.values[1:]), truth[1:], atol=1e-12)
    plain = forecast("persistence", theory, meas)  # ½(offset) + the decay's step at probe 6 remain
    assert np.abs(plain.values[1:] - truth[1:]).max() > 0.3


def test_two_window_persistence_halves_the_persistence_noise_and_falls_back():
    """A constant truth measured with independent noise σ per window and a perfect theory: the
    error of ½(T + ½(M₁ + M₂)) has variance σ²/8, that of ½(T + M₁) σ²/4 (20,000 layers: the
    variance ratio's standard error is ~1.4 %, checked to ±7 %)."""
    from experiments.linking.response import forecast

    rng = np.random.default_rng(1)
    truth = np.full((3, 20000), 0.3)
    theory, meas = _series(truth), _series(truth + rng.normal(0, 0.1, truth.shape))
    two, one = forecast("persistence2", theory, meas), forecast("persistence", theory, meas)
    ratio = np.var(two.values[2] - 0.3) / np.var(one.values[2] - 0.3)
    assert abs(ratio - 0.5) < 0.035
    np.testing.assert_array_equal(two.values[1], one.values[1])  # one window before p: persistence's
    np.testing.assert_array_equal(two.values[0], theory.values[0])
    with pytest.raises(ValueError, match="combine='ewma'"):
        forecast("ewma", theory, meas)


def test_link_trace_alternative_combines_use_the_measured_past_only(quadratic_run_with_curvature):
    from experiments.linking.core import link_trace
    from experiments.linking.response import forecast

    base = link_trace(quadratic_run_with_curvature, combine="none")
    for mode in ("residual", "change", "persistence2"):
        ds = link_trace(quadratic_run_with_curvature, combine=mode)
        want = forecast(mode, base["theory_grad_corr"], base["meas_grad_corr"]).clip(-1, 1)
        np.testing.assert_allclose(ds["pred_grad_corr"].values, want.values)
        np.testing.assert_array_equal(ds["theory_grad_corr"].values, base["theory_grad_corr"].values)
        changed = base["meas_grad_corr"].copy()
        changed[-1] = changed[-1] + 0.5  # the window being forecast does not enter its forecast
        np.testing.assert_array_equal(forecast(mode, base["theory_grad_corr"], changed).values[-1], want.values[-1])


@pytest.mark.parametrize("method,beta", [("gd", 0.0), ("hb", 0.9), ("nag", 0.7)])
def test_top_direction_candidate_on_the_stationary_top_mode(method, beta):
    """The candidate with the top direction's own dynamics (:func:`top_direction_response`): on one
    stationary NQM mode whose mean gradient lies all along the top direction, "exact" is the NQM's
    ρ_g(h) (to rounding); with no signal along the top direction it is :func:`response_model`;
    "mode" double-counts the top displacement's correlation (documented), so it differs."""
    from dynamics.nqm.response import response_model, stationary_terms, top_direction_response
    from dynamics.nqm.stationary import mode_factors

    edge = stability_edge(method, beta)
    h = np.array([0.05, 0.3, 0.7, 0.9]) * edge
    lam, lr = 2.0, h / 2.0
    t = stationary_terms(method, lam, lr, beta, 0.5)
    args = (method, lr, beta, t["signal"], t["noise"], t["grad_curv"], lam * t["signal"], t["buffer_curv"])
    _, rho_g = mode_factors(method, h, beta)
    np.testing.assert_allclose(top_direction_response(*args, t["signal"], lam)["corr"], rho_g, atol=1e-9)
    np.testing.assert_allclose(top_direction_response(*args, 0 * t["signal"], lam)["corr"],
                               response_model(*args)["corr"], atol=1e-9)
    assert np.max(np.abs(top_direction_response(*args, t["signal"], lam, noise_term="mode")["corr"] - rho_g)) > 0.01
    with pytest.raises(ValueError, match="noise_term"):
        top_direction_response(*args, t["signal"], lam, noise_term="both")
