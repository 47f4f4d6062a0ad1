r"""Modified-equation ODEs for GD, heavy ball and Nesterov, integrated with ``solve_ivp``.

Time is :math:`t = k\alpha` (step k of learning rate :math:`\alpha`). For momentum
:math:`\beta` (0 for GD) and the look-ahead :math:`a` (0 for GD/HB, :math:`\beta` for NAG),
docs/theory.md §3 (Kovachki & Stuart 2021; Barrett & Dherin 2021; Ghosh et al. 2023):

- ``"first_order"``:   :math:`\dot x = -\nabla f(x)/(1-\beta)`
- ``"inertial"``:      :math:`\tfrac{\alpha(1+\beta)}{2}\ddot x + (1-\beta)\dot x
  + \nabla f(x + a\alpha\dot x) = 0`
- ``"modified_loss"``: :math:`\dot x = -\nabla\big[f + c\,\|\nabla f\|^2\big]/(1-\beta)`,
  :math:`c` from :func:`modified_loss_coefficient`, :math:`\nabla\|\nabla f\|^2 = 2H\nabla f`.

The look-ahead :math:`a\alpha\dot x` in the inertial ODE is what makes it second-order
accurate for NAG: expanding :math:`\nabla f(x + a\alpha\dot x) = \nabla f + a\alpha H\dot x`
and reducing to the slow manifold gives exactly the NAG coefficient of docs/theory.md §3.3
(:math:`\alpha(1+\beta)/4 - \alpha\beta(1-\beta)/2 = \alpha(1-\beta+2\beta^2)/4`, over
:math:`(1-\beta)^2`); without it the NAG inertial ODE would carry HB's coefficient and be
only first-order accurate. It costs no Hessian-vector product.

Which sequence the ODEs describe. The discrete iteration is PyTorch's (:mod:`dynamics.methods`,
gradient at the iterate). docs/theory.md §3 writes NAG as
:math:`x_{k+1} = x_k + \beta(x_k-x_{k-1}) - \alpha\nabla f(x_k + \beta(x_k-x_{k-1}))`;
PyTorch's NAG iterate is the look-ahead point :math:`y_k = x_k + \beta v_k` of that sequence
(:math:`v_k = x_k - x_{k-1} = -\alpha b_{k-1}`). Both :math:`x_k` and :math:`y_k` follow the
same modified flow to :math:`O(\alpha^2)`: with :math:`y = x + \alpha\beta\dot x`, the
:math:`\alpha\beta H\nabla f` terms cancel in :math:`\dot y` (and on a quadratic both obey
the same linear recurrence). So the ODEs here are compared with PyTorch's iterates directly,
started at PyTorch's initial parameters; the order tests confirm the claimed orders.

Initial conditions (``start``):

- ``"manifold"``: the slow manifold :math:`v_0 = -\alpha\nabla f(x_0)/(1-\beta)`. In PyTorch's
  buffer form that is the initial buffer :math:`b_{-1} = \nabla f(x_0)/(1-\beta)` (then the
  first update keeps :math:`b_0 = \nabla f(x_0)/(1-\beta)`), for HB and NAG alike; the
  inertial ODE starts at :math:`\dot x(0) = -\nabla f(x_0)/(1-\beta)`. Global error over a
  fixed horizon: :math:`O(\alpha)` for ``first_order``, :math:`O(\alpha^2)` for ``inertial``
  and ``modified_loss``.
- ``"zero"``: PyTorch's default, :math:`b_{-1} = 0`; the inertial ODE starts at
  :math:`\dot x(0) = 0`. The initial layer shifts the iterate by :math:`O(\alpha)`
  (HB: :math:`\alpha\beta\nabla f(x_0)/(1-\beta)^2`), so every approximation is only
  :math:`O(\alpha)` accurate (docs/theory.md §3). GD has no buffer: ``start`` only changes the
  inertial ODE's :math:`\dot x(0)`.
- ``"zero_shifted"``: the iteration as for ``"zero"``, the ODEs started on their slow
  manifold at the point the zero-momentum iterates lag behind to,
  :math:`x_0 + \alpha c_b\nabla f(x_0)/(1-\beta)^2` (:func:`initial_layer_shift`;
  :math:`c_b` multiplies :math:`b_{k-1}` in PyTorch's step: β for HB, β² for NAG). The
  missing velocity decays like :math:`\beta^k` and its sum is that lag, up to
  :math:`O(\alpha^2)`. So past the initial layer (on :math:`t \ge t_0` for a fixed
  :math:`t_0 > 0`, where :math:`\beta^{t_0/\alpha}` is negligible) ``inertial`` and
  ``modified_loss`` are :math:`O(\alpha^2)` accurate for PyTorch's default start again; the
  max over all steps stays :math:`O(\alpha)` (the offset at t = 0). Only :func:`solve_flow`
  takes it; :func:`global_error` compares the :data:`STARTS`.

:func:`order` states these orders; ``tests/test_modified.py`` measures them.

A loss is any object with ``grad(x)`` (shape (d,) -> (d,)) and optionally ``hvp(x, v)``
(needed by ``modified_loss``; without it a central difference of ``grad`` is used, with
step :math:`\epsilon^{1/3}\max(1,\|x\|)/\|v\|`, relative error about 1e-10) and
``hessian(x)`` ((d, d); passed to implicit solvers as the Jacobian). :class:`Loss` bundles
callables; :func:`quadratic_loss`, :func:`logistic_loss`, :func:`quartic_loss` and
:func:`rosenbrock_loss` are the test problems.

Example::

    >>> import numpy as np
    >>> loss = quadratic_loss([1.0, 0.5])
    >>> study = global_error(loss, np.ones(2), "hb", [1e-3, 2e-3], 0.5, horizon=1.0)
    >>> study.errors.shape          # (kinds, starts, lrs)
    (3, 2, 2)
"""

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from scipy.integrate import solve_ivp
from scipy.stats import linregress
from threadpoolctl import threadpool_limits

