r"""Exact linear theory of GD, heavy ball and Nesterov on a quadratic (docs/theory.md §2).

On one Hessian eigen-direction, :math:`f(x) = \lambda x^2/2`, with :math:`h = \alpha\lambda`,
every method obeys :math:`x_{k+1} = c_1 x_k - c_0 x_{k-1}`, where :math:`(c_1, c_0)` come
from :meth:`dynamics.methods.Method.char_coeffs` (the single source of the update rules):

- GD:  :math:`c_1 = 1-h`, :math:`c_0 = 0`
- HB:  :math:`c_1 = 1+\beta-h`, :math:`c_0 = \beta`
- NAG: :math:`c_1 = (1+\beta)(1-h)`, :math:`c_0 = \beta(1-h)`

The roots :math:`z_{1,2}` of :math:`z^2 - c_1 z + c_0` decide everything: the rate
:math:`\rho = \max|z_i|` (complex roots: :math:`\rho = \sqrt{c_0}`, their product; Goh's
Distill article prints :math:`2\sqrt\beta`, which is wrong), the regime, the stability
edge, and the closed-form trajectory.

All functions broadcast over numpy arrays of ``h`` and ``momentum`` (and ``lam``, ``lr``,
``x0`` for the trajectories); GD ignores the value of ``momentum`` but still validates it
and broadcasts over its shape, so one grid serves all three methods.

Example::

    >>> import numpy as np
    >>> from dynamics import quadratic as q
    >>> q.regime("hb", [0.01, 1.0, 2.95, 4.5], 0.5).tolist()
    ['monotone', 'ripple', 'flip', 'divergent']
    >>> float(q.spectral_radius("hb", 1.0, 0.81))  # complex roots: sqrt(beta)
    0.9
    >>> float(q.stability_edge("nag", 0.5))
    1.5
    >>> x = q.simulate("nag", lam=np.array([1.0, 10.0]), lr=0.1, momentum=0.9, x0=1.0, steps=50)
    >>> x.iterates.shape
    (51, 2)
    >>> bool(np.allclose(x.iterates, q.closed_form("nag", np.array([1.0, 10.0]), 0.1, 0.9, 1.0, 50).iterates))
    True
"""

from typing import NamedTuple

import numpy as np

from dynamics._checks import as_float, broadcast, check_momentum, check_positive
from dynamics.methods import get_method

REGIMES = ("monotone", "ripple", "flip", "divergent")
MONOTONE, RIPPLE, FLIP, DIVERGENT = range(4)


# --------------------------------------------------------------------------- validation
def _nonneg(name, value):
    """``value`` as a float array, checked >= 0 and finite by cheap reductions; the slow
    elementwise check in dynamics._checks runs only to word the error."""
    v = as_float(name, value)
    if v.size and not (v.min() >= 0 and v.max() < np.inf):
        check_positive(name, v, allow_zero=True)
    return v


def _momentum(value):
    m = as_float("momentum", value)
    if m.size and not (m.min() >= 0 and m.max() < 1):
        check_momentum(m)
    return m


def _prepare(method, h, momentum, check_values=True):
    """Validated (Method, h, momentum); a shape mismatch names both parameters. With
    ``check_values=False`` the caller checks the values itself (block by block)."""
    method = get_method(method)
    if check_values:
        h, momentum = _nonneg("h", h), _momentum(momentum)
    else:
        h, momentum = as_float("h", h), as_float("momentum", momentum)
    try:
        np.broadcast_shapes(h.shape, momentum.shape)
    except ValueError:
        broadcast(h=h, momentum=momentum)
    return method, h, momentum


# --------------------------------------------------------------------------- edges
def stability_edge(method, momentum=0.0):
    r"""Largest stable :math:`h`: the iteration contracts iff :math:`0 < h < ` edge.

    GD: 2; HB: :math:`2(1+\beta)`; NAG: :math:`2(1+\beta)/(1+2\beta)` (Jury criterion,
    docs/theory.md §2). At the edge a real root sits at :math:`-1`. Broadcasts over momentum.
    """
    method = get_method(method)
    b = _momentum(momentum)
    if method.name == "gd":
        return np.full_like(b, 2.0)
    if method.name == "hb":
        return 2.0 * (1.0 + b)
    return 2.0 * (1.0 + b) / (1.0 + 2.0 * b)


