r"""SymPy derivations that the hand-written numeric formulas of :mod:`dynamics` are checked
against: derived from the update rules of :mod:`dynamics.methods`, never transcribed.

Every derivation starts by calling :meth:`dynamics.methods.Method.update` on SymPy symbols
(the rules are linear in the gradient and the buffer), so a change of rule there changes
everything here. Symbols: :data:`h` = αλ, :data:`beta` = β, :data:`alpha` = α (lr),
:data:`lam` = λ, :data:`sigma2` = σ², :data:`z` (characteristic variable).

- :func:`char_poly`: :math:`\det(zI - A)` of the one-mode linear map on the state
  :math:`(x_k, b_{k-1})` (GD: :math:`(x_k)`, times z), = :math:`z^2 - c_1 z + c_0`.
- :func:`stability_edge_expr`: Jury's conditions for :math:`z^2 + a_1 z + a_0`
  (:math:`P(1) > 0`, :math:`P(-1) > 0`, :math:`|a_0| < 1`); the edge is the smallest
  positive h where one of them becomes an equality.
- :func:`regime_boundaries_expr`: zeros in h of the discriminant :math:`c_1^2 - 4c_0`.
- :func:`modified_equation`: backward error analysis of the two-step recurrence
  :math:`x_{k+1} = x_k + \beta(x_k - x_{k-1}) - \alpha[p\,g(x_k + a(x_k - x_{k-1})) - q\,g(x_{k-1})]`
  (PyTorch's buffer eliminated): the formal ODE :math:`\dot x = \sum_j \alpha^j F_j(x)` whose
  solution interpolates the slow iterates, to any order, for a generic scalar gradient
  g(x). Order 1 gives the modified loss :math:`f + c\|\nabla f\|^2`
  (:func:`modified_loss_coefficient_expr`). Order 2 is
  :math:`F_2 = -\alpha^2 (1-\beta)^{-1}[k_a\, g g'^2 + k_b\, g^2 g'']`, i.e. in
  :math:`\mathbb R^d` :math:`-\alpha^2(1-\beta)^{-1}[k_a H^2\nabla f + k_b \nabla^3 f(\nabla f, \nabla f)]`
  (the two elementary differentials with three vertices, so the scalar case determines it).
- :func:`slow_rate_series`: on a quadratic, :math:`\log z_{slow}/\alpha =
  -\lambda(1-\beta)^{-1}(1 + \sum_n \kappa_n h^n)`, any order, by solving
  :math:`P(e^w) = 0` order by order in h. :math:`\kappa_1 = 2c/\alpha`, :math:`\kappa_2 = k_a`.
- :func:`nqm_statistics`: the noisy-quadratic stationary statistics (docs/theory.md §4) from the
  symbolic 2x2 Lyapunov equation :math:`P = APA^\top + \sigma^2 BB^\top`.

Results (derived here; tests/test_symbolic.py checks them by independent routes):

- First correction, c/α: GD 1/4; HB (1+β)/(4(1−β)²); NAG (1−β+2β²)/(4(1−β)²) (THEORY §3.3).
- Second correction, F₂ = −α²(1−β)⁻¹[k_a H²∇f + k_b ∇³f(∇f,∇f)]:
  GD k_a = 1/3, k_b = 1/12 (the known explicit-Euler result);
  HB k_a = (1+4β+β²)/(3(1−β)⁴), k_b = (1+10β+β²)/(12(1−β)⁴);
  NAG (PyTorch's iterate) k_a = (1−2β+7β²−3β³+3β⁴)/(3(1−β)⁴), k_b = (1−2β+13β²)/(12(1−β)⁴).
  For NAG in THEORY's (Sutskever) sequence k_b = (1+4β+7β²−6β³+6β⁴)/(12(1−β)⁴): the two
  sequences share the modified flow up to O(α) but not O(α²) off quadratics. k_a ≠ 2k_b, so
  F₂ is not the gradient of a modified loss (∇(∇fᵀH∇f) = 2H²∇f + ∇³f(∇f,∇f)).
- Quadratic slow rate: κ₁ = 2c/α, κ₂ = k_a; for HB κ_n = Σ_k C(n,k)² β^k / ((n+1)(1−β)^{2n})
  (Narayana-type numerators 1; 1,4,1; 1,9,9,1; 1,16,36,16,1; verified through n = 8).

Every ``*_expr`` function is cached (functools.lru_cache); the lambdified versions too.
Cost, measured on one (shared) core: everything above for all three methods ~1.5 s, the
modified equation to order 3 ~2 s, order 4 ~9 s; the slow-rate series to order 8 ~8 s.
"""

