"""dynamics.methods: the update rules against independent routes (sympy elimination,
the Sutskever forms of docs/theory.md §1, torch tensors); the numerical comparison with
torch.optim.SGD over many steps is in test_quadratic.py (simulate is built on update)."""

import doctest

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import given
from hypothesis import strategies as st

from dynamics import methods
from dynamics.methods import METHODS, get_method

torch.set_num_threads(1)


def test_docstring_example_runs():
    result = doctest.testmod(methods)
    assert result.failed == 0 and result.attempted > 0  # no example found would pass


@pytest.mark.parametrize("name", list(METHODS))
def test_char_coeffs_follow_from_the_update_rule_symbolically(name):
    """Two symbolic steps of Method.update from an arbitrary state (x0, buffer B) satisfy
    x2 = c1 x1 - c0 x0 identically: the char-poly coefficients are those of the rule."""
    x0, B, lr, lam, beta = sp.symbols("x0 B alpha lambda beta")
    m = get_method(name)
    step, buf = m.update(lam * x0, B, lr, beta)
    x1 = x0 + step
    step, _ = m.update(lam * x1, buf, lr, beta)
    x2 = x1 + step
    h = sp.Symbol("h")
    # char_coeffs is numeric; read its polynomial form off at enough points to pin it
    # down (each coefficient is a polynomial of degree <= 1 in h and in beta)
    grid = [(hv, bv) for hv in (0.0, 1.0) for bv in (0.0, 1.0 - 2**-3)]
    vals = [m.char_coeffs(hv, bv) for hv, bv in grid]
    a = sp.symbols("a0:4")
    bilinear = a[0] + a[1] * h + a[2] * beta + a[3] * h * beta
    polys = []
    for idx in (0, 1):
        sol = sp.solve([bilinear.subs({h: hv, beta: bv}) - sp.nsimplify(float(v[idx]))
                        for (hv, bv), v in zip(grid, vals)], a)
        polys.append(bilinear.subs(sol))
    c1, c0 = polys
    residual = sp.expand((x2 - c1 * x1 + c0 * x0).subs(h, lr * lam))
    assert residual == 0, residual
    # and at random points the numeric coefficients equal those polynomials
    rng = np.random.default_rng(0)
    hv, bv = rng.uniform(0, 4, 20), rng.uniform(0, 1, 20)
    num = m.char_coeffs(hv, bv)
    for poly, got in zip(polys, num):
        want = sp.lambdify((h, beta), poly)(hv, bv)
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)


def _run(name, lam, lr, b, x0, steps):
    m = get_method(name)
    x, buf, xs = np.asarray(x0, float), m.init(np.asarray(x0, float)), [np.asarray(x0, float)]
    for _ in range(steps):
        step, buf = m.update(lam * x, buf, lr, b)
        x = x + step
        xs.append(x)
    return np.array(xs)


@given(st.floats(0.0, 0.99), st.floats(0.01, 1.0), st.floats(0.0, 3.0))
def test_hb_equals_the_v_form_and_nag_the_sutskever_look_ahead(b, lr, lam):
    """docs/theory.md §1: HB equals v_{k+1} = b v_k - lr g(x_k), x_{k+1} = x_k + v_{k+1};
    PyTorch's NAG iterate equals theta_k + b v_k for Sutskever's
    v_{k+1} = b v_k - lr g(theta_k + b v_k), theta_{k+1} = theta_k + v_{k+1}."""
    steps, x0 = 40, 1.0
    hb, nag = _run("hb", lam, lr, b, x0, steps), _run("nag", lam, lr, b, x0, steps)
    x, v, theta, w = x0, 0.0, x0, 0.0
    vform, look = [x], [theta]
    for _ in range(steps):
        v = b * v - lr * lam * x
        x = x + v
        w = b * w - lr * lam * (theta + b * w)
        theta = theta + w
        vform.append(x)
        look.append(theta + b * w)
    scale = max(1.0, np.abs(hb).max(), np.abs(nag).max())  # rounding relative to size
    np.testing.assert_allclose(hb, vform, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(nag, look, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("name", list(METHODS))
def test_update_works_on_torch_tensors_like_numpy(name):
    m = get_method(name)
    g, buf = np.array([0.3, -1.2]), np.array([0.5, 0.25])
    step, nbuf = m.update(g, buf, 0.1, 0.9)
    tstep, tbuf = m.update(torch.tensor(g), torch.tensor(buf), 0.1, 0.9)
    np.testing.assert_array_equal(tstep.numpy(), step)
    np.testing.assert_array_equal(tbuf.numpy(), nbuf)
    assert np.all(m.init(np.ones((2, 3))) == 0) and m.init(np.ones((2, 3))).shape == (2, 3)


def test_one_torch_step_matches_update_with_torch_kwargs():
    for name in METHODS:
        m = get_method(name)
        x = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.SGD([x], **m.torch_kwargs(0.1, 0.9))
        for _ in range(3):
            opt.zero_grad()
            (0.5 * (x * x).sum()).backward()
            opt.step()
        np.testing.assert_allclose(x.detach().numpy(), _run(name, 1.0, 0.1, 0.9, [1.0, -2.0], 3)[-1],
                                   rtol=1e-15)


def test_get_method():
    assert get_method("hb") is METHODS["hb"] and get_method(METHODS["nag"]) is METHODS["nag"]
    assert [m.has_momentum for m in METHODS.values()] == [False, True, True]
    with pytest.raises(ValueError, match=r"method='sgd' is unknown; valid: gd, hb, nag"):
        get_method("sgd")