# --------------------------------------------------------------------------- roots
def iteration_matrix(method, h, momentum=0.0):
    r"""The companion matrix :math:`T = [[c_1, -c_0], [1, 0]]`, shape ``(..., 2, 2)``.

    It maps the state :math:`(x_k, x_{k-1})` to :math:`(x_{k+1}, x_k)`; norms of its
    powers (e.g. the transient gain) are measured in these coordinates.
    """
    method, h, momentum = _prepare(method, h, momentum)
    c1, c0 = method.char_coeffs(h, momentum)
    T = np.empty(c1.shape + (2, 2))
    T[..., 0, 0], T[..., 0, 1], T[..., 1, 0], T[..., 1, 1] = c1, -c0, 1.0, 0.0
    return T


def _roots_from_coeffs(c1, c0):
    """Roots of z^2 - c1 z + c0, dominant first, without cancellation."""
    disc = c1 * c1 - 4.0 * c0
    sq = np.sqrt(np.abs(disc))
    real = disc >= 0
    # Real roots: q = (c1 + sign(c1) sqrt(disc))/2 is the dominant one; the other is c0/q
    # (Vieta), which avoids the cancellation in (c1 - sign(c1) sqrt(disc))/2.
    q = 0.5 * (c1 + np.where(c1 >= 0, sq, -sq))
    with np.errstate(divide="ignore", invalid="ignore"):
        other = np.where(q != 0, c0 / np.where(q != 0, q, 1.0), 0.0)
    z1 = np.where(real, q + 0j, 0.5 * (c1 + 1j * sq))
    z2 = np.where(real, other + 0j, 0.5 * (c1 - 1j * sq))
    return np.stack([z1, z2], axis=-1)


def char_roots(method, h, momentum=0.0):
    r"""Roots of :math:`z^2 - c_1 z + c_0`, complex, shape ``(..., 2)``.

    Ordered by modulus, dominant first. Ties: a complex pair lists the root with
    positive imaginary part first; a real pair of equal modulus (only ``c_1 = 0``)
    lists the sign of ``c_1 >= 0`` (positive) first. GD's roots are :math:`1-h` and 0.
    """
    method, h, momentum = _prepare(method, h, momentum)
    return _roots_from_coeffs(*method.char_coeffs(h, momentum))


def spectral_radius(method, h, momentum=0.0, return_regime=False):
    r"""Asymptotic rate :math:`\rho = \max_i |z_i|` per point.

    Real arithmetic on the discriminant :math:`d = c_1^2 - 4c_0`: complex roots
    (:math:`d < 0`) have :math:`\rho = \sqrt{c_0}`; real ones
    :math:`\rho = (|c_1| + \sqrt d)/2`. With ``return_regime=True`` also returns the
    regime codes (int8, indices into :data:`REGIMES`, see :func:`regime`), computed from
    the same discriminant.
    """
    # values are checked block by block, while the block is in cache: a separate pass of
    # min/max reductions over a 10^7 grid would cost a third of the whole computation
    method, h, momentum = _prepare(method, h, momentum, check_values=False)

    def kernel(h, b, rho, code=None):
        _rate_block(*method.char_coeffs(_nonneg("h", h), _momentum(b)), rho, code)

    dtypes = (float, np.int8) if return_regime else (float,)
    out = _blockwise(kernel, (h, momentum), dtypes)
    return out if return_regime else out[0]


_BLOCK = 1 << 14  # elements per block: a block's temporaries stay in the L2 cache