import functools

import numpy as np
import sympy as sp

from dynamics.methods import get_method

h, beta, alpha, lam, sigma2, z = sp.symbols("h beta alpha lambda sigma2 z", real=True)
_x, _b, _xi = sp.symbols("x b xi", real=True)
METHOD_NAMES = ("gd", "hb", "nag")


# ----------------------------------------------------------------------- the update, symbolically
@functools.lru_cache(maxsize=None)
def linear_step(method):
    """(A, B, C) of one step on f = λx²/2 with stochastic gradient g = λx + ξ.

    State s = (x_k, b_{k-1}) (GD: (x_k)); s_{k+1} = A s_k + B ξ_k, g_k = C s_k + ξ_k.
    Obtained by running Method.update on symbols.
    """
    m = get_method(method)
    g = lam * _x + _xi
    step, buf = m.update(g, _b, alpha, beta)
    new = [_x + step, buf] if m.has_momentum else [_x + step]
    state = [_x, _b] if m.has_momentum else [_x]
    new = sp.Matrix([sp.expand(e) for e in new])
    A = new.jacobian(state)
    B = new.jacobian([_xi])
    C = sp.Matrix([[lam] + [0] * (len(state) - 1)])
    return A, B, C


def _in_h(expr):
    """Replace α by h/λ (h = αλ)."""
    return sp.simplify(expr.subs(alpha, h / lam))


@functools.lru_cache(maxsize=None)
def char_poly(method):
    """z² − c₁z + c₀ as a SymPy expression in z, h, β (GD: z(z − c₁))."""
    A, _, _ = linear_step(method)
    p = sp.expand(_in_h((z * sp.eye(A.shape[0]) - A).det()))
    return sp.expand(p * z) if A.shape[0] == 1 else p


@functools.lru_cache(maxsize=None)
def char_coeffs_expr(method):
    """(c₁, c₀) with P(z) = z² − c₁z + c₀."""
    poly = sp.Poly(char_poly(method), z)
    _, a1, a0 = poly.all_coeffs()
    return sp.factor(-a1), sp.factor(a0)


def _smallest_positive(candidates):
    """The smallest of expressions in β that are positive on 0 < β < 1, compared
    symbolically through β = 1/(1+s), s > 0."""
    s = sp.symbols("s", positive=True)
    on_range = [c for c in candidates if sp.simplify(c.subs(beta, 1 / (1 + s))).is_positive]
    best = on_range[0]
    for c in on_range[1:]:
        diff = sp.factor(sp.simplify((c - best).subs(beta, 1 / (1 + s))))
        if diff.is_negative:
            best = c
        elif not diff.is_nonnegative:
            raise ArithmeticError(f"cannot order stability candidates {best} and {c}")
    return sp.factor(best)


@functools.lru_cache(maxsize=None)
def stability_edge_expr(method):
    """Largest stable h by Jury's test on z² + a₁z + a₀: P(1) > 0, P(−1) > 0, |a₀| < 1."""
    c1, c0 = char_coeffs_expr(method)
    poly = z**2 - c1 * z + c0
    conditions = [poly.subs(z, 1), poly.subs(z, -1), c0 - 1, c0 + 1]
    candidates = []
    for cond in conditions:
        if cond.has(h):
            candidates += [r for r in sp.solve(sp.Eq(cond, 0), h)]
    return _smallest_positive([sp.simplify(c) for c in candidates if c != 0])


@functools.lru_cache(maxsize=None)
def regime_boundaries_expr(method):
    """Zeros in h of the discriminant c₁² − 4c₀, sorted (lowest first on 0 < β < 1)."""
    c1, c0 = char_coeffs_expr(method)
    roots = sp.solve(sp.Eq(sp.factor(c1**2 - 4 * c0), 0), h)
    roots = sorted({sp.simplify(r) for r in roots}, key=lambda r: float(r.subs(beta, sp.Rational(1, 2))))
    return tuple(sp.factor(r) for r in roots)