from dynamics._checks import check_momentum, check_positive
from dynamics.methods import get_method

KINDS = ("first_order", "inertial", "modified_loss")
STARTS = ("manifold", "zero")  # what global_error compares; solve_flow also takes "zero_shifted"
# The inertial ODE is stiff for small h = αλ: its fast rate 2(1-β)/(α(1+β)) dwarfs the slow
# rate λ/(1-β), so it needs a method that switches to (or is) implicit. Measured at rtol 1e-10
# (3-D quadratic, β=0.9), LSODA's cost stays ~600-1500 evaluations for lr from 1e-3 to 1e-5
# where DOP853 grows like 1/lr (25000 at 1e-5); Radau needs ~5000-8000 (Newton iterations);
# BDF ~550-1250 evaluations but 2-3x LSODA's wall time (Python-level steps; d = 100).
# LSODA's stiffness switching is erratic for GD's inertial ODE (β = 0: up to 14000
# evaluations on the quartic loss); pass ode_method="BDF" for predictable cost there.
DEFAULT_ODE_METHOD = {"first_order": "LSODA", "inertial": "LSODA", "modified_loss": "LSODA"}


@dataclass(frozen=True)
class Loss:
    """A loss on R^d by its callables: ``grad(x)``, optional ``hvp(x, v)``, ``hessian(x)``,
    ``value(x)``."""

    grad: Callable
    hvp: Optional[Callable] = None
    hessian: Optional[Callable] = None
    value: Optional[Callable] = None
    name: str = "loss"


def _check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is unknown; valid: {', '.join(KINDS)}")
    return kind


def _check_start(start, valid=STARTS):
    if start not in valid:
        raise ValueError(f"start={start!r} is unknown; valid: {', '.join(valid)}")
    return start


def order(kind, start="manifold", method="hb"):
    """Theoretical global-error order (power of lr) over a fixed horizon, docs/theory.md §3."""
    _check_kind(kind)
    _check_start(start)
    if kind == "first_order":
        return 1
    if start == "manifold" or (kind == "modified_loss" and not get_method(method).has_momentum):
        return 2
    return 1


