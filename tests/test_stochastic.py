"""Noisy quadratic model: closed forms against the Lyapunov route, Monte-Carlo, sign-change
boundaries, the schedule recursion, the layer model and the DeepOBS problem."""

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given
from hypothesis import strategies as st_

from dynamics.nqm import stationary as st
from dynamics.methods import get_method
from dynamics.nqm.layer import LayerSpectrum, layer_prediction
from dynamics.nqm.schedule import schedule_prediction
from dynamics.schedules import lr_schedule
from dynamics.nqm.montecarlo import monte_carlo
from dynamics.nqm.problems import quadratic_deep
from dynamics.quadratic import char_roots, simulate, spectral_radius, stability_edge

METHODS = ("gd", "hb", "nag")


def edge(method, beta):
    return float(stability_edge(method, 0.0 if method == "gd" else beta))


# ----------------------------------------------------------------- closed forms == Lyapunov
@given(method=st_.sampled_from(METHODS), beta=st_.floats(0.0, 0.99),
       frac=st_.floats(1e-3, 0.999), lam=st_.floats(0.1, 10.0), sigma2=st_.floats(0.1, 5.0))
def test_closed_forms_equal_lyapunov(method, beta, frac, lam, sigma2):
    # Both routes are double-precision evaluations of the same quantity; the Lyapunov
    # system has condition number ~ 1/(1 - rho(A)^2) <= ~1e4 on this domain, so they agree
    # to ~1e-12 relative; 1e-10 leaves a margin (measured worst ~4e-13).
    h = frac * edge(method, beta)
    lr = h / lam
    ref = st.lyapunov_gradient_stats(method, [[lam]], [[sigma2]], lr, beta, max_lag=3)
    got = st.stationary_gradient_moments(method, lam, lr, beta, sigma2)
    scale = ref.grad_sq
    assert got.grad_sq == pytest.approx(ref.grad_sq, rel=1e-10)
    assert got.full_grad_sq == pytest.approx(ref.full_grad_sq, rel=1e-10)
    assert abs(got.lag1 - ref.lags[1]) < 1e-10 * scale
    var = st.stationary_iterate_variance(method, lam, lr, beta, sigma2)
    assert var == pytest.approx(ref.iterate_cov[0, 0], rel=1e-10)
    for lag in (1, 2, 3):
        rho = st.gradient_autocorrelation(method, h, beta, lag=lag)
        assert abs(rho - ref.lags[lag] / scale) < 1e-10
    batched = st.gradient_autocovariance(method, lam, lr, beta, sigma2, [0, 1, 2, 3])
    np.testing.assert_allclose(batched, ref.lags, rtol=0, atol=1e-10 * scale)


def test_closed_forms_broadcast_over_a_grid():
    beta = np.array([0.0, 0.5, 0.9])
    h = np.linspace(0.01, 0.99, 50)[:, None] * stability_edge("hb", beta)
    out = st.stationary_gradient_moments("hb", 2.0, h / 2.0, beta, 1.5)
    assert out.grad_sq.shape == out.lag1.shape == (50, 3)
    one = st.stationary_gradient_moments("hb", 2.0, h[7, 2] / 2.0, beta[2], 1.5)
    assert out.lag1[7, 2] == pytest.approx(one.lag1, rel=1e-14)


def test_general_hessian_commuting_noise_splits_into_modes():
    # For H = V diag(lam) V^T and Sigma = V diag(s2) V^T the 2n-dimensional Lyapunov
    # solution equals the sum of the per-mode closed forms (same tolerance argument).
    rng = np.random.default_rng(1)
    lam = rng.uniform(0.2, 5.0, 6)
    s2 = rng.uniform(0.1, 2.0, 6)
    V = scipy.stats.special_ortho_group.rvs(6, random_state=rng)
    for method in METHODS:
        lr = 0.9 * edge(method, 0.8) / lam.max()
        ref = st.lyapunov_gradient_stats(method, (V * lam) @ V.T, (V * s2) @ V.T, lr, 0.8)
        per = st.stationary_gradient_moments(method, lam, lr, 0.8, s2)
        assert per.grad_sq.sum() == pytest.approx(ref.grad_sq, rel=1e-10)
        assert per.lag1.sum() == pytest.approx(ref.lags[1], rel=1e-9, abs=1e-10)


