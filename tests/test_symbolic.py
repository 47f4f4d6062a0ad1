"""The symbolic derivations against the hand-written numeric formulas (a second route to the
theory), and the derivations themselves against numbers: roots, Lyapunov solves, simulation.
Tolerances: both routes are exact formulas evaluated in float64, so 1e-9 relative unless a
comment says otherwise."""

import numpy as np
import pytest
import scipy.linalg
import sympy as sp
from hypothesis import given
from hypothesis import strategies as st
from scipy.integrate import solve_ivp

from dynamics import modified, quadratic
from dynamics.nqm import stationary as stochastic
from dynamics import symbolic as S
from dynamics.methods import get_method

METHODS = ["gd", "hb", "nag"]
betas = st.floats(0.0, 0.98)
fractions = st.floats(0.01, 0.95)  # h as a fraction of the stability edge


def _close(a, b, rtol=1e-9, atol=1e-12):
    np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------- linear theory
@pytest.mark.parametrize("method", METHODS)
@given(h=st.floats(0.0, 4.0), b=betas)
def test_char_coeffs_and_roots_match_derived_polynomial(method, h, b):
    c1, c0 = S.char_coeffs(method)(h, b)
    _close(get_method(method).char_coeffs(h, b), (c1, c0))
    z = quadratic.char_roots(method, h, b)
    _close(z.sum().real, c1, atol=1e-10)  # Vieta: sum and product of the roots
    _close(z.prod().real, c0, atol=1e-10)
    assert abs(z.sum().imag) < 1e-10 and abs(z.prod().imag) < 1e-10


@pytest.mark.parametrize("method", METHODS)
@given(b=betas)
def test_stability_edge_matches_jury_derivation(method, b):
    edge = S.stability_edge(method)(b)
    _close(quadratic.stability_edge(method, b), edge)
    # Independent of both: numeric roots of the derived polynomial 0.1% inside and outside.
    def radius(h_):
        c1, c0 = S.char_coeffs(method)(h_, b)
        return np.abs(np.roots([1.0, -float(c1), float(c0)])).max()

    assert radius(0.999 * edge) < 1 < radius(1.001 * edge)


@pytest.mark.parametrize("method", ["hb", "nag"])
@given(b=st.floats(0.01, 0.98))
def test_regime_boundaries_match_ripple_band_and_regime(method, b):
    lo, hi = S.regime_boundaries(method)(b)
    _close(quadratic.ripple_band(method, b), (lo, hi))
    assert quadratic.regime(method, 0.5 * (lo + hi), b) == "ripple"
    assert quadratic.regime(method, 0.99 * lo, b) == "monotone"
    edge = quadratic.stability_edge(method, b)
    assert quadratic.regime(method, 0.5 * (hi + edge), b) == "flip"


def test_gd_boundary_is_double_root_at_one():
    assert S.regime_boundaries_expr("gd") == (1,)
    assert quadratic.ripple_band("gd", 0.3) == (1.0, 1.0)


# ----------------------------------------------------------------------- modified equations
def test_first_correction_reproduces_theory():
    b = S.beta
    assert sp.simplify(S.modified_loss_coefficient_expr("gd") - sp.Rational(1, 4)) == 0
    assert sp.simplify(S.modified_loss_coefficient_expr("hb") - (1 + b) / (4 * (1 - b) ** 2)) == 0
    assert sp.simplify(S.modified_loss_coefficient_expr("nag") - (1 - b + 2 * b**2) / (4 * (1 - b) ** 2)) == 0
    # THEORY's (Sutskever) form of NAG has the same first correction.
    assert sp.simplify(S.modified_loss_coefficient_expr("nag", "sutskever")
                       - S.modified_loss_coefficient_expr("nag")) == 0


@pytest.mark.parametrize("method", METHODS)
@given(lr=st.floats(1e-4, 1.0), b=betas)
def test_modified_loss_coefficient_matches_numeric(method, lr, b):
    _close(modified.modified_loss_coefficient(method, lr, b), S.modified_loss_coefficient(method)(lr, b))


@pytest.mark.parametrize("method", METHODS)
def test_two_derivations_of_the_second_correction_agree(method):
    """Backward error analysis (generic g) restricted to g = λx must equal the series of the
    exact slow root: κ₁ = 2c/α and κ₂ = k_a."""
    k1, k2 = S.slow_rate_series(method, 2)
    assert sp.simplify(k1 - 2 * S.modified_loss_coefficient_expr(method)) == 0
    assert sp.simplify(k2 - S.second_order_coefficients(method)[0]) == 0