def modified_loss_coefficient(method, lr, momentum):
    r"""c in the modified loss :math:`f + c\|\nabla f\|^2` (docs/theory.md §3.3), broadcast.

    GD: :math:`\alpha/4`; HB: :math:`\alpha(1+\beta)/(4(1-\beta)^2)`;
    NAG: :math:`\alpha(1-\beta+2\beta^2)/(4(1-\beta)^2)`.
    """
    m = get_method(method)
    lr = check_positive("lr", lr)
    b = check_momentum(momentum) if m.has_momentum else np.zeros_like(np.asarray(momentum, float))
    top = (1.0 - b + 2.0 * b**2) if m.nesterov else (1.0 + b)
    return lr * top / (4.0 * (1.0 - b) ** 2)


def check_loss(loss, x0):
    """Validate ``x0`` (finite, shape (d,)) and the loss's callables on it, once.

    Returns a :class:`Loss` whose callables return float arrays. A callable that returns the
    wrong shape raises ValueError naming it.
    """
    x0 = np.asarray(x0, dtype=float)
    if x0.ndim != 1 or x0.size == 0 or not np.all(np.isfinite(x0)):
        raise ValueError(f"x0 must be a finite 1-D array with at least one entry; got shape {x0.shape}")
    if not callable(getattr(loss, "grad", None)):
        raise ValueError(f"loss={loss!r} has no callable 'grad'")

    def checked(name, fn, *args, shape):
        out = np.asarray(fn(*args), dtype=float)
        if out.shape != shape:
            raise ValueError(f"loss.{name} returned shape {out.shape} for x of shape {x0.shape}; "
                             f"expected {shape}")
        return out

    g0 = checked("grad", loss.grad, x0, shape=x0.shape)
    hvp = getattr(loss, "hvp", None)
    hessian = getattr(loss, "hessian", None)
    if hvp is not None:
        checked("hvp", hvp, x0, g0, shape=x0.shape)
    if hessian is not None:
        checked("hessian", hessian, x0, shape=(x0.size, x0.size))
    grad = loss.grad
    if not (isinstance(g0, np.ndarray) and np.asarray(grad(x0)).dtype == np.float64):
        grad = lambda x, raw=grad: np.asarray(raw(x), dtype=float)  # noqa: E731
    return Loss(grad=grad, hvp=hvp, hessian=hessian, value=getattr(loss, "value", None),
                name=getattr(loss, "name", "loss"))


def _hvp(loss, x, v):
    if loss.hvp is not None:
        return np.asarray(loss.hvp(x, v), dtype=float)
    norm = np.linalg.norm(v)
    if norm == 0.0:
        return np.zeros_like(v)
    eps = np.finfo(float).eps ** (1 / 3) * max(1.0, np.linalg.norm(x)) / norm
    return (loss.grad(x + eps * v) - loss.grad(x - eps * v)) / (2.0 * eps)


def _validate(method, lr, momentum, horizon):
    m = get_method(method)
    lr = float(check_positive("lr", lr))
    beta = float(check_momentum(momentum)) if m.has_momentum else 0.0
    horizon = float(check_positive("horizon", horizon))
    steps = int(np.floor(horizon / lr * (1 + 1e-12)))
    if steps < 1:
        raise ValueError(f"horizon={horizon:g} is shorter than one step lr={lr:g}; valid: horizon >= lr")
    return m, lr, beta, steps


def initial_layer_shift(loss, x0, method, lr, momentum):
    """α c_b ∇f(x0)/(1-β)²: how far behind the slow manifold iterates started from zero
    momentum settle (module docstring); c_b is read off :meth:`Method.update`."""
    m = get_method(method)
    if not m.has_momentum:
        return np.zeros_like(np.asarray(x0, dtype=float))
    lr = float(check_positive("lr", lr))
    beta = float(check_momentum(momentum))
    c_b = -float(m.update(0.0, 1.0, lr, beta)[0]) / lr  # step = -lr (c_g g + c_b b_{k-1})
    return lr * c_b * check_loss(loss, x0).grad(np.asarray(x0, dtype=float)) / (1.0 - beta) ** 2


