"""dynamics.quadratic: every formula checked against simulation or an independent route
(numpy eigvals, brute-force matrix powers, torch.optim.SGD, random search)."""

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dynamics import quadratic as q

torch.set_num_threads(1)

METHODS = ("gd", "hb", "nag")
method_st = st.sampled_from(METHODS)
momentum_st = st.floats(0.0, 0.99)
h_st = st.floats(0.0, 6.0)


# ------------------------------------------------------------------ roots and rates
@given(method_st, st.lists(h_st, min_size=1, max_size=6), st.lists(momentum_st, min_size=1, max_size=4))
def test_roots_and_radius_match_eigvals_of_iteration_matrix(method, hs, ms):
    h, b = np.array(hs)[:, None], np.array(ms)[None, :]
    ev = np.linalg.eigvals(q.iteration_matrix(method, h, b))
    roots = q.char_roots(method, h, b)
    assert roots.shape == (len(hs), len(ms), 2) and roots.dtype == complex
    # same multiset: every root within rounding of its nearest eigenvalue. Near a double
    # root the roots are sqrt-ill-conditioned: error ~ sqrt(eps * scale), scale <= 50.
    d = np.abs(roots[..., :, None] - ev[..., None, :]).min(-1)
    assert np.all(d <= 1e-6)
    # dominant first; the spectral radius is its modulus and the eigvals' max modulus
    assert np.all(np.abs(roots[..., 0]) >= np.abs(roots[..., 1]) - 1e-12)
    rho = q.spectral_radius(method, h, b)
    np.testing.assert_allclose(rho, np.abs(roots[..., 0]), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rho, np.abs(ev).max(-1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(roots.prod(-1).real, np.linalg.det(q.iteration_matrix(method, h, b)),
                               atol=1e-12)


def _log_rate_and_tolerance(method, h, b, window):
    """Empirical log-rate of the state s_k = (x_k, x_{k-1}) of the simulator (x_0 = 1,
    zero buffer) over `window` steps from k = 1, and a rigorous bound on its distance from
    log(rho): with s_k = V D^(k-1) c (V the Vandermonde matrix of the roots, c the
    eigen-coordinates of s_1), ||s_{1+W}|| / ||s_1|| lies in
    rho^W [|c_dom| / (cond(V) ||c||), cond(V)], so the log-rate is off by at most
    log(cond(V) ||c|| / |c_dom|) / W. Broadcasts over h, b and window."""
    h, b, window = np.broadcast_arrays(*map(np.asarray, (h, b, window)))
    x = q.simulate(method, h, 1.0, b, 1.0, int(window.max()) + 1).iterates
    norms = np.hypot(x[1:], x[:-1])  # norms[k - 1] = ||s_k||
    end = np.take_along_axis(norms, window[None], 0)[0]
    z = q.char_roots(method, h, b)
    V = np.stack([np.stack([z[..., 0], z[..., 1]], -1), np.ones(z.shape, complex)], -2)
    c = np.linalg.solve(V, np.stack([x[1], x[0]], -1).astype(complex)[..., None])[..., 0]
    spread = np.linalg.cond(V) * np.linalg.norm(c, axis=-1) / np.abs(c[..., 0])
    return np.log(end / norms[0]) / window, np.log(spread) / window


@given(method_st, st.floats(0.01, 6.0), momentum_st)
def test_spectral_radius_is_the_empirical_decay_rate(method, h, b):
    rho = q.spectral_radius(method, h, b)
    assume(0.05 < rho < 3.0)
    # window: long enough to average out the transient, short enough not to underflow
    window = int(min(4000, 500 / max(abs(np.log(rho)), 1e-3)))
    z = q.char_roots(method, h, b)
    assume(abs(z[0] - z[1]) > 1e-3 * rho)  # away from double roots (V singular)
    emp, tol = _log_rate_and_tolerance(method, h, b, window)
    assume(tol < 0.02)  # the simulation can resolve rho to 2 %
    assert abs(emp - np.log(rho)) <= tol * (1 + 1e-6) + 1e-9


def test_spectral_radius_of_complex_roots_is_sqrt_of_product_not_twice():
    # docs/theory.md: Goh (Distill 2017) prints 2 sqrt(beta); the product of the roots is beta.
    b = np.array([0.25, 0.5, 0.9])
    np.testing.assert_allclose(q.spectral_radius("hb", 1.0, b), np.sqrt(b), rtol=1e-14)


# ------------------------------------------------------------------ stability edges
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("eps", [1e-3, 3e-2])
def test_stability_edge_separates_decay_from_growth(method, eps):
    rng = np.random.default_rng(1)
    b = np.concatenate([[0.0, 0.99], rng.uniform(0, 0.99, 30)])
    edge = q.stability_edge(method, b)
    for side, h in ((-1, edge * (1 - eps)), (+1, edge * (1 + eps))):
        rho = q.spectral_radius(method, h, b)
        assert np.all(np.sign(rho - 1) == side)
        # window long enough that rho^W beats the transient factor (checked below)
        window = np.minimum(40 / np.abs(np.log(rho)), 60000).astype(int)
        emp, tol = _log_rate_and_tolerance(method, h, b, window)
        assert np.all(tol < np.abs(np.log(rho)))  # the simulation decides the side ...
        assert np.all(np.sign(emp) == side)  # ... and it agrees
    # and below the edge everything down to h -> 0 is stable (a dense check)
    hs = np.linspace(1e-6, 1 - eps, 2001)[:, None] * edge
    assert np.all(q.spectral_radius(method, hs, b) < 1)


def test_stability_edge_values():
    b = np.array([0.0, 0.5, 0.9])
    np.testing.assert_allclose(q.stability_edge("gd", b), [2, 2, 2])
    np.testing.assert_allclose(q.stability_edge("hb", b), 2 * (1 + b))
    np.testing.assert_allclose(q.stability_edge("nag", b), 2 * (1 + b) / (1 + 2 * b))
    # at the edge a root sits at -1 (independent route: eigvals)
    for m in METHODS:
        ev = np.linalg.eigvals(q.iteration_matrix(m, q.stability_edge(m, b), b))
        np.testing.assert_allclose(np.abs(ev + 1).min(-1), 0, atol=1e-12)


# ------------------------------------------------------------------ regimes
def _sign_changes(x):
    s = np.sign(x[x != 0])  # exact zeros (rational angles) are not a change of sign
    return np.count_nonzero(s[1:] != s[:-1])


@given(method_st, st.floats(0.001, 5.0), momentum_st)
def test_regime_matches_simulated_sign_pattern(method, h, b):
    label = q.regime(method, h, b)
    rho = q.spectral_radius(method, h, b)
    z = q.char_roots(method, h, b)
    assume(rho > 0.05 and abs(rho - 1) > 1e-3)
    window = 60
    if label == "ripple":
        theta = abs(np.angle(z[0]))
        assume(0.05 < theta / np.pi < 0.95 and rho ** (window + 10) > 1e-250 and rho < 1)
        x = q.simulate(method, h, 1.0, b, 1.0, window + 10).iterates[10:]
        # x_k = 2 Re(A z^k) ∝ rho^k cos(k theta + phi): a step advances the phase by
        # theta < pi, so one sign change per zero of the cosine crossed; over W steps
        # that is floor or ceil of W theta / pi (one less if zeros land on both ends).
        assert abs(_sign_changes(x) - window * theta / np.pi) <= 1
        return
    ratio = abs(z[1]) / abs(z[0])
    assume(ratio < 0.9)
    # wait until the subdominant mode has decayed by 1e-6 relative to the dominant one:
    # with ratio < 0.9 the two modes' coefficients (from x_0 = 1, zero buffer) are within
    # ~1/(1 - ratio) = 10x of each other, far inside that margin
    start = int(np.ceil(np.log(1e-6) / np.log(ratio))) + 1 if ratio > 0 else 1
    start += 20
    steps = start + window
    assume(rho**steps > 1e-250 and rho**steps < 1e250)
    x = q.simulate(method, h, 1.0, b, 1.0, steps).iterates[start:]
    if label == "divergent":
        assert rho > 1
        assert abs(x[-1]) > abs(x[0])
    elif label == "monotone":
        assert _sign_changes(x) == 0
    else:
        assert label == "flip"
        assert _sign_changes(x) == window


@pytest.mark.parametrize("method", METHODS)
def test_regime_bands_match_theory_boundaries(method):
    b = np.linspace(0.01, 0.95, 40)
    lo, hi = q.ripple_band(method, b)
    edge = q.stability_edge(method, b)
    if method == "hb":  # docs/theory.md §2, boundaries (1 -+ sqrt(beta))^2
        np.testing.assert_allclose([lo, hi], [(1 - np.sqrt(b)) ** 2, (1 + np.sqrt(b)) ** 2])
    # independent route: the discriminant of the eigvals' characteristic polynomial
    d = lambda h: np.square(np.trace(q.iteration_matrix(method, h, b), axis1=-2, axis2=-1)) \
        - 4 * np.linalg.det(q.iteration_matrix(method, h, b))
    if method != "gd":
        np.testing.assert_allclose(d(lo), 0, atol=1e-12)
        np.testing.assert_allclose(d(hi), 0, atol=1e-12)
    tol = 1e-6
    for h, name in ((lo * (1 - tol), "monotone"), (lo * (1 + tol), "ripple" if method != "gd" else "flip"),
                    (hi * (1 - tol), "ripple" if method != "gd" else "monotone"),
                    (hi * (1 + tol), "flip"), (edge * (1 - tol), "flip"),
                    (edge * (1 + tol), "divergent")):  # the edge itself: within rounding
        assert np.all(q.regime(method, h, b) == name), (name, q.regime(method, h, b))


def test_regime_conventions_at_ties():
    # h = 0: a root at 1, x stays put: not contracting -> "divergent" (documented convention)
    assert all(q.regime(m, 0.0, 0.5) == "divergent" for m in METHODS)
    x = q.simulate("hb", 1.0, 0.0, 0.5, 1.0, 5).iterates
    assert np.all(x == 1.0)
    # both roots 0 (GD and NAG at h = 1): one-step convergence, monotone
    assert q.regime("gd", 1.0, 0.0) == "monotone" and q.regime("nag", 1.0, 0.5) == "monotone"
    # scalar in -> numpy string scalar out; arrays keep shape; codes index REGIMES
    codes = q.regime_code("hb", np.array([[0.01, 1.0, 3.5]]), 0.5)
    assert codes.dtype == np.int8 and [q.REGIMES[c] for c in codes[0]] == ["monotone", "ripple", "divergent"]


# ------------------------------------------------------------------ optima
@settings(max_examples=8)
@given(method_st, st.floats(0.1, 10.0), st.floats(1.5, 1e4))
def test_no_random_hyperparameters_beat_the_optimal_worst_case_rate(method, mu, kappa):
    L = mu * kappa
    lr, m, rate = q.optimal_hyperparameters(method, mu, L)
    lam = np.linspace(mu, L, 801)  # includes both ends, where the worst case sits
    worst = lambda a, b: q.spectral_radius(method, np.multiply.outer(a, lam), np.asarray(b)[..., None]).max(-1)
    # the returned pair achieves the returned rate. HB's optimum puts mu and L on double
    # roots, where rho carries a sqrt(eps) ~ 1.5e-8 rounding error: tolerance 1e-7.
    np.testing.assert_allclose(worst(lr, m), rate, rtol=1e-7)
    rng = np.random.default_rng(0)
    n = 1000
    lrs = np.concatenate([rng.uniform(0, 2 * lr, n), lr * (1 + rng.uniform(-0.02, 0.02, n))])
    ms = np.concatenate([rng.uniform(0, 0.999, n), np.clip(m * (1 + rng.uniform(-0.02, 0.02, n)), 0, 0.999)])
    if method == "gd":
        ms[:] = 0.0
    # a grid maximum is <= the true maximum, so it can only flatter the random pairs;
    # 1e-7 absorbs the sqrt(eps) rounding of rho at double roots (see above).
    assert worst(lrs, ms).min() >= rate - 1e-7


def test_optimal_hyperparameters_closed_forms():
    mu, L = 1.0, 100.0
    kappa = L / mu
    assert q.optimal_hyperparameters("gd", mu, L) == pytest.approx((2 / 101, 0.0, 99 / 101))
    lr, m, rate = q.optimal_hyperparameters("hb", mu, L)
    assert (lr, m, rate) == pytest.approx(((2 / 11) ** 2, (9 / 11) ** 2, 9 / 11))
    lr, m, rate = q.optimal_hyperparameters("nag", mu, L)
    s = np.sqrt(3 * kappa + 1)
    assert (lr, m, rate) == pytest.approx((4 / 301, (s - 2) / (s + 2), 1 - 2 / s))
    # HB's optimum is critically placed: mu and L sit on the ripple band's two ends
    lo, hi = q.ripple_band("hb", q.optimal_hyperparameters("hb", mu, L)[1])
    lr = q.optimal_hyperparameters("hb", mu, L)[0]
    assert (lr * mu, lr * L) == pytest.approx((lo, hi))
    with pytest.raises(ValueError, match=r"L=0.5 .*\[mu, inf\)"):
        q.optimal_hyperparameters("hb", 1.0, 0.5)
    with pytest.raises(ValueError, match=r"mu=.*\(0, inf\)"):
        q.optimal_hyperparameters("hb", 0.0, 1.0)


# ------------------------------------------------------------------ transient gain
def _brute_force_gain(T, kmax):
    P, best = np.eye(2), 1.0
    for _ in range(kmax):
        P = T @ P
        best = max(best, np.linalg.norm(P, 2))
    return best


@settings(max_examples=25)
@given(method_st, st.floats(0.0, 5.0), st.floats(0.0, 0.97))
def test_transient_gain_is_the_max_norm_of_matrix_powers_and_of_a_simulation(method, h, b):
    rho = q.spectral_radius(method, h, b)
    assume(rho < 0.97)
    assume(method != "nag" or b > 0.01)  # NAG with beta = 0 is GD: no 2-d state to start from
    gain, k = q.max_transient_gain(method, h, b, return_step=True)
    assert gain >= 1.0
    # brute force up to K with 2 (K+1) rho^(K-1) <= 1 (the bound in the docstring)
    K = next(K for K in range(2, 100000) if 2 * (K + 1) * rho ** (K - 1) <= 1)
    T = q.iteration_matrix(method, h, b)
    assert gain == pytest.approx(_brute_force_gain(T, K), rel=1e-10)
    if k == 0:
        return
    # the worst initial state: top right singular vector of T^k, run through the simulator
    v = np.linalg.svd(np.linalg.matrix_power(T, k))[2][0]
    lam, lr = max(h, 1e-300), h / max(h, 1e-300)  # h = lr * lam with lr > 0
    buf = q.state_buffer(method, lam, lr, b, v[0], v[1])
    x = q.simulate(method, lam, lr, b, v[0], k, buf0=buf).iterates
    assert np.hypot(x[k], x[k - 1]) == pytest.approx(gain, rel=1e-9)
    # and random initial states never exceed the gain
    rng = np.random.default_rng(0)
    s0 = rng.normal(size=(2, 64))
    x = q.simulate(method, lam, lr, b, s0[0], 3 * K + 2, buf0=q.state_buffer(method, lam, lr, b, *s0)).iterates
    assert (np.hypot(x[1:], x[:-1]) / np.hypot(*s0)).max() <= gain * (1 + 1e-9)


def test_transient_gain_corner_cases():
    # both roots 0 (GD and NAG at h = 1): T = [[0, 0], [1, 0]], ||T|| = 1, T^2 = 0
    for m in ("gd", "nag"):
        assert q.max_transient_gain(m, 1.0, 0.5, return_step=True) == (1.0, 0)
    # GD in companion coordinates: T^k = [[a^k, 0], [a^(k-1), 0]], a = 1 - h, so the
    # gain is ||T|| = sqrt(1 + a^2) (the state carries the previous iterate)
    h = np.array([0.3, 1.7])
    np.testing.assert_allclose(q.max_transient_gain("gd", h, 0.0), np.sqrt(1 + (1 - h) ** 2), rtol=1e-14)


def test_transient_gain_grid_and_divergent_points():
    h = np.array([[0.01, 0.5, 3.0, 4.5]])
    b = np.array([[0.9], [0.0]])
    g = q.max_transient_gain("hb", h, b)
    assert g.shape == (2, 4)
    assert np.isinf(g[0, 3]) and np.isinf(g[1, 2:]).all()  # rho >= 1
    assert np.all(g[np.isfinite(g)] >= 1)
    with pytest.warns(RuntimeWarning, match="undecided"):
        q.max_transient_gain("hb", 1e-4, 0.999, max_steps=10)


# ------------------------------------------------------------------ trajectories
@given(method_st, st.lists(st.floats(0.0, 4.0), min_size=1, max_size=5), st.floats(0.01, 1.0),
       momentum_st, st.booleans())
def test_simulate_equals_closed_form(method, lams, lr, b, double_root):
    lam = np.array(lams)
    if double_root and method == "hb":  # exact double roots: h = (1 -+ sqrt(b))^2
        lam = np.array([(1 - np.sqrt(b)) ** 2, (1 + np.sqrt(b)) ** 2, (1 - np.sqrt(b)) ** 2 * (1 + 1e-9)]) / lr
    if double_root and method == "nag":
        lam = np.array([((1 - b) / (1 + b)) ** 2, 1.0]) / lr
    x0 = np.linspace(-1, 2, lam.size)
    steps = 60
    sim = q.simulate(method, lam, lr, b, x0, steps)
    cf = q.closed_form(method, lam, lr, b, x0, steps)
    assert sim.iterates.shape == cf.iterates.shape == (steps + 1, lam.size)
    # error: rounding per step (eps) times the transient gain, both ways; the scale is the
    # largest iterate. Measured max ~1e-13; 1e-10 leaves room for near-double roots whose
    # roots carry sqrt(eps) errors that cancel to O(eps k^2) in the symmetric power sums.
    scale = np.abs(sim.iterates).max(0)
    stable = np.isfinite(scale) & (scale < 1e100)
    np.testing.assert_allclose(cf.iterates[:, stable], sim.iterates[:, stable], rtol=0,
                               atol=1e-10 * max(scale[stable].max(initial=1), 1))
    np.testing.assert_allclose(cf.gradients[:, stable], lam[stable] * cf.iterates[:, stable])


@settings(max_examples=25)
@given(method_st, st.floats(0.0, 0.99), st.floats(0.01, 0.5),
       st.lists(st.floats(0.0, 3.0), min_size=1, max_size=6))
def test_simulate_equals_torch_sgd(method, b, lr, lams):
    # torch refuses nesterov=True with momentum 0 (and Method.torch_kwargs passes it);
    # NAG at momentum 0 is GD, covered by method="gd".
    assume(method != "nag" or b > 0)
    lam = np.array(lams)
    edge = q.stability_edge(method, b)
    lam = np.minimum(lam, 0.999 * edge / lr)  # stable: errors do not get amplified by growth
    x0 = np.linspace(1.0, -0.5, lam.size)
    steps = 80
    x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    from dynamics.methods import get_method

    opt = torch.optim.SGD([x], **get_method(method).torch_kwargs(lr, b))
    lam_t = torch.tensor(lam, dtype=torch.float64)
    ref = [x.detach().clone().numpy()]
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (lam_t * x * x).sum()).backward()
        opt.step()
        ref.append(x.detach().clone().numpy())
    sim = q.simulate(method, lam, lr, b, x0, steps).iterates
    # same operations in a possibly different order: eps-level differences per step,
    # amplified at most by the transient gain (< 1e3 here)
    np.testing.assert_allclose(sim, np.array(ref), rtol=0, atol=1e-12)


def test_simulate_broadcasts_any_batch_shape():
    lam = np.linspace(0.1, 2.0, 4)  # a 4-d diagonal Hessian
    lr = np.array([0.1, 0.5, 1.0])[:, None, None]
    b = np.array([0.0, 0.9])[None, :, None]
    traj = q.simulate("nag", lam, lr, b, 1.0, 7)
    assert traj.iterates.shape == traj.gradients.shape == (8, 3, 2, 4)
    single = q.simulate("nag", lam[2], 0.5, 0.9, 1.0, 7).iterates
    np.testing.assert_array_equal(traj.iterates[:, 1, 1, 2], single)
    it, gr = traj  # a plain pair
    np.testing.assert_array_equal(gr, lam * it)


# ------------------------------------------------------------------ validation
BAD = [
    (lambda: q.spectral_radius("adam", 1.0, 0.5), r"method='adam'.*gd, hb, nag"),
    (lambda: q.regime("hb", -0.1, 0.5), r"h=.*-0\.1.*\[0, inf\)"),
    (lambda: q.char_roots("hb", 1.0, 1.0), r"momentum=.*1.*\[0, 1\)"),
    (lambda: q.iteration_matrix("nag", 1.0, -0.2), r"momentum=.*-0\.2.*\[0, 1\)"),
    (lambda: q.stability_edge("hb", 1.5), r"momentum=.*1\.5.*\[0, 1\)"),
    (lambda: q.spectral_radius("gd", 1.0, 2.0), r"momentum=.*\[0, 1\)"),
    (lambda: q.spectral_radius("hb", np.ones(3), np.full(4, 0.5)), r"h\(3,\).*momentum\(4,\)"),
    (lambda: q.max_transient_gain("hb", np.nan, 0.5), r"h=.*nan.*\[0, inf\)"),
    (lambda: q.simulate("hb", 1.0, -0.1, 0.5, 1.0, 3), r"lr=.*-0\.1.*\[0, inf\)"),
    (lambda: q.simulate("hb", np.ones(2), 0.1, 0.5, np.ones(3), 3), r"lam\(2,\).*x0\(3,\)"),
    (lambda: q.closed_form("hb", 1.0, 0.1, 0.5, 1.0, -1), r"steps=-1"),
]


@pytest.mark.parametrize("call, message", BAD)
def test_bad_input_names_parameter_value_and_range(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("layout", ["full", "broadcast", "transposed", "3d", "scalar-h", "empty"])
@pytest.mark.parametrize("method", METHODS)
def test_blockwise_evaluation_matches_a_direct_route_for_every_layout(method, layout):
    """spectral_radius/regime run in cache-sized blocks (several blocks here: > 16384
    points) through two paths (flat slices, row runs); both must equal a direct
    evaluation from numpy's batched eigvals and the root classification."""
    hs, bs = np.linspace(0, 4.5, 301), np.linspace(0, 0.995, 97)
    h, b = {
        "full": [np.ascontiguousarray(a) for a in np.meshgrid(hs, bs)],
        "broadcast": (hs[None, :], bs[:, None]),
        "transposed": (np.meshgrid(hs, bs)[0].T, bs[None, :]),
        "3d": (hs[None, :, None], np.stack([bs, bs[::-1]])[:, None, :]),
        "scalar-h": (1.3, bs),
        "empty": (np.zeros((0, 3)), 0.5),
    }[layout]
    rho, code = q.spectral_radius(method, h, b, return_regime=True)
    shape = np.broadcast_shapes(np.shape(h), np.shape(b))
    assert rho.shape == code.shape == shape
    ev = np.linalg.eigvals(q.iteration_matrix(method, h, b)) if rho.size else np.zeros(shape + (2,))
    np.testing.assert_allclose(rho, np.abs(ev).max(-1) if rho.size else rho, atol=1e-6)
    z = q.char_roots(method, h, b)
    want = np.where(np.abs(z[..., 0]) >= 1, q.DIVERGENT,
                    np.where(z[..., 0].imag != 0, q.RIPPLE, np.where(z[..., 0].real < 0, q.FLIP, q.MONOTONE)))
    # points within rounding of a boundary may be classified either way: compare the rest
    safe = (np.abs(np.abs(z[..., 0]) - 1) > 1e-9) & (np.abs(z[..., 0] - z[..., 1]) > 1e-6)
    np.testing.assert_array_equal(code[safe], want[safe])


def test_module_docstring_example_runs():
    import doctest

    result = doctest.testmod(q)
    assert result.failed == 0 and result.attempted > 0  # no example found would pass