def test_gd_second_order_is_the_euler_result():
    """Explicit Euler's modified equation: f₂ = f′f′f/3 + f″(f, f)/12 (Hairer, Lubich, Wanner)."""
    assert S.second_order_coefficients("gd") == (sp.Rational(1, 3), sp.Rational(1, 12))


def test_hb_slow_rate_series_narayana_form():
    """κ_n = Σ_k C(n,k)² β^k / ((n+1)(1−β)^{2n}), the closed form reported in symbolic.py."""
    b = S.beta
    for n, kappa in enumerate(S.slow_rate_series("hb", 5), start=1):
        guess = sum(sp.binomial(n, k) ** 2 * b**k for k in range(n + 1)) / ((n + 1) * (1 - b) ** (2 * n))
        assert sp.simplify(kappa - guess) == 0, n


@pytest.mark.parametrize("method, exact_rate", [("hb", -10.096847), ("nag", -10.087586)])
def test_slow_rate_series_gives_check_value(method, exact_rate):
    """docs/theory.md §3: λ=1, β=0.9, lr=1e-4. Successive terms κ_n h^n shrink by ~4·h/(1-β)^2 = 4%
    (HB's Narayana numerators grow ~4x per order), so 6 terms leave ~1e-11 relative."""
    h_, b_ = 1e-4, 0.9
    kappas = [float(k.subs(S.beta, b_)) for k in S.slow_rate_series(method, 6)]
    rate = -(1 + sum(k * h_ ** (n + 1) for n, k in enumerate(kappas))) / (1 - b_)
    assert rate == pytest.approx(exact_rate, abs=1e-6)
    # ... and against the numeric slow root, to the series' truncation error.
    c1, c0 = get_method(method).char_coeffs(h_, b_)
    root = np.max(np.roots([1.0, -float(c1), float(c0)]).real)
    assert rate == pytest.approx(np.log(root) / h_, rel=1e-9)


def _high_order_flow(method, form, order):
    """ẋ = Σ_{j≤order} α^j F_j(g, g′, g″) for g(x) = x + x³ (f = x²/2 + x⁴/4), lambdified."""
    fields = S.modified_equation(method, order, form)
    syms = S._G[:3] + (S.alpha, S.beta)
    field = sp.lambdify(syms, sum(S.alpha**j * f for j, f in enumerate(fields)), "numpy")
    return lambda x, lr, b: field(x + x**3, 1 + 3 * x**2, 6 * x, lr, b)


def _global_error(method, form, order, lrs, b=0.5, x0=0.8, horizon=1.0):
    """Max error of the order-`order` modified flow of `form` against that form's iterates,
    started with x₁ exactly on the flow (so the start costs nothing at any order).

    "pytorch": PyTorch's rule via Method.update, its buffer b_{-1} chosen so that the first
    step lands on x(lr); "sutskever": THEORY §3's recurrence with the look-ahead gradient."""
    m, grad = get_method(method), (lambda x: x + x**3)
    flow = _high_order_flow(method, form, order)
    p, q, a = (float(c.subs(S.beta, b)) for c in S.two_step_coefficients(method, form))
    errors = []
    for lr in lrs:
        steps = int(round(horizon / lr))
        t = lr * np.arange(steps + 1)
        sol = solve_ivp(lambda t_, y: flow(y, lr, b), (0, t[-1]), [x0], t_eval=t, method="DOP853",
                        rtol=1e-13, atol=1e-15).y[0]
        out = [x0, sol[1]]
        if form == "pytorch":  # step = -lr (c_g g_0 + c_b b_{-1}) = x(lr) - x0, c_g, c_b off the rule
            cg, cb = -m.update(1.0, 0.0, lr, b)[0] / lr, -m.update(0.0, 1.0, lr, b)[0] / lr
            x, state, out = x0, ((x0 - sol[1]) / lr - cg * grad(x0)) / cb, [x0]
            for _ in range(steps):
                step, state = m.update(grad(x), state, lr, b)
                x = x + step
                out.append(x)
        else:
            for _ in range(steps - 1):
                x, xp = out[-1], out[-2]
                out.append(x + b * (x - xp) - lr * (p * grad(x + a * (x - xp)) - q * grad(xp)))
        errors.append(np.max(np.abs(np.array(out) - sol)))
    return np.array(errors)