def iterate(loss, x0, method, lr, momentum, steps, start="zero"):
    """The discrete iteration x_0..x_steps, shape (steps+1, d), with PyTorch's rule
    (:meth:`dynamics.methods.Method.update`). ``start="manifold"`` sets the initial buffer to
    ∇f(x0)/(1-β) (see module docstring); "zero" and "zero_shifted" leave it at 0. After
    divergence (a non-finite iterate) the rows are NaN."""
    _check_start(start, STARTS + ("zero_shifted",))
    m = get_method(method)
    loss = check_loss(loss, x0)
    x = np.asarray(x0, dtype=float).copy()
    lr = float(check_positive("lr", lr))
    beta = float(check_momentum(momentum)) if m.has_momentum else 0.0
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps={steps!r} is outside the valid range: integers >= 0")
    buf = m.init(x)
    if start == "manifold" and m.has_momentum:
        buf = loss.grad(x) / (1.0 - beta)
    out = np.full((int(steps) + 1, x.size), np.nan)
    out[0] = x
    update, grad = m.update, loss.grad
    with np.errstate(over="ignore", invalid="ignore"):
        for k in range(1, int(steps) + 1):
            step, buf = update(grad(x), buf, lr, beta)
            x = x + step
            out[k] = x
            if k % 256 == 0 and not np.isfinite(x).all():  # checked in blocks: it is hot
                break
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        out[np.argmax(bad):] = np.nan
    return out


@dataclass(frozen=True)
class FlowSolution:
    """An ODE solution at the discrete times t_k = k·lr: ``x`` has shape (steps+1, d)."""

    t: np.ndarray
    x: np.ndarray
    nfev: int
    njev: int
    success: bool
    message: str