# ----------------------------------------------------------------------- modified equations
@functools.lru_cache(maxsize=None)
def two_step_coefficients(method, form="pytorch"):
    r"""(p, q, a) of x_{k+1} = x_k + β(x_k − x_{k−1}) − α[p g(x_k + a(x_k − x_{k−1})) − q g(x_{k−1})].

    ``form="pytorch"``: PyTorch's iterate. The step is linear, x_{k+1} − x_k =
    −α(c_g g_k + c_b b_{k−1}), b_k = β b_{k−1} + g_k (coefficients read off Method.update);
    eliminating the buffer with the previous step gives p = c_g, q = βc_g − c_b, a = 0.
    ``form="sutskever"``: docs/theory.md §3's form (gradient at the look-ahead): p = 1, q = 0,
    a = β for NAG (for GD/HB it equals the PyTorch form).
    """
    m = get_method(method)
    b = beta if m.has_momentum else sp.Integer(0)
    g = sp.Symbol("g")
    step, buf = m.update(g, _b, alpha, b)
    cg, cb = sp.expand(-step / alpha).coeff(g), sp.expand(-step / alpha).coeff(_b)
    if m.has_momentum:
        assert sp.expand(buf - (b * _b + g)) == 0, "the buffer rule is b_k = β b_{k-1} + g_k"
    if form == "sutskever" and m.nesterov:
        return sp.Integer(1), sp.Integer(0), b
    if form not in ("pytorch", "sutskever"):
        raise ValueError(f"form={form!r} is unknown; valid: pytorch, sutskever")
    return sp.simplify(cg), sp.simplify(b * cg - cb), sp.Integer(0)


_FIELD = sp.QQ.frac_field(beta)  # coefficients: rational functions of β, exact


def _truncate(p, order):
    """Drop the terms of ring element ``p`` whose first generator (α or h) has power > order."""
    return p.ring.from_dict({m: c for m, c in p.terms() if m[0] <= order})


def _coeff(p, power):
    """Coefficient of (first generator)^power, as an element of the same ring."""
    return p.ring.from_dict({(0,) + m[1:]: c for m, c in p.terms() if m[0] == power})


@functools.lru_cache(maxsize=None)
def modified_equation(method, order=2, form="pytorch"):
    r"""(F₀, …, F_order): the modified vector field ẋ = Σ α^j F_j of the slow solution, for a
    scalar gradient g(x), by backward error analysis; F_j are SymPy polynomials in symbols
    ``g0, g1, …`` (g_i = dⁱg/dxⁱ at x), rational in β.

    With the shift operator x(t ± α) = exp(±αD)x, D = F ∂ₓ (so D g_i = F g_{i+1}), the
    recurrence of :func:`two_step_coefficients` must hold identically in α. The unknown F_n
    enters order α^{n+1} only through (1−β)F_n, so each order is one linear equation:
    F_n = −R_n/(1−β), R_n the α^{n+1} residual of F₀..F_{n−1}. Exact polynomial arithmetic
    over Q(β) (sympy.ring) keeps order 2 well under a second.
    """
    m = get_method(method)
    b = beta if m.has_momentum else sp.Integer(0)
    p, q, a = (_FIELD.from_sympy(c) for c in two_step_coefficients(method, form))
    bb, one_minus_b = _FIELD.from_sympy(b), _FIELD.from_sympy(1 - b)
    ring, al, *gs = sp.ring(["alpha"] + [f"g{i}" for i in range(order + 3)], _FIELD)

    def lie(e, field, top):  # D e = F Σ_i ∂e/∂g_i g_{i+1}, truncated
        if e.diff(gs[-1]) != 0:
            raise ArithmeticError("modified_equation: too few derivative symbols")
        return _truncate(field * sum(e.diff(gs[i]) * gs[i + 1] for i in range(len(gs) - 1)), top)

    fields = []
    for n in range(order + 1):
        top = n + 1
        field = sum((al**j * f for j, f in enumerate(fields)), ring.zero)

        def shift(sign):  # exp(sign·αD)x − x = Σ_k (sign α)^k D^{k−1}F / k!
            total, d_k = ring.zero, field
            for k in range(1, top + 1):
                inv_factorial = _FIELD.from_sympy(sp.Rational(1, sp.factorial(k)))
                total += _truncate((sign * al) ** k * d_k * inv_factorial, top)
                d_k = lie(d_k, field, top - k)
            return total

        def grad_at(delta):  # g(x + δ) = Σ_k g_k δ^k / k!, δ = O(α)
            out, power = gs[0], ring.one
            for k in range(1, top):
                power = _truncate(power * delta, top)
                out += gs[k] * power * _FIELD.from_sympy(sp.Rational(1, sp.factorial(k)))
            return out

        fwd, bwd = shift(1), shift(-1)
        residual = fwd + bb * bwd + al * (p * grad_at(-a * bwd) - q * grad_at(bwd))
        fields.append(-_coeff(_truncate(residual, top), top) * (1 / one_minus_b))
    return tuple(sp.factor(f.as_expr()) for f in fields)