def test_general_lyapunov_matches_monte_carlo_with_correlated_noise():
    # Non-commuting H and Sigma (no per-mode split): simulate the n-dim model with the
    # Method's own update, chains started from the stationary law (Gaussian with the
    # Lyapunov covariance), and compare E|g|^2 and E g_t.g_{t+1}. The chains are i.i.d.,
    # so the standard error of the grand mean is (std of per-chain means)/sqrt(chains):
    # a CLT over 2000 chains; 5 standard errors -> false-failure odds ~6e-7 (fixed seed).
    rng = np.random.default_rng(7)
    n, chains, steps = 3, 2000, 300
    H = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 0.5]])
    M = rng.normal(size=(n, n))
    S = M @ M.T / n
    for method in ("hb", "nag"):
        lr, beta = 0.6 * edge(method, 0.7) / np.linalg.eigvalsh(H).max(), 0.7
        ref = st.lyapunov_gradient_stats(method, H, S, lr, beta)
        P = st.lyapunov_covariance(method, H, S, lr, beta)
        w, U = np.linalg.eigh(P)
        s = rng.normal(size=(chains, 2 * n)) @ (U * np.sqrt(np.clip(w, 0, None))).T
        x, buf = s[:, :n], s[:, n:]
        L = np.linalg.cholesky(S)
        sums, lags, prev = np.zeros(chains), np.zeros(chains), None
        m = get_method(method)
        for _ in range(steps):
            g = x @ H + rng.normal(size=(chains, n)) @ L.T
            sums += (g * g).sum(1)
            if prev is not None:
                lags += (g * prev).sum(1)
            step, buf = m.update(g, buf, lr, beta)
            x, prev = x + step, g
        for est, exact in ((sums / steps, ref.grad_sq), (lags / (steps - 1), ref.lags[1])):
            se = est.std(ddof=1) / np.sqrt(chains)
            assert abs(est.mean() - exact) < 5 * se, (method, est.mean(), exact, se)


@given(method=st_.sampled_from(("hb", "nag")), beta=st_.floats(0.0, 0.99),
       h=st_.floats(0.0, 5.0))
