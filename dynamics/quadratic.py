r"""Exact linear theory of GD, heavy ball and Nesterov on a quadratic (THEORY.md §2).

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
"""

import numpy as np

from dynamics._checks import broadcast, check_momentum, check_positive
from dynamics.methods import get_method

REGIMES = ("monotone", "ripple", "flip", "divergent")
MONOTONE, RIPPLE, FLIP, DIVERGENT = range(4)


# --------------------------------------------------------------------------- validation
def _nonneg(name, value):
    """``value`` as a float array, checked >= 0 and finite by cheap reductions; the slow
    elementwise check in dynamics._checks runs only to word the error."""
    v = np.asarray(value, dtype=float)
    if v.size and not (v.min() >= 0 and v.max() < np.inf):
        check_positive(name, v, allow_zero=True)
    return v


def _momentum(value):
    m = np.asarray(value, dtype=float)
    if m.size and not (m.min() >= 0 and m.max() < 1):
        check_momentum(m)
    return m


def _prepare(method, h, momentum):
    """Validated (Method, h, momentum); a shape mismatch names both parameters."""
    method = get_method(method)
    h, momentum = _nonneg("h", h), _momentum(momentum)
    try:
        np.broadcast_shapes(h.shape, momentum.shape)
    except ValueError:
        broadcast(h=h, momentum=momentum)
    return method, h, momentum


# --------------------------------------------------------------------------- edges
def stability_edge(method, momentum=0.0):
    r"""Largest stable :math:`h`: the iteration contracts iff :math:`0 < h < ` edge.

    GD: 2; HB: :math:`2(1+\beta)`; NAG: :math:`2(1+\beta)/(1+2\beta)` (Jury criterion,
    THEORY.md §2). At the edge a real root sits at :math:`-1`. Broadcasts over momentum.
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
    method, h, momentum = _prepare(method, h, momentum)
    c1, c0 = method.char_coeffs(h, momentum)
    rho, code = _rate_and_regime(c1, c0, want_regime=return_regime)
    return (rho, code) if return_regime else rho


def _rate_and_regime(c1, c0, want_regime=True):
    shape = c1.shape
    c1, c0 = c1.reshape(-1), c0.reshape(-1)  # 1-d so that out= works for 0-d input too
    disc = c1 * c1
    disc -= 4.0 * c0
    complex_ = disc < 0
    rho = np.abs(c1)
    np.maximum(disc, 0.0, out=disc)
    np.sqrt(disc, out=disc)
    rho += disc
    rho *= 0.5
    np.copyto(rho, np.sqrt(np.maximum(c0, 0.0)), where=complex_)
    if not want_regime:
        return rho.reshape(shape)[()], None
    code = np.where(c1 >= 0, np.int8(MONOTONE), np.int8(FLIP))
    code[complex_] = RIPPLE
    code[rho >= 1.0] = DIVERGENT
    return rho.reshape(shape)[()], code.reshape(shape)[()]


def regime_code(method, h, momentum=0.0):
    """Regime as int8 codes, indices into :data:`REGIMES`."""
    return spectral_radius(method, h, momentum, return_regime=True)[1]


def regime(method, h, momentum=0.0):
    r"""Regime per point: "monotone", "ripple", "flip" or "divergent".

    Same root classification for all methods (THEORY.md §2):

    - "divergent": :math:`\rho \ge 1` — not contracting. This includes the edge itself
      (a root at :math:`-1`) and the marginal :math:`h = 0` (a root at 1, x stays put).
    - "ripple": complex roots (:math:`c_1^2 < 4c_0`), sign pattern rotates by the root's
      angle per step.
    - "monotone": real roots, dominant one :math:`\ge 0`; "flip": real, dominant
      :math:`< 0` (sign alternates every step).

    Ties: a double root (:math:`c_1^2 = 4c_0`) counts as real, so HB's boundaries
    :math:`h = (1\mp\sqrt\beta)^2` belong to "monotone" and "flip" respectively, as in
    THEORY.md; :math:`c_1 = 0` with real roots (GD and NAG at :math:`h=1`: both roots 0,
    one-step convergence) counts as monotone. Points within rounding of a boundary are
    classified by the computed sign of the discriminant.
    """
    return np.asarray(REGIMES)[regime_code(method, h, momentum)]