_G = sp.symbols("g0:4")


@functools.lru_cache(maxsize=None)
def modified_loss_coefficient_expr(method, form="pytorch"):
    """c/α in f + c‖∇f‖²: F₁ = −2(c/α) g g′/(1−β), read off the first correction."""
    m = get_method(method)
    b = beta if m.has_momentum else sp.Integer(0)
    f1 = modified_equation(method, 1, form)[1]
    coeff = sp.factor(-f1 * (1 - b) / (2 * _G[0] * _G[1]))
    if coeff.free_symbols - {beta}:
        raise ArithmeticError(f"first correction of {method} is not a modified loss: {f1}")
    return coeff


@functools.lru_cache(maxsize=None)
def second_order_coefficients(method, form="pytorch"):
    """(k_a, k_b): F₂ = −[k_a g g′² + k_b g² g″]/(1−β) (the α² term of the modified field)."""
    m = get_method(method)
    b = beta if m.has_momentum else sp.Integer(0)
    f2 = sp.Poly(sp.expand(-modified_equation(method, 2, form)[2] * (1 - b)), *_G[:3])
    k_a, k_b = f2.coeff_monomial(_G[0] * _G[1] ** 2), f2.coeff_monomial(_G[0] ** 2 * _G[2])
    if len(f2.terms()) != 2 - (k_a == 0) - (k_b == 0):
        raise ArithmeticError(f"unexpected second-order terms for {method}: {f2}")
    return sp.factor(k_a), sp.factor(k_b)


@functools.lru_cache(maxsize=None)
def slow_rate_series(method, order=4):
    r"""(κ₁, …, κ_order): log z_slow = −h(1−β)⁻¹(1 + Σ κ_n hⁿ) on a quadratic (exact in β).

    Solves P(e^w) = 0 for w = Σ w_k h^k one order at a time: with w₁..w_{k−1} known, the
    h^k coefficient of P(e^w) is c_k + P′(1)|_{h=0} w_k, so w_k = −c_k/(2 − c₁(0)); the
    start z = 1 at h = 0 picks the slow root.
    """
    ring, hh = sp.ring([h], _FIELD)
    c1, c0 = (ring.from_expr(sp.expand(c)) for c in char_coeffs_expr(method))
    slope = 2 - _coeff(c1, 0)  # P'(1) at h = 0, = 1 − β
    known = ring.zero
    for k in range(1, order + 2):
        zz, term = ring.one, ring.one
        for j in range(1, k + 1):  # exp(known) to O(h^k); known has no constant term
            term = _truncate(term * known * _FIELD.from_sympy(sp.Rational(1, j)), k)
            zz += term
        ck = _coeff(_truncate(zz * zz - c1 * zz + c0, k), k)
        known += -ck * hh**k * (1 / slope)
    lead = -1 / (1 - (beta if get_method(method).has_momentum else sp.Integer(0)))
    return tuple(sp.factor(_coeff(known, n + 1).as_expr() / lead) for n in range(1, order + 1))