def _blockwise(kernel, inputs, out_dtypes):
    """Apply ``kernel(*input_blocks, *output_blocks)`` over cache-sized blocks of the
    broadcast inputs; the kernel writes into the output blocks (which it may receive as
    n-d arrays) and broadcasts the input blocks itself. Every temporary pass runs in
    cache, not main memory, and the peak extra memory is the outputs plus a few blocks.

    Inputs that all have the full shape (C-contiguous) are cut into flat slices; otherwise
    the blocks are runs of whole rows along the first axis, each input sliced there unless
    it broadcasts along it."""
    inputs = [np.asarray(a, dtype=float) for a in inputs]
    shape = np.broadcast_shapes(*(a.shape for a in inputs))
    outs = [np.empty(shape, dtype=t) for t in out_dtypes]
    if all(a.shape == shape and a.flags.c_contiguous for a in inputs) or len(shape) < 2:
        flat = [np.broadcast_to(a, shape).reshape(-1) if a.shape != shape else a.reshape(-1)
                for a in inputs] + [o.reshape(-1) for o in outs]
        for i in range(0, max(flat[0].size, 1), _BLOCK):
            kernel(*(a[i:i + _BLOCK] for a in flat))
    else:
        inputs = [a.reshape((1,) * (len(shape) - a.ndim) + a.shape) for a in inputs]
        rows = max(1, _BLOCK // max(1, int(np.prod(shape[1:]))))
        for i in range(0, shape[0], rows):
            kernel(*(a[i:i + rows] if a.shape[0] > 1 else a for a in inputs),
                   *(o[i:i + rows] for o in outs))
    return tuple(o[()] for o in outs)


def _rate_block(c1, c0, rho, code=None):
    r"""rho (and regime codes) of z^2 - c1 z + c0 on one block, into ``rho`` / ``code``.

    With p = c1/2 and q = p^2 - c0 (a quarter of the discriminant): real roots
    (q >= 0) have rho = |p| + sqrt(q), complex ones rho = sqrt(c0). Branch-free (masked
    numpy operations cost ~40x a plain pass) with one square root:
    rho = |p [q >= 0]| + sqrt(max(q, c0 [q < 0]))."""
    p = c1 * 0.5
    q = p * p
    q -= c0
    complex_ = q < 0.0
    p *= q >= 0.0  # p [real]: keeps the sign of the dominant real root, 0 if complex
    np.abs(p, out=rho)
    np.maximum(q, np.multiply(c0, complex_), out=q)
    np.sqrt(q, out=q)
    rho += q
    if code is None:
        return
    # codes MONOTONE 0, RIPPLE 1, FLIP 2, DIVERGENT 3: ripple if complex, else flip if the
    # dominant root (sign of c1) is negative; then divergent (bitwise or 3) if rho >= 1.
    neg = (p < 0.0).view(np.int8)
    np.add(neg, neg, out=code)
    code += complex_.view(np.int8)
    diverged = (rho >= 1.0).view(np.int8)
    diverged *= np.int8(DIVERGENT)
    code |= diverged


def ripple_band(method, momentum=0.0):
    r"""``(h_lo, h_hi)``: the roots are complex (regime "ripple") iff h_lo < h < h_hi.

    Where the discriminant :math:`c_1^2 - 4c_0` vanishes:

    - HB: :math:`((1-\sqrt\beta)^2, (1+\sqrt\beta)^2)` (docs/theory.md §2);
    - NAG: :math:`d = (1-h)[(1+\beta)^2(1-h) - 4\beta]`, so
      :math:`(((1-\beta)/(1+\beta))^2, 1)`; at h = 1 both roots are 0 and for
      h > 1 they are real with opposite signs, the negative one dominant (flip);
    - GD: no complex roots; returns (1, 1), the monotone/flip boundary.

    Below h_lo the regime is monotone, above h_hi flip, until the stability edge.
    """
    method = get_method(method)
    b = _momentum(momentum)
    if method.name == "gd":
        return np.ones_like(b), np.ones_like(b)
    if method.name == "hb":
        s = np.sqrt(b)
        return (1.0 - s) ** 2, (1.0 + s) ** 2
    return ((1.0 - b) / (1.0 + b)) ** 2, np.ones_like(b)


def regime_code(method, h, momentum=0.0):
    """Regime as int8 codes, indices into :data:`REGIMES`."""
    return spectral_radius(method, h, momentum, return_regime=True)[1]


def regime(method, h, momentum=0.0):
    r"""Regime per point: "monotone", "ripple", "flip" or "divergent".

    Same root classification for all methods (docs/theory.md §2):

    - "divergent": :math:`\rho \ge 1` — not contracting. This includes the edge itself
      (a root at :math:`-1`) and the marginal :math:`h = 0` (a root at 1, x stays put).
    - "ripple": complex roots (:math:`c_1^2 < 4c_0`), sign pattern rotates by the root's
      angle per step.
    - "monotone": real roots, dominant one :math:`\ge 0`; "flip": real, dominant
      :math:`< 0` (sign alternates every step).

    Ties: a double root (:math:`c_1^2 = 4c_0`) counts as real, so HB's boundaries
    :math:`h = (1\mp\sqrt\beta)^2` belong to "monotone" and "flip" respectively, as in
    docs/theory.md; :math:`c_1 = 0` with real roots (GD and NAG at :math:`h=1`: both roots 0,
    one-step convergence) counts as monotone. Points within rounding of a boundary are
    classified by the computed sign of the discriminant and of :math:`\rho - 1` (at a
    computed stability edge :math:`\rho` may round to just below 1).
    """
    return np.asarray(REGIMES)[regime_code(method, h, momentum)]


# --------------------------------------------------------------------------- optima
def optimal_hyperparameters(method, mu, L):
    r"""``(lr, momentum, rate)`` minimising the worst-case rate :math:`\max_{\mu\le\lambda\le L}\rho`.

    With :math:`\kappa = L/\mu` (docs/theory.md §2):

    - GD:  :math:`\alpha = 2/(L+\mu)`, rate :math:`(\kappa-1)/(\kappa+1)` (momentum 0).
    - HB:  :math:`\alpha = (2/(\sqrt L+\sqrt\mu))^2`,
      :math:`\beta = ((\sqrt\kappa-1)/(\sqrt\kappa+1))^2`, rate :math:`\sqrt\beta`.
    - NAG: :math:`\alpha = 4/(3L+\mu)`, :math:`\beta = (\sqrt{3\kappa+1}-2)/(\sqrt{3\kappa+1}+2)`,
      rate :math:`1 - 2/\sqrt{3\kappa+1}` (Lessard, Recht & Packard 2016).

    Broadcasts over ``mu`` and ``L``; requires :math:`0 < \mu \le L`.
    """
    method = get_method(method)
    mu = check_positive("mu", mu)
    L = check_positive("L", L)
    mu, L = broadcast(mu=mu, L=L)
    if np.any(L < mu):
        bad = L[L < mu]
        raise ValueError(f"L={bad.min():g} is outside the valid range [mu, inf) (mu={mu[L < mu].min():g})")
    kappa = L / mu
    if method.name == "gd":
        return 2.0 / (L + mu), np.zeros_like(kappa), (kappa - 1.0) / (kappa + 1.0)
    if method.name == "hb":
        sk = np.sqrt(kappa)
        rate = (sk - 1.0) / (sk + 1.0)
        return (2.0 / (np.sqrt(L) + np.sqrt(mu))) ** 2, rate**2, rate
    s = np.sqrt(3.0 * kappa + 1.0)
    return 4.0 / (3.0 * L + mu), (s - 2.0) / (s + 2.0), 1.0 - 2.0 / s


# --------------------------------------------------------------------------- transient gain
def _norm2x2(a, b, c, d, det):
    """Largest singular value of [[a, b], [c, d]] given its determinant."""
    f = a * a + b * b + c * c + d * d
    return np.sqrt(0.5 * (f + np.sqrt(np.maximum(f * f - 4.0 * det * det, 0.0))))


def max_transient_gain(method, h, momentum=0.0, max_steps=100_000, rtol=1e-12,
                       return_step=False):
    r"""Worst-case amplification :math:`G = \max_{k\ge0} \|T^k\|_2` (:math:`G \ge 1`, k = 0).

    :math:`T` is the companion matrix of :func:`iteration_matrix`, so the gain is measured
    on the state :math:`(x_k, x_{k-1})`; in these coordinates even GD has
    :math:`G = \sqrt{1 + (1-h)^2}` for :math:`0 < h < 2`, the state carrying the previous
    iterate. By Cayley–Hamilton
    :math:`T^k = [[u_k, -c_0u_{k-1}], [u_{k-1}, -c_0u_{k-2}]]` with the scalar recurrence
    :math:`u_k = c_1u_{k-1} - c_0u_{k-2}`, :math:`u_{-1} = 0`, :math:`u_0 = 1`, so each step
    costs a few vector operations over the points still running.

    The k-range is decided per point, not fixed: a point stops at step k once an upper
    bound on :math:`\sup_{k'\ge k}\|T^{k'}\|` is within ``rtol`` of the running maximum, so
    the result is the supremum to relative accuracy ``rtol``. Two bounds, the smaller used:

    - :math:`|u_j| \le (j+1)\rho^j` (u_j is a sum of j+1 products of roots) and
      :math:`|c_0| \le \rho^2` give :math:`\|T^k\|_F \le 2(k+1)\rho^{k-1}`, unimodal in k
      with its peak at :math:`k^* = -1/\ln\rho - 1` (valid at double roots);
    - for distinct roots, :math:`T^k = z_1^kP_1 + z_2^kP_2` with spectral projectors
      :math:`P_1 = (T - z_2)/(z_1 - z_2)` etc., so
      :math:`\|T^{k'}\| \le |z_1|^k\|P_1\|_F + |z_2|^k\|P_2\|_F` for all :math:`k' \ge k`
      (tight once the subdominant mode has died out).

    Points still undecided after ``max_steps`` steps keep the running maximum (a lower
    bound) and a RuntimeWarning says how many. Points with :math:`\rho \ge 1` get
    ``inf``: there is no transient, the norm does not decay. With ``return_step=True``
    also returns the k at which the maximum is attained (-1 where ``inf``).
    """
    method, h, momentum = _prepare(method, h, momentum)
    c1, c0 = (c.reshape(-1).copy() for c in method.char_coeffs(h, momentum))
    shape = np.broadcast_shapes(h.shape, momentum.shape)
    (rho,) = _blockwise(_rate_block, (c1, c0), (float,))
    gain = np.full(c1.shape, np.inf)
    argmax = np.full(c1.shape, -1)
    idx = np.flatnonzero(rho < 1.0)
    c1, c0, rho = c1[idx], c0[idx], rho[idx]
    z = _roots_from_coeffs(c1, c0)
    z1, z2 = z[:, 0], z[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = np.abs(z1 - z2)
        frob = lambda w: np.sqrt(np.abs(c1 - w) ** 2 + c0 * c0 + 1.0 + np.abs(w) ** 2)
        p1 = np.where(gap > 0, frob(z2) / gap, np.inf)
        p2 = np.where(gap > 0, frob(z1) / gap, np.inf)
        kstar = np.where(rho > 0, -1.0 / np.log(rho) - 1.0, -1.0)
    a1, a2 = np.abs(z1), np.abs(z2)
    best, kbest = np.ones_like(rho), np.zeros(rho.shape, dtype=int)  # k = 0: ||I|| = 1
    u_prev2, u_prev, det = np.zeros_like(rho), np.ones_like(rho), np.ones_like(rho)
    k = 0
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        while idx.size and k < max_steps:
            k += 1
            u = c1 * u_prev - c0 * u_prev2
            det = det * c0
            norm = _norm2x2(u, -c0 * u_prev, u_prev, -c0 * u_prev2, det)
            better = norm > best
            best = np.where(better, norm, best)
            kbest = np.where(better, k, kbest)
            u_prev2, u_prev = u_prev, u
            if k % 16 and k < max_steps:
                continue
            kn = k + 1.0
            univ = 2.0 * (np.maximum(kn, kstar) + 1.0) * rho ** (np.maximum(kn, kstar) - 1.0)
            proj = a1**kn * p1 + a2**kn * p2
            done = np.fmin(univ, proj) <= best * (1.0 + rtol)  # fmin: 0 * inf at z1 = z2 = 0
            if k >= max_steps and not done.all():
                import warnings

                warnings.warn(f"max_transient_gain: {np.count_nonzero(~done)} points undecided "
                              f"after max_steps={max_steps}; returning a lower bound there",
                              RuntimeWarning, stacklevel=2)
                done[:] = True
            gain[idx[done]], argmax[idx[done]] = best[done], kbest[done]
            keep = ~done
            idx, c1, c0, rho, kstar, a1, a2, p1, p2 = (
                v[keep] for v in (idx, c1, c0, rho, kstar, a1, a2, p1, p2))
            best, kbest, u_prev2, u_prev, det = (
                v[keep] for v in (best, kbest, u_prev2, u_prev, det))
    gain, argmax = gain.reshape(shape)[()], argmax.reshape(shape)[()]
    return (gain, argmax) if return_step else gain


# --------------------------------------------------------------------------- trajectories
class Trajectory(NamedTuple):
    r"""Iterates and gradients, each of shape ``(steps + 1, *batch)``; ``gradients[k]`` is
    :math:`\lambda x_k`, the gradient at iterate k (the last one is not applied)."""

    iterates: np.ndarray
    gradients: np.ndarray


def _trajectory_inputs(method, lam, lr, momentum, x0, steps, buf0):
    method = get_method(method)
    if not (isinstance(steps, (int, np.integer)) and steps >= 0):
        raise ValueError(f"steps={steps!r} is outside the valid range: integers >= 0")
    lam, lr, momentum = _nonneg("lam", lam), _nonneg("lr", lr), _momentum(momentum)
    buf0 = 0.0 if buf0 is None else buf0
    lam, lr, momentum, x0, buf0 = broadcast(lam=lam, lr=lr, momentum=momentum, x0=x0, buf0=buf0)
    return method, lam, lr, momentum, x0.copy(), buf0.copy()


def simulate(method, lam, lr, momentum, x0, steps, buf0=None):
    r"""Iterate the method on :math:`f(x) = \sum_i \lambda_i x_i^2/2` (a diagonal Hessian).

    ``lam``, ``lr``, ``momentum``, ``x0`` (and the initial momentum buffer ``buf0``,
    default 0 as in PyTorch) broadcast to one batch shape of any rank: a batch of problems,
    a vector of coordinates, or both. The only Python loop is over steps; each step is
    :meth:`dynamics.methods.Method.update`. Returns a :class:`Trajectory`
    ``(iterates, gradients)`` of shape ``(steps + 1, *batch)``. Divergence overflows to
    inf/nan silently: it is a result, not an error.

    A state :math:`(x_0, x_{-1})` of :func:`iteration_matrix` is reached with
    ``buf0 = state_buffer(...)``.
    """
    method, lam, lr, momentum, x, buf = _trajectory_inputs(method, lam, lr, momentum, x0, steps, buf0)
    xs = np.empty((steps + 1,) + x.shape)
    xs[0] = x
    with np.errstate(over="ignore", invalid="ignore"):
        for k in range(steps):
            step, buf = method.update(lam * x, buf, lr, momentum)
            x = x + step
            xs[k + 1] = x
        return Trajectory(xs, lam * xs)


def state_buffer(method, lam, lr, momentum, x0, x_prev):
    r"""The momentum buffer :math:`b_{-1}` that makes :func:`simulate` start from the
    companion state :math:`(x_0, x_{-1})`, i.e. :math:`x_1 = c_1x_0 - c_0x_{-1}`.

    HB: :math:`x_0 - x_{-1} = -\alpha b_{-1}`. NAG: :math:`b_{-1} = ((x_{-1} - x_0)/\alpha
    - \lambda x_{-1})/\beta`, which needs :math:`\beta > 0` (NAG with :math:`\beta = 0` is GD,
    whose state is :math:`x_0` alone). Needs lr > 0.
    """
    method = get_method(method)
    lam, lr, momentum = _nonneg("lam", lam), check_positive("lr", lr), _momentum(momentum)
    x0, x_prev = np.asarray(x0, dtype=float), np.asarray(x_prev, dtype=float)
    if method.name == "gd":
        return np.zeros(np.broadcast_shapes(x0.shape, x_prev.shape))
    b = (x_prev - x0) / lr
    if method.name == "nag":
        if np.any(momentum == 0):
            raise ValueError("momentum=0 is outside the valid range (0, 1) for a NAG state")
        b = (b - lam * x_prev) / momentum
    return b


def _power_sums(z1, z2, n):
    r""":math:`u_j = \sum_{i=0}^j z_1^iz_2^{j-i} = z_1^j\,\mathrm{expm1}((j+1)\ell)/\mathrm{expm1}(\ell)`,
    :math:`\ell = \log(z_2/z_1)`, for j = 0..n-1, shape ``(n, *batch)``.

    The expm1 ratio is the numerically stable divided difference
    :math:`(z_1^{j+1} - z_2^{j+1})/(z_1 - z_2)`: it tends to :math:`(j+1)z^j` at a double
    root without cancellation, so no perturbation is needed there; ``l = 0`` (an exact
    double root) and :math:`z_2 = 0` (GD) are the limits written out.
    """
    j = np.arange(n).reshape((n,) + (1,) * z1.ndim)
    nz = z1 != 0
    safe1 = np.where(nz, z1, 1.0)
    r = np.where(nz, z2 / safe1, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ell = np.log(np.where(r != 0, r, 1.0))
        denom = np.expm1(ell)
        ratio = np.where(denom != 0, np.expm1((j + 1) * ell) / np.where(denom != 0, denom, 1.0),
                         j + 1.0)
    ratio = np.where(r != 0, ratio, 1.0)  # z2 = 0: u_j = z1^j
    u = safe1**j * ratio
    return np.where(nz, u, (j == 0) * 1.0)  # z1 = z2 = 0: u_0 = 1, u_j = 0 after


def closed_form(method, lam, lr, momentum, x0, steps, buf0=None):
    r"""The trajectory of :func:`simulate` from the roots, without iterating.

    With :math:`x_1` from one :meth:`Method.update` and :math:`u_j` the power sums of the
    roots (:func:`_power_sums`), Cayley–Hamilton gives
    :math:`x_k = u_{k-1}x_1 - c_0u_{k-2}x_0` (:math:`u_{-1} = 0`), valid for distinct and
    double roots alike. Relative error against :func:`simulate` grows like
    :math:`k\epsilon` (powers via exp/log) plus the conditioning of the roots.
    """
    method, lam, lr, momentum, x0, buf = _trajectory_inputs(method, lam, lr, momentum, x0, steps, buf0)
    step, _ = method.update(lam * x0, buf, lr, momentum)
    x1 = x0 + step
    h = lr * lam
    _, c0 = method.char_coeffs(h, momentum)
    z = _roots_from_coeffs(*method.char_coeffs(h, momentum))
    xs = np.empty((steps + 1,) + x0.shape)
    xs[0] = x0
    if steps:
        u = _power_sums(z[..., 0], z[..., 1], steps).real  # u_0 .. u_{steps-1}
        u_before = np.concatenate([np.zeros((1,) + u.shape[1:]), u[:-1]])  # u_{k-2}
        with np.errstate(over="ignore", invalid="ignore"):
            xs[1:] = u * x1 - c0 * u_before * x0
    with np.errstate(over="ignore", invalid="ignore"):
        return Trajectory(xs, lam * xs)