@pytest.mark.parametrize("form", ["pytorch", "sutskever"])
@pytest.mark.parametrize("method", ["hb", "nag"])
def test_second_order_modified_equation_is_third_order_accurate(method, form):
    """Flows truncated after F₁ and F₂ have global error O(lr²) and O(lr³) against the iterates
    on a non-quadratic loss (g = x + x³, where k_b matters). Started exactly on the flow,
    nothing else limits the order. lr·L ≤ 0.016 with β = 0.5 keeps the next term a few
    percent (measured slopes 1.98-1.99 and 2.98-2.99); tolerance 0.2."""
    lrs = np.geomspace(2e-3, 8e-3, 3)
    for order, expected in ((1, 2), (2, 3)):
        errors = _global_error(method, form, order, lrs)
        slope = np.polyfit(np.log(lrs), np.log(errors), 1)[0]
        assert abs(slope - expected) < 0.2, (order, slope, errors)


def test_nag_sequences_differ_at_second_order():
    """PyTorch's NAG iterate y_k = x_k + βv_k and THEORY's x_k share F₀, F₁ (and κ₂, the
    quadratic case) but not the ∇³f term k_b."""
    py, sk = S.second_order_coefficients("nag"), S.second_order_coefficients("nag", "sutskever")
    assert sp.simplify(py[0] - sk[0]) == 0 and sp.simplify(py[1] - sk[1]) != 0


# ----------------------------------------------------------------------- noisy quadratic model
def _point(method, b, frac):
    b = b if get_method(method).has_momentum else 0.0
    return frac * S.stability_edge(method)(b), b


@pytest.mark.parametrize("method", METHODS)
@given(b=betas, frac=fractions, lam=st.floats(0.1, 10.0), sigma2=st.floats(0.01, 10.0))
def test_nqm_stationary_statistics_match_stochastic(method, b, frac, lam, sigma2):
    h_, b = _point(method, b, frac)
    ours = S.nqm(method, 2)
    lr = h_ / lam
    _close(stochastic.stationary_iterate_variance(method, lam, lr, b, sigma2),
           ours["iterate_var"](h_, b, lam, sigma2), rtol=1e-8)
    moments = stochastic.stationary_gradient_moments(method, lam, lr, b, sigma2)
    _close(moments.grad_sq, ours["grad_sq"](h_, b, lam, sigma2), rtol=1e-8)
    _close(moments.full_grad_sq, ours["full_grad_sq"](h_, b, lam, sigma2), rtol=1e-8)
    _close(moments.lag1, ours["lag"][0](h_, b, lam, sigma2), rtol=1e-8, atol=1e-10)
    for lag in (1, 2):  # correlations near the edge lose ~1/(1-ρ) digits; still 1e-7
        _close(stochastic.gradient_autocorrelation(method, h_, b, lag=lag),
               ours["corr"][lag - 1](h_, b, lam, sigma2), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
@given(b=betas, frac=fractions)
def test_symbolic_lyapunov_matches_numeric_solve(method, b, frac):
    """The symbolic solve against scipy's discrete Lyapunov solver on the same (A, B)."""
    h_, b = _point(method, b, frac)
    lam_, sig = 2.0, 0.7
    A, B, _ = S.linear_step(method)
    subs = {S.alpha: h_ / lam_, S.lam: lam_, S.beta: b}
    A_, B_ = np.array(A.subs(subs), float), np.array(B.subs(subs), float)
    P = scipy.linalg.solve_discrete_lyapunov(A_, sig * B_ @ B_.T)
    _close(P[0, 0], S.nqm(method)["iterate_var"](h_, b, lam_, sig), rtol=1e-7)


def test_nqm_matches_theory_closed_forms():
    """Spot values of docs/theory.md §4 (GD ρ_g = −h/2; HB Var x) from the derivation."""
    ours = S.nqm("gd")
    _close(ours["corr"][0](0.3, 0.0, 1.0, 1.0), -0.15)
    h_, b, lam_, s2 = 0.4, 0.6, 2.0, 1.3
    a = h_ / lam_
    _close(S.nqm("hb")["iterate_var"](h_, b, lam_, s2), a**2 * s2 * (1 + b) / (h_ * (1 - b) * (2 + 2 * b - h_)))