def _rhs(kind, loss, m, lr, beta):
    if kind == "first_order":
        return lambda t, x: -loss.grad(x) / (1.0 - beta)
    if kind == "modified_loss":
        c = float(modified_loss_coefficient(m, lr, beta))

        def rhs(t, x):
            g = loss.grad(x)
            return -(g + 2.0 * c * _hvp(loss, x, g)) / (1.0 - beta)
        return rhs
    a = beta if m.nesterov else 0.0
    k = 2.0 / (lr * (1.0 + beta))

    def inertial(t, y):
        x, u = y[: y.size // 2], y[y.size // 2:]
        return np.concatenate([u, -k * ((1.0 - beta) * u + loss.grad(x + a * lr * u))])
    return inertial


def _jacobian(kind, loss, m, lr, beta):
    if loss.hessian is None or kind == "modified_loss":
        return None  # finite differences inside the solver
    if kind == "first_order":
        return lambda t, x: -loss.hessian(x) / (1.0 - beta)
    a = beta if m.nesterov else 0.0
    k = 2.0 / (lr * (1.0 + beta))

    def jac(t, y):
        x, u = np.split(y, 2)
        d = x.size
        hess = loss.hessian(x + a * lr * u)
        out = np.zeros((2 * d, 2 * d))
        out[:d, d:] = np.eye(d)
        out[d:, :d] = -k * hess
        out[d:, d:] = -k * ((1.0 - beta) * np.eye(d) + a * lr * hess)
        return out
    return jac


def solve_flow(kind, loss, x0, method, lr, momentum, horizon, start="manifold",
               ode_method=None, rtol=1e-10, atol=1e-12):
    """Integrate one modified-equation ODE over [0, horizon] with ``solve_ivp`` and return it
    at t_k = k·lr (:class:`FlowSolution`, with the solver's nfev/njev).

    ``kind`` is one of :data:`KINDS`; ``start`` (:data:`STARTS` or "zero_shifted") sets
    :math:`\\dot x(0)` of the inertial ODE, and "zero_shifted" moves x(0) by
    :func:`initial_layer_shift`. ``ode_method`` (any ``solve_ivp`` method) defaults to
    :data:`DEFAULT_ODE_METHOD` [kind].
    """
    _check_kind(kind)
    _check_start(start, STARTS + ("zero_shifted",))
    m, lr, beta, steps = _validate(method, lr, momentum, horizon)
    loss = check_loss(loss, x0)
    x0 = np.asarray(x0, dtype=float)
    if start == "zero_shifted":
        x0 = x0 + initial_layer_shift(loss, x0, m, lr, beta)
    y0 = x0
    if kind == "inertial":
        u0 = np.zeros_like(x0) if start == "zero" else -loss.grad(x0) / (1.0 - beta)
        y0 = np.concatenate([x0, u0])
    t = lr * np.arange(steps + 1)
    ode_method = ode_method or DEFAULT_ODE_METHOD[kind]
    kwargs = {}
    jac = _jacobian(kind, loss, m, lr, beta)
    if jac is not None and ode_method in ("Radau", "BDF", "LSODA"):
        kwargs["jac"] = jac
    # The implicit solvers factor small dense (2d x 2d) matrices at many steps: threaded BLAS
    # only adds overhead there (measured 50x slower, d = 100, on a shared 2-core machine).
    with threadpool_limits(1, user_api="blas"):
        sol = solve_ivp(_rhs(kind, loss, m, lr, beta), (0.0, t[-1]), y0, method=ode_method,
                        t_eval=t, rtol=rtol, atol=atol, **kwargs)
    x = np.full((steps + 1, x0.size), np.nan)
    x[: sol.y.shape[1]] = sol.y[: x0.size].T
    return FlowSolution(t=t, x=x, nfev=int(sol.nfev), njev=int(sol.njev), success=bool(sol.success),
                        message=str(sol.message))


def fit_order(lrs, errors):
    """Log-log slope of error vs lr and its standard error: (slope, stderr)."""
    lrs, errors = np.asarray(lrs, float), np.asarray(errors, float)
    if lrs.shape != errors.shape or lrs.size < 3:
        raise ValueError(f"lrs and errors need the same shape with >= 3 points; "
                         f"got {lrs.shape}, {errors.shape}")
    fit = linregress(np.log(lrs), np.log(errors))
    return float(fit.slope), float(fit.stderr)


@dataclass(frozen=True)
class ErrorStudy:
    """Global errors max_k ‖x_k − x(t_k)‖₂ of each approximation over a fixed horizon.

    ``errors`` and ``nfev`` have shape (len(kinds), len(starts), len(lrs)).
    """

    method: str
    momentum: float
    horizon: float
    lrs: np.ndarray
    kinds: tuple
    starts: tuple
    errors: np.ndarray
    nfev: np.ndarray

    def error(self, kind, start="manifold"):
        return self.errors[self.kinds.index(kind), self.starts.index(start)]

    def slope(self, kind, start="manifold"):
        """(fitted order, its standard error) for one approximation."""
        return fit_order(self.lrs, self.error(kind, start))

    def expected_order(self, kind, start="manifold"):
        return order(kind, start, self.method)


def global_error(loss, x0, method, lrs, momentum, horizon, kinds=KINDS, starts=STARTS,
                 ode_method=None, rtol=1e-10, atol=1e-12):
    """Max-over-steps error of each ODE in ``kinds`` against the discrete iteration started
    as in ``starts``, for each lr, over the fixed time horizon (t = k·lr ≤ horizon).

    Returns an :class:`ErrorStudy`; :meth:`ErrorStudy.slope` fits the order. The tolerances
    must sit well below the smallest error measured (defaults: rtol 1e-10, atol 1e-12).
    """
    lrs = np.atleast_1d(check_positive("lrs", lrs)).astype(float)
    kinds = tuple(_check_kind(k) for k in kinds)
    starts = tuple(_check_start(s) for s in starts)
    loss = check_loss(loss, x0)
    shape = (len(kinds), len(starts), lrs.size)
    errors, nfev = np.full(shape, np.nan), np.zeros(shape, dtype=int)
    with threadpool_limits(1, user_api="blas"):  # small dense algebra: see solve_flow
        _fill_errors(loss, x0, method, lrs, momentum, horizon, kinds, starts, ode_method, rtol, atol,
                     errors, nfev)
    return ErrorStudy(method=get_method(method).name, momentum=float(momentum), horizon=float(horizon),
                      lrs=lrs, kinds=kinds, starts=starts, errors=errors, nfev=nfev)


def _fill_errors(loss, x0, method, lrs, momentum, horizon, kinds, starts, ode_method, rtol, atol,
                 errors, nfev):
    for il, lr in enumerate(lrs):
        m, lr, beta, steps = _validate(method, lr, momentum, horizon)
        solved = {}  # only the inertial ODE depends on the start
        for js, start in enumerate(starts):
            discrete = iterate(loss, x0, m, lr, beta, steps, start)
            for ik, kind in enumerate(kinds):
                key = (kind, start if kind == "inertial" else None)
                if key not in solved:
                    solved[key] = solve_flow(kind, loss, x0, m, lr, beta, horizon, start,
                                             ode_method, rtol, atol)
                errors[ik, js, il] = np.max(np.linalg.norm(discrete - solved[key].x, axis=1))
                nfev[ik, js, il] = solved[key].nfev


# --- test problems -------------------------------------------------------------------------

def quadratic_loss(eigenvalues, seed=None):
    """f(x) = ½ xᵀAx with the given eigenvalues; A diagonal, or rotated by a seeded random
    orthogonal matrix when ``seed`` is given."""
    lam = check_positive("eigenvalues", eigenvalues).ravel()
    q = np.eye(lam.size)
    if seed is not None:
        q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((lam.size, lam.size)))
    a = (q * lam) @ q.T
    return Loss(grad=lambda x: a @ x, hvp=lambda x, v: a @ v, hessian=lambda x: a,
                value=lambda x: 0.5 * x @ a @ x, name="quadratic")