def test_state_space_has_the_characteristic_roots_of_the_linear_theory(method, beta, h):
    # (x_k, b_{k-1}) and dynamics.quadratic's (x_k, x_{k-1}) are similar states: same
    # eigenvalues. Root-finding of a 2x2 matrix is accurate to ~eps/|z1 - z2| near a double
    # root, so compare the symmetric functions (trace, determinant) instead, to 1e-12.
    A, _ = st.state_space(method, 1.0, h, beta)
    z = char_roots(method, h, beta)
    assert np.trace(A) == pytest.approx(np.sum(z).real, abs=1e-12)
    assert np.linalg.det(A) == pytest.approx(np.prod(z).real, abs=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_noise_free_simulator_and_recursion_equal_the_deterministic_iterate(method):
    # sigma2 = 0: every chain is the deterministic iterate of dynamics.quadratic.simulate,
    # and the second-moment recursion is its square (rounding only: rtol 1e-10).
    lam = np.array([0.3, 1.0, 2.5])
    sim = monte_carlo(method, lam, 0.6, 0.7, 0.0, steps=40, chains=2, start="given", x0=1.5,
                      average="chains")
    traj = simulate(method, lam, 0.6, 0.7, 1.5, 39)
    np.testing.assert_allclose(sim["grad_sq"], traj[1] ** 2, rtol=1e-10)
    lrs = lr_schedule("linear", 0.6, 40)
    sim = monte_carlo(method, lam, lrs, 0.7, 0.0, steps=40, chains=2, start="given", x0=1.5,
                      average="chains")
    pred = schedule_prediction(method, lrs, 0.7, lam, 0.0, x0_var=1.5**2, per_mode=True)
    np.testing.assert_allclose(pred["mode_grad_sq"], sim["grad_sq"], rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(pred["mode_lag1"][1:], sim["lag1"][1:], rtol=1e-10, atol=1e-300)


# ----------------------------------------------------------------- closed forms == Monte-Carlo
def _standard_errors(method, lam, lr, beta, s2, chains, steps):
    """Exact standard errors of the Monte-Carlo means for a stationary Gaussian chain.

    g_t is a stationary zero-mean Gaussian process with autocovariance gamma_k, so by
    Isserlis Cov(g_t^2, g_{t+k}^2) = 2 gamma_k^2 and
    Cov(g_t g_{t+1}, g_{t+k} g_{t+k+1}) = gamma_k^2 + gamma_{k+1} gamma_{k-1}. The mean of M
    correlated samples with covariances c_k has variance [M c_0 + 2 sum_k (M-k) c_k] / M^2
    (the effective sample size M c_0 / (c_0 + 2 sum_k (1-k/M) c_k)); independent chains
    divide it by their number.
    """
    gamma = st.gradient_autocovariance(method, lam, lr, beta, s2, np.arange(steps + 1))

    def var_of_mean(c, M):
        k = np.arange(1, M)
        return (M * c[..., 0] + 2 * np.sum((M - k) * c[..., 1:M], axis=-1)) / M**2

    c_sq = 2 * gamma**2
    g_next = gamma[..., 1:]
    g_prev = np.concatenate([gamma[..., 1:2], gamma[..., :-2]], axis=-1)
    c_lag = gamma[..., :-1] ** 2 + g_next * g_prev
    return (np.sqrt(var_of_mean(c_sq, steps) / chains),
            np.sqrt(var_of_mean(c_lag, steps - 1) / chains))


@pytest.mark.parametrize("method", METHODS)
def test_closed_forms_equal_monte_carlo(method):
    beta = np.array([0.5, 0.5, 0.5, 0.9, 0.9, 0.9, 0.9])
    frac = np.array([0.1, 0.6, 0.95, 0.05, 0.3, 0.7, 0.95])
    lam = np.linspace(0.5, 3.0, beta.size)
    h = frac * stability_edge(method, 0.0 if method == "gd" else beta)
    lr = 1.0  # one shared lr as in a layer: h is set through lam
    lam = h / lr
    s2 = np.linspace(0.5, 2.0, beta.size)
    chains, steps = 1000, 800
    sim = monte_carlo(method, lam, lr, beta, s2, steps=steps, chains=chains, seed=11)
    exact = st.stationary_gradient_moments(method, lam, lr, beta, s2)
    se_sq, se_lag = _standard_errors(method, lam, lr, beta, s2, chains, steps)
    # 5 standard errors: ~6e-7 false-failure odds per comparison, 14 comparisons.
    assert np.all(np.abs(sim["grad_sq"] - exact.grad_sq) < 5 * se_sq)
    assert np.all(np.abs(sim["lag1"] - exact.lag1) < 5 * se_lag)
    # The predicted errors use the whole autocovariance function (all lags up to `steps`),
    # so they are themselves checked against the spread of the i.i.d. per-chain means; the
    # sample std of 1000 near-Gaussian values has relative error ~1/sqrt(2000) = 2.2%, so a
    # +-20% window is > 8 of those.
    for key, se in (("grad_sq", se_sq), ("lag1", se_lag)):
        emp = sim["chain_means"][key].std(axis=0, ddof=1) / np.sqrt(chains)
        np.testing.assert_array_less(np.abs(emp / se - 1), 0.2)


# ----------------------------------------------------------------- sign changes of rho_g
def _lag1_by_state_space(method, h, beta):
    gam = st.gradient_autocovariance(method, 1.0, h, beta, 1.0, [0, 1])
    return gam[..., 1] / gam[..., 0]


@pytest.mark.parametrize("method,threshold", [("hb", 0.5), ("nag", 1 / np.sqrt(2))])
def test_lag1_sign_change_boundaries(method, threshold):
    # HB: rho_g > 0 iff beta > 1/2 and h < (1+b)(2b-1)/b (THEORY §4). NAG: the numerator of
    # its rho_g is 1 + b h - 2b^2 + 2b^2 h, zero at h* = (2b^2 - 1)/(b(1 + 2b)); the
    # denominator 1 + b h - b^2 + 2b^2 h > 0, so rho_g > 0 iff b > 1/sqrt(2) and h < h*.
    # Checked on the independent state-space route, 1e-6 relative either side of h*.
    def boundary(b):
        return (1 + b) * (2 * b - 1) / b if method == "hb" else (2 * b * b - 1) / (b * (1 + 2 * b))

    betas = np.linspace(threshold + 0.01, 0.99, 25)
    hs = boundary(betas)
    assert np.all(hs < stability_edge(method, betas))
    assert np.all(_lag1_by_state_space(method, hs * (1 - 1e-6), betas) > 0)
    assert np.all(_lag1_by_state_space(method, hs * (1 + 1e-6), betas) < 0)
    assert np.all(np.abs(_lag1_by_state_space(method, hs, betas)) < 1e-9)
    low = np.linspace(0.0, threshold - 1e-3, 20)[:, None]
    h = np.linspace(1e-3, 0.999, 200)[None, :] * stability_edge(method, low)
    assert np.all(_lag1_by_state_space(method, h, low) < 0)


@pytest.mark.parametrize("method", METHODS)
def test_lag1_tends_to_minus_one_at_the_edge(method):
    betas = np.array([0.0, 0.5, 0.9, 0.99])
    h = stability_edge(method, 0.0 if method == "gd" else betas) * (1 - 1e-7)
    np.testing.assert_allclose(_lag1_by_state_space(method, h, betas), -1, atol=1e-5)


def test_gd_is_pflug_and_hb_small_h_asymptote():
    h = np.linspace(0.01, 1.99, 30)
    np.testing.assert_allclose(_lag1_by_state_space("gd", h, 0.0), -h / 2, atol=1e-12)
    # HB small h, large beta: rho_g = h(2b-1)/(2(1-b)) + O(h^2): the relative error
    # shrinks linearly with h (ratio of errors ~ ratio of h's).
    b = 0.9
    errs = [abs(_lag1_by_state_space("hb", hh, b) / (hh * (2 * b - 1) / (2 * (1 - b))) - 1)
            for hh in (1e-3, 1e-4)]
    assert errs[1] < 0.2 * errs[0] and errs[1] < 1e-2


# ----------------------------------------------------------------- schedules
@pytest.mark.parametrize("method", METHODS)
def test_constant_schedule_converges_to_stationary(method):
    # The recursion's error decays like rho(A)^(2t); pick T with rho^(2T) <= 1e-13.
    lam = np.array([0.05, 0.7, 2.5])
    s2 = np.array([1.0, 0.3, 2.0])
    lr, beta = 0.5, 0.8
    rho = spectral_radius(method, lr * lam, beta).max()
    T = int(np.ceil(np.log(1e-13) / (2 * np.log(rho))))
    out = schedule_prediction(method, np.full(T, lr), beta, lam, s2, x0_var=4.0, per_mode=True)
    ref = st.stationary_gradient_moments(method, lam, lr, beta, s2)
    np.testing.assert_allclose(out["mode_grad_sq"][-1], ref.grad_sq, rtol=1e-9)
    np.testing.assert_allclose(out["mode_lag1"][-1], ref.lag1, rtol=1e-9, atol=1e-12)
    assert out["grad_corr"][-1] == pytest.approx(ref.lag1.sum() / ref.grad_sq.sum(),
                                                 rel=1e-9)
    assert np.isnan(out["grad_corr"][0]) and np.isnan(out["lag1"][0])


@pytest.mark.parametrize("method", METHODS)
def test_schedule_recursion_matches_monte_carlo(method):
    # Step decay from a deterministic start x0 = 1. Per step g_t ~ N(mu_t, s_t^2) with mu_t
    # the noise-free trajectory (the recursion with sigma2 = 0 gives mu_t^2), so over N
    # i.i.d. chains the mean of g_t^2 has variance (2 s^4 + 4 mu^2 s^2)/N exactly; for the
    # product g_t g_{t-1}, Var <= E[g_t^2 g_{t-1}^2] <= sqrt(E g_t^4 E g_{t-1}^4) with the
    # Gaussian E g^4 = mu^4 + 6 mu^2 s^2 + 3 s^4. 5 standard errors over 600 comparisons.
    lam, s2, beta, chains = np.array([0.3, 1.0, 3.0]), np.array([0.5, 1.0, 0.2]), 0.85, 4000
    lrs = lr_schedule("step", 0.9 * edge(method, beta) / 3.0, 200, milestones=[60, 120],
                      gamma=0.3)
    pred = schedule_prediction(method, lrs, beta, lam, s2, x0_var=1.0, per_mode=True)
    mu2 = schedule_prediction(method, lrs, beta, lam, 0.0, x0_var=1.0,
                              per_mode=True)["mode_grad_sq"]
    sim = monte_carlo(method, lam, lrs, beta, s2, steps=200, chains=chains, seed=3,
                      start="given", x0=1.0, average="chains")
    var = pred["mode_grad_sq"] - mu2
    se = np.sqrt((2 * var**2 + 4 * mu2 * var) / chains)
    assert np.all(np.abs(sim["grad_sq"] - pred["mode_grad_sq"]) < 5 * se)
    m4 = mu2**2 + 6 * mu2 * var + 3 * var**2
    se_lag = np.sqrt(np.sqrt(m4[1:] * m4[:-1]) / chains)
    assert np.all(np.abs(sim["lag1"][1:] - pred["mode_lag1"][1:]) < 5 * se_lag)


def test_schedule_accepts_per_step_momentum_and_spectrum():
    lam, s2, lrs = np.array([0.5, 2.0]), np.array([1.0, 0.5]), lr_schedule("cosine", 0.5, 50)
    a = schedule_prediction("nag", lrs, 0.8, lam, s2, x0_var=1.0)
    b = schedule_prediction("nag", lrs, np.full(50, 0.8), np.tile(lam, (50, 1)), s2, x0_var=1.0)
    np.testing.assert_array_equal(a["grad_sq"], b["grad_sq"])
    c = schedule_prediction("nag", lrs, np.r_[np.full(25, 0.8), np.full(25, 0.5)], lam, s2,
                            x0_var=1.0)
    np.testing.assert_array_equal(c["grad_sq"][:26], a["grad_sq"][:26])
    assert not np.allclose(c["grad_sq"][27:], a["grad_sq"][27:])
    with pytest.raises(ValueError, match="must broadcast"):
        schedule_prediction("nag", lrs, 0.8, np.ones((3, 2)), s2)


def test_lr_schedule_shapes_and_errors():
    assert lr_schedule("constant", 0.1, 3).tolist() == [0.1] * 3
    np.testing.assert_allclose(lr_schedule("step", 1.0, 6, step_size=2, gamma=0.5),
                               [1, 1, 0.5, 0.5, 0.25, 0.25])
    np.testing.assert_allclose(lr_schedule("cosine", 1.0, 4), [1, 0.853553, 0.5, 0.146447],
                               rtol=1e-5)
    np.testing.assert_allclose(lr_schedule("linear", 1.0, 4), [1, 0.75, 0.5, 0.25])
    with pytest.raises(ValueError, match="kind='exp'"):
        lr_schedule("exp", 1.0, 4)
    with pytest.raises(ValueError, match="gamma"):
        lr_schedule("cosine", 1.0, 4, gamma=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        lr_schedule("step", 1.0, 4)


# ----------------------------------------------------------------- layer model
def test_power_spectrum_matches_its_summary_and_binning_is_accurate():
    spec = LayerSpectrum.from_summary(40.0, 1500.0, 10**6)
    assert spec.trace == pytest.approx(1500.0, rel=1e-10)
    assert spec.lam_max == 40.0 and spec.n_params == 10**6
    assert spec.eigenvalues.size <= 400 and np.all(np.diff(spec.eigenvalues) <= 0)
    # Binned (400 modes) vs exact (5000 modes): bin means by the midpoint rule are
    # accurate to O(p^2/lo^2) with lo >= 200, i.e. ~1e-5 relative; measured ~1e-7.
    exact = LayerSpectrum.from_summary(10.0, 200.0, 5000, max_modes=5000)
    binned = LayerSpectrum.from_summary(10.0, 200.0, 5000, max_modes=400)
    assert exact.eigenvalues.size == 5000 and binned.eigenvalues.size <= 400
    assert binned.exponent == pytest.approx(exact.exponent, rel=1e-5)
    for method in METHODS:
        a = layer_prediction(method, 0.05, 0.9, exact, 2.0, "curvature")
        b = layer_prediction(method, 0.05, 0.9, binned, 2.0, "curvature")
        assert b.grad_corr == pytest.approx(a.grad_corr, rel=1e-4, abs=1e-6)
        assert b.grad_sq_norm == pytest.approx(a.grad_sq_norm, rel=1e-5)


def test_two_level_and_summary_errors():
    spec = LayerSpectrum.from_summary(10.0, 55.0, 10, shape="two-level")
    np.testing.assert_allclose(spec.eigenvalues, [10.0, 5.0])
    np.testing.assert_allclose(spec.weights, [1.0, 9.0])
    with pytest.raises(ValueError, match=r"trace=109 is outside.*\[10, 100\]"):
        LayerSpectrum.from_summary(10.0, 109.0, 10, shape="two-level")
    with pytest.raises(ValueError, match="trace=5 is outside"):
        LayerSpectrum.from_summary(10.0, 5.0, 10)
    assert LayerSpectrum.from_summary(10.0, 5.0, 10, clip_trace=True).trace == pytest.approx(10)
    with pytest.raises(ValueError, match="shape='flat'"):
        LayerSpectrum.from_summary(10.0, 50.0, 10, shape="flat")


@pytest.mark.parametrize("noise_model", ["additive", "curvature"])
def test_layer_prediction_equals_lyapunov_on_the_full_matrix(noise_model):
    # Independent route: build H and Sigma (commuting by the noise model) as dense
    # matrices in a random basis and solve the 2n-dim Lyapunov equation.
    rng = np.random.default_rng(5)
    lam = np.sort(rng.uniform(0.01, 8.0, 8))
    spec = LayerSpectrum(lam)
    V = scipy.stats.special_ortho_group.rvs(8, random_state=rng)
    noise_total = 3.0
    for method in METHODS:
        lr, beta = 0.8 * edge(method, 0.9) / lam.max(), 0.9
        pred = layer_prediction(method, lr, beta, spec, noise_total, noise_model)
        s2 = pred.sigma2
        assert s2 @ spec.weights == pytest.approx(noise_total)
        ref = st.lyapunov_gradient_stats(method, (V * lam) @ V.T, (V * s2) @ V.T, lr, beta)
        assert pred.grad_sq_norm == pytest.approx(ref.grad_sq, rel=1e-10)
        assert pred.grad_corr == pytest.approx(ref.lags[1] / ref.grad_sq, abs=1e-10)


def test_layer_prediction_broadcasts_and_handles_unstable_modes():
    spec = LayerSpectrum.from_summary(50.0, 2000.0, 10**5)
    lrs = np.array([0.01, 0.05, 0.1])  # 0.1 * 50 = 5 > 3.8 = HB edge at beta = 0.9
    with pytest.raises(ValueError, match=r"diverge for 1 mode.*lam=50"):
        layer_prediction("hb", lrs, 0.9, spec, 1.0)
    nan = layer_prediction("hb", lrs, 0.9, spec, 1.0, on_unstable="nan")
    assert np.isfinite(nan.grad_corr[:2]).all() and np.isnan(nan.grad_corr[2])
    assert nan.n_unstable.tolist() == [0, 0, 1]
    exc = layer_prediction("hb", lrs, 0.9, spec, 1.0, on_unstable="exclude")
    np.testing.assert_array_equal(exc.grad_corr[:2], nan.grad_corr[:2])
    assert np.isfinite(exc.grad_corr[2])
    one = layer_prediction("hb", 0.05, 0.9, spec, 1.0)
    assert one.grad_corr == pytest.approx(nan.grad_corr[1], rel=1e-14)
    assert nan.mode_grad_sq.shape == (3, spec.eigenvalues.size)


def _exact_mean_cosine(a, c, n=160):
    r"""E[cos(g, g')] for independent zero-mean Gaussian pairs (g_i, g'_i) with E g_i² =
    E g'_i² = a_i and E g_i g'_i = c_i, exactly: with 1/√N = π^{-1/2}∫ t^{-1/2} e^{-tN} dt
    and, per mode, E[e^{-t g² - s g'²}] = q^{-1/2}, E[g g' e^{-t g² - s g'²}] = c q^{-3/2},
    q = 1 + 2a(t + s) + 4ts(a² − c²),

    .. math:: E\left[\frac{g\cdot g'}{\|g\|\|g'\|}\right] = \frac1\pi\int_0^\infty\!\!\int_0^\infty
       (ts)^{-1/2} \prod_j q_j^{-1/2} \sum_i \frac{c_i}{q_i}\,dt\,ds,

    by the trapezoid rule in log t (the integrand decays at both ends like e^{x/2} and
    t^{-d_eff/2}; n = 160 agrees with n = 800 to 1e-9 here)."""
    x = np.linspace(-40, 25, n)
    t = np.exp(x)
    T, S = t[:, None, None], t[None, :, None]
    q = 1 + 2 * a * (T + S) + 4 * T * S * (a**2 - c**2)
    f = np.exp(-0.5 * np.log(q).sum(-1)) * (c / q).sum(-1)
    w = np.sqrt(t)  # t^{-1/2} dt = e^{x/2} dx
    return float(w @ f @ w * (x[1] - x[0]) ** 2 / np.pi)


def test_exact_mean_cosine_of_gaussian_pairs():
    # one fully correlated mode: cos = 1 (the truncated range costs < 1e-5 here, decay t^{-1/2});
    # uncorrelated modes: 0; a 3-mode case against 4e5 draws (5 standard errors)
    assert _exact_mean_cosine(np.array([1.0]), np.array([1.0]), n=400) == pytest.approx(1.0, abs=1e-5)
    assert _exact_mean_cosine(np.array([1.0, 2.0]), np.array([0.0, 0.0])) == 0.0
    a, c = np.array([1.0, 0.5, 0.2]), np.array([0.5, -0.3, 0.1])
    L = np.linalg.cholesky(np.stack([[[ai, ci], [ci, ai]] for ai, ci in zip(a, c)]))
    g = np.einsum("mij,nmj->nmi", L, np.random.default_rng(0).normal(size=(400_000, 3, 2)))
    cos = (g[..., 0] * g[..., 1]).sum(1) / np.linalg.norm(g[..., 0], axis=1) / np.linalg.norm(g[..., 1], axis=1)
    assert abs(cos.mean() - _exact_mean_cosine(a, c)) < 5 * cos.std() / np.sqrt(cos.size)
    assert abs(_exact_mean_cosine(a, c) - c.sum() / a.sum()) > 0.05  # d_eff ≈ 2: the ratio is far off


def test_mean_cosine_approximation_in_high_dimension():
    # Assumption 4 of the layer model: E[cos(g_t, g_{t+1})] = E[g_t.g_{t+1}]/E|g|^2 +
    # O(1/d_eff). Simulate a 400-mode layer (stationary start) and average the cosine over
    # 64 chains x 300 steps (per-chain means are i.i.d.: 5 standard errors). The stationary
    # gradients are Gaussian, independent across modes, so E[cos] is known exactly
    # (_exact_mean_cosine, from the predicted per-mode moments): the simulation must match it
    # within 5 SE (0.008 here, vs a prediction of 0.20: a wrong sign fails). The power-law
    # spectrum concentrates the gradient in d_eff ≈ 6 modes, and the approximation's error,
    # exact minus ratio, is then 0.007 (second-order delta method: 0.013; leading term ≤ 1/(2 d_eff)).
    spec = LayerSpectrum.from_summary(5.0, 60.0, 400)
    lr, beta, method = 0.3, 0.9, "hb"
    pred = layer_prediction(method, lr, beta, spec, 1.0, "curvature")
    lam, s2 = spec.eigenvalues, pred.sigma2
    assert np.all(spec.weights == 1)
    exact = _exact_mean_cosine(pred.mode_grad_sq, pred.mode_lag1)
    rng = np.random.default_rng(2)
    P = st.stationary_state_covariance(method, lam, lr, beta, s2)
    z = rng.normal(size=(2, 64, lam.size))
    x = np.sqrt(P[:, 0, 0]) * z[0]
    l21 = P[:, 1, 0] / np.sqrt(P[:, 0, 0])
    buf = l21 * z[0] + np.sqrt(np.maximum(P[:, 1, 1] - l21**2, 0)) * z[1]
    m, prev, cos = get_method(method), None, []
    for _ in range(300):
        g = lam * x + np.sqrt(s2) * rng.normal(size=x.shape)
        if prev is not None:
            cos.append((g * prev).sum(1) / np.linalg.norm(g, axis=1) / np.linalg.norm(prev, axis=1))
        step, buf = m.update(g, buf, lr, beta)
        x, prev = x + step, g
    per_chain = np.mean(cos, axis=0)
    se = per_chain.std(ddof=1) / np.sqrt(per_chain.size)
    assert abs(per_chain.mean() - exact) < 5 * se, (per_chain.mean(), exact, se)
    assert 5 * se < 0.05 * abs(pred.grad_corr)  # the check is tight: the sign and size matter
    assert abs(exact - pred.grad_corr) < 1 / (2 * pred.effective_dim)


# ----------------------------------------------------------------- DeepOBS problem
def test_quadratic_deep_spectrum_and_noise():
    p = quadratic_deep(batch_size=4)
    assert np.sum((p.eigenvalues > 0) & (p.eigenvalues < 1)) == 90
    assert np.sum((p.eigenvalues > 30) & (p.eigenvalues < 60)) == 10
    V = p.eigenvectors
    np.testing.assert_allclose(V.T @ V, np.eye(100), atol=1e-12)
    assert np.linalg.det(V) == pytest.approx(1.0)
    H, S = p.hessian, p.noise_cov
    np.testing.assert_allclose(H @ S, S @ H, atol=1e-9)
    # Noise of the batch gradient Q(theta - xbar), xbar the mean of 4 draws of N(0, 0.36 I):
    # sampled covariance of 20000 batches, entrywise sd <= sqrt(2/20000) max|S| ~ 1% max|S|,
    # so 5% is > 4.5 sd for the largest of the 10^4 entries.
    rng = np.random.default_rng(0)
    xbar = rng.normal(0.0, 0.6, size=(20000, 4, 100)).mean(1)
    emp = np.cov((xbar @ H).T)
    assert np.abs(emp - S).max() < 0.05 * np.abs(S).max()
    # Per-mode prediction on the problem equals the dense Lyapunov solution.
    lr, beta = 0.9 * edge("hb", 0.9) / p.eigenvalues.max(), 0.9
    ref = st.lyapunov_gradient_stats("hb", H, S, lr, beta)
    per = st.stationary_gradient_moments("hb", p.eigenvalues, lr, beta, p.noise_eigenvalues)
    assert per.lag1.sum() / per.grad_sq.sum() == pytest.approx(
        ref.lags[1] / ref.grad_sq, abs=1e-9)
    layer = layer_prediction("hb", lr, beta, p.layer_spectrum(), p.noise_eigenvalues.sum(),
                             noise_model=p.noise_eigenvalues)
    assert layer.grad_sq_norm == pytest.approx(ref.grad_sq, rel=1e-10)
    assert layer.grad_corr == pytest.approx(ref.lags[1] / ref.grad_sq, abs=1e-9)


# ----------------------------------------------------------------- input validation
def test_bad_inputs_are_refused_clearly():
    with pytest.raises(ValueError, match=r"diverge there.*modes 1: h=4"):
        st.stationary_gradient_moments("hb", [1.0, 4.0], 1.0, 0.9, 1.0)
    with pytest.raises(ValueError, match="h=2.5"):
        st.gradient_autocorrelation("nag", 2.5, 0.5)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        st.lyapunov_covariance("hb", np.eye(2), [[1.0, 0.0], [0.0, -0.1]], 0.1, 0.9)
    with pytest.raises(ValueError, match="not symmetric"):
        st.check_noise_covariance([[1.0, 0.5], [0.0, 1.0]])
    st.check_noise_covariance([[1.0, 1.0], [1.0, 1.0]])  # singular PSD is fine
    with pytest.raises(ValueError, match="diverge"):
        st.lyapunov_covariance("gd", np.diag([1.0, 30.0]), np.eye(2), 0.1, 0.0)
    with pytest.raises(ValueError, match=r"momentum=.*1.*outside the valid range \[0, 1\)"):
        st.stationary_iterate_variance("hb", 1.0, 0.1, 1.0, 1.0)
    with pytest.raises(ValueError, match="sigma2=.*-1"):
        st.stationary_iterate_variance("hb", 1.0, 0.1, 0.5, -1.0)
    with pytest.raises(ValueError, match="lam=.*0"):
        st.stationary_iterate_variance("hb", 0.0, 0.1, 0.5, 1.0)
    with pytest.raises(ValueError, match="method='adam'"):
        st.stationary_iterate_variance("adam", 1.0, 0.1, 0.5, 1.0)
    with pytest.raises(ValueError, match="on_unstable"):
        layer_prediction("hb", 0.1, 0.5, [1.0], 1.0, on_unstable="ignore")


@pytest.mark.parametrize("kind, params, scheduler", [
    ("step", {"step_size": 7, "gamma": 0.5}, lambda o: torch.optim.lr_scheduler.StepLR(o, 7, 0.5)),
    ("step", {"milestones": [5, 20], "gamma": 0.3},
     lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [5, 20], 0.3)),
    ("cosine", {"eta_min": 0.01}, lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 40, 0.01)),
    ("linear", {"end_factor": 0.2}, lambda o: torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.2, 40)),
])
def test_lr_schedule_equals_torch_schedulers(kind, params, scheduler):
    """Independent route: PyTorch's own schedulers, stepped once per optimizer step, give
    the lr that step t uses (the training loop's convention)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.7)
    sched, seen = scheduler(opt), []
    for _ in range(40):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(lr_schedule(kind, 0.7, 40, **params), seen, rtol=1e-12)