# ----------------------------------------------------------------------- noisy quadratic model
@functools.lru_cache(maxsize=None)
def nqm_statistics(method, max_lag=1):
    """Stationary NQM statistics per mode from the symbolic Lyapunov equation, in (h, β, λ, σ²):

    dict with ``iterate_var`` (Var x), ``full_grad_sq`` (E(λx)²), ``grad_sq`` (E g²),
    ``lag`` (tuple: E g_k g_{k+j}, j = 1..max_lag) and ``corr`` (tuple: lag_j / grad_sq).
    """
    A, B, C = linear_step(method)
    n = A.shape[0]
    ps = sp.symbols(f"p0:{n * n}")
    P = sp.Matrix(n, n, lambda i, j: ps[min(i, j) * n + max(i, j)])
    unknowns = sorted({P[i, j] for i in range(n) for j in range(n)}, key=str)
    eqs = list(P - A * P * A.T - sigma2 * B * B.T)
    sol = sp.solve(eqs, unknowns, dict=True)[0]
    P = P.subs(sol)
    full = (C * P * C.T)[0, 0]
    cross = A * P * C.T + sigma2 * B  # E[s_{k+1} g_k]
    lags, power = [], sp.eye(n)
    for _ in range(max_lag):
        lags.append((C * power * cross)[0, 0])
        power = A * power
    out = {"iterate_var": P[0, 0], "full_grad_sq": full, "grad_sq": full + sigma2,
           "lag": tuple(lags)}
    out = {k: (tuple(sp.factor(_in_h(e)) for e in v) if isinstance(v, tuple) else sp.factor(_in_h(v)))
           for k, v in out.items()}
    out["corr"] = tuple(sp.factor(sp.simplify(e / out["grad_sq"])) for e in out["lag"])
    return out


# ----------------------------------------------------------------------- numbers
def numeric(expr, *args):
    """Lambdify ``expr`` in the given symbols (numpy, broadcasting)."""
    f = sp.lambdify(args, expr, "numpy")
    return lambda *vals: np.asarray(f(*vals), dtype=float) + 0.0 * sum(np.asarray(v, float) for v in vals)


@functools.lru_cache(maxsize=None)
def stability_edge(method):
    """Numeric f(momentum) of :func:`stability_edge_expr`."""
    return numeric(stability_edge_expr(method), beta)


@functools.lru_cache(maxsize=None)
def char_coeffs(method):
    """Numeric f(h, momentum) -> (c₁, c₀)."""
    c1, c0 = (numeric(e, h, beta) for e in char_coeffs_expr(method))
    return lambda hh, bb: (c1(hh, bb), c0(hh, bb))


@functools.lru_cache(maxsize=None)
def regime_boundaries(method):
    """Numeric f(momentum) -> tuple of discriminant zeros in h."""
    fs = [numeric(e, beta) for e in regime_boundaries_expr(method)]
    return lambda bb: tuple(f(bb) for f in fs)


@functools.lru_cache(maxsize=None)
def modified_loss_coefficient(method):
    """Numeric f(lr, momentum) -> c."""
    return numeric(alpha * modified_loss_coefficient_expr(method), alpha, beta)


@functools.lru_cache(maxsize=None)
def nqm(method, max_lag=1):
    """Numeric NQM statistics: dict of f(h, momentum, lam, sigma2) (tuples for lag/corr)."""
    stats = nqm_statistics(method, max_lag)
    return {k: (tuple(numeric(e, h, beta, lam, sigma2) for e in v) if isinstance(v, tuple)
                else numeric(v, h, beta, lam, sigma2)) for k, v in stats.items()}


def report(order=3):
    """Text table of the derived modified-equation coefficients (for the lead's note)."""
    lines = []
    for method in METHOD_NAMES:
        lines.append(f"{method}: c/alpha = {modified_loss_coefficient_expr(method)}")
        k_a, k_b = second_order_coefficients(method)
        lines.append(f"{method}: F2 = -alpha^2/(1-beta) [k_a H^2 grad f + k_b D3f(grad f, grad f)], "
                     f"k_a = {k_a}, k_b = {k_b}")
        lines.append(f"{method}: slow-rate series kappa_1..{order} = {slow_rate_series(method, order)}")
    return "\n".join(lines)