def logistic_loss(n=200, d=5, l2=0.1, seed=0):
    """Mean logistic loss on fixed seeded Gaussian data with labels from a random teacher,
    plus (l2/2)‖w‖²: smooth, strongly convex, not quadratic."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = np.sign(X @ rng.standard_normal(d) + 0.5 * rng.standard_normal(n))
    Z = y[:, None] * X

    def sig(z):
        return 0.5 * (1.0 + np.tanh(0.5 * z))

    def weights(w):
        s = sig(Z @ w)
        return s * (1.0 - s)

    return Loss(grad=lambda w: -Z.T @ sig(-(Z @ w)) / n + l2 * w,
                hvp=lambda w, v: Z.T @ (weights(w) * (Z @ v)) / n + l2 * v,
                hessian=lambda w: (Z.T * weights(w)) @ Z / n + l2 * np.eye(d),
                value=lambda w: np.mean(np.logaddexp(0.0, -(Z @ w))) + 0.5 * l2 * w @ w,
                name="logistic")


def quartic_loss(eigenvalues, gamma=1.0, seed=0):
    """f(x) = ½ xᵀAx + (γ/4)‖x‖⁴ with A rotated (seeded): non-separable, not quadratic."""
    quad = quadratic_loss(eigenvalues, seed)
    a = quad.hessian(None)
    d = a.shape[0]
    return Loss(grad=lambda x: a @ x + gamma * (x @ x) * x,
                hvp=lambda x, v: a @ v + gamma * ((x @ x) * v + 2.0 * (x @ v) * x),
                hessian=lambda x: a + gamma * ((x @ x) * np.eye(d) + 2.0 * np.outer(x, x)),
                value=lambda x: 0.5 * x @ a @ x + 0.25 * gamma * (x @ x) ** 2, name="quartic")


def rosenbrock_loss(b=2.0):
    """Rosenbrock-type f(x, y) = ½(1−x)² + (b/2)(y − x²)², minimum at (1, 1)."""
    def grad(p):
        x, y = p
        r = y - x * x
        return np.array([-(1.0 - x) - 2.0 * b * x * r, b * r])

    def hessian(p):
        x, y = p
        return np.array([[1.0 - 2.0 * b * (y - x * x) + 4.0 * b * x * x, -2.0 * b * x],
                         [-2.0 * b * x, b]])

    return Loss(grad=grad, hvp=lambda p, v: hessian(p) @ v, hessian=hessian,
                value=lambda p: 0.5 * (1 - p[0]) ** 2 + 0.5 * b * (p[1] - p[0] ** 2) ** 2,
                name="rosenbrock")
