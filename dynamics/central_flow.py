r"""Central flows of GD, heavy ball and Nesterov at the edge of stability (``solve_ivp``).

The model (docs/theory.md §8; Cohen, Damian, Talwalkar, Kolter & Lee, "Understanding
Optimization in Deep Learning with Central Flows", ICLR 2025, for GD; the momentum version is
derived below and in docs/theory_central_flow.md). Time is :math:`t = k\eta` (step k of
learning rate :math:`\eta`), as in :mod:`dynamics.modified`; momentum :math:`\beta` (0 for GD),
PyTorch's convention (:mod:`dynamics.methods`).

**Split of the iterate.** Near the edge the discrete iterate is
:math:`w_k = \bar w(t_k) + (-1)^k\,U\delta_k`: a slowly moving time average :math:`\bar w` and a
period-2 oscillation in the span of the top eigenvectors :math:`U` (d×m) of :math:`H(\bar w)`,
with slowly varying amplitude :math:`\delta_k \in R^m`. The oscillation covariance is
:math:`\Sigma = E[\delta\delta^\top] \succeq 0` (m×m; one eigenvalue: :math:`\sigma^2`, the
variance of the iterate along u). Taylor to second order in :math:`\delta` gives the gradient

.. math:: \nabla L(w_k) = \nabla L(\bar w) + (-1)^k H U\delta_k
          + \tfrac12 \nabla^3 L[U\delta_k, U\delta_k] + O(\delta^3),

and :math:`\nabla^3L[u_i, u_j] = \nabla(u_i^\top H u_j)` for fixed :math:`u_i, u_j`
(for one eigenvalue :math:`\nabla^3 L[u,u] = \nabla S`, Hellmann–Feynman). Averaged over two
steps the oscillating term cancels: :math:`\bar g = \nabla L(\bar w)
+ \tfrac12\sum_{ij}\Sigma_{ij}\nabla(u_i^\top H u_j)`.

**Mean motion (all three methods).** Average PyTorch's update over two steps with the mean
gradient :math:`\bar g` slowly varying. HB: :math:`w_{k+1}-w_k = \beta(w_k-w_{k-1}) - \eta g_k`
gives :math:`(1-\beta)\,d\bar w/dk = -\eta\bar g`. NAG in PyTorch's form,
:math:`w_{k+1}-w_k = \beta(w_k-w_{k-1}) - \eta[(1+\beta)g_k - \beta g_{k-1}]`, averages to the
same, since :math:`(1+\beta)-\beta = 1`. In :math:`t = k\eta`:

.. math:: \frac{d\bar w}{dt} = -\frac{1}{1-\beta}\Big[\nabla L(\bar w)
          + \tfrac12\sum_{ij}\Sigma_{ij}\nabla(u_i^\top H u_j)\Big].

With :math:`\Sigma = 0` this is *exactly* the first-order modified flow
(``dynamics.modified``, kind ``"first_order"``): the stable flow.

**Edge.** The oscillating part of the buffer :math:`b_k = \beta b_{k-1} + g_k` has amplitude
:math:`S\delta/(1+\beta)` for a gradient amplitude :math:`S\delta`; the period-2 mode
:math:`w_{k+1}-w_k = -2(-1)^k\delta` then needs :math:`\eta S = 2` (GD), :math:`2(1+\beta)` (HB),
:math:`2(1+\beta)/(1+2\beta)` (NAG, whose step carries :math:`g_k + \beta b_k`, amplitude
:math:`S\delta(1+2\beta)/(1+\beta)`): the edges :math:`S^* = h^*/\eta` of
:func:`dynamics.quadratic.stability_edge`. The central flow holds the eigenvalues that reach
:math:`S^*` there.

**Choosing Σ.** :math:`\Sigma` is supported on the eigenspace at the edge and keeps it from
rising: with :math:`M(w) = U^\top H(w) U` (U frozen), :math:`\Sigma\succeq 0`,
:math:`dM/dt \preceq 0`, :math:`\langle\Sigma, dM/dt\rangle = 0`. Since
:math:`(dM/dt)_{ij} = -\langle\nabla(u_i^\top Hu_j), r\rangle/(2(1-\beta))` with the residual
:math:`r = 2\nabla L + \sum_{ij}\Sigma_{ij}\nabla(u_i^\top Hu_j)`, these are exactly the
optimality conditions of the convex problem

.. math:: \min_{\Sigma\succeq 0}\; \Big\|2\nabla L(\bar w) + \sum_{ij}\Sigma_{ij}
          \nabla(u_i^\top H u_j)\Big\|^2 .

One eigenvalue: ``scipy.optimize.nnls`` gives :math:`\sigma^2 = \max(0,
-2\langle\nabla S,\nabla L\rangle/\|\nabla S\|^2)` (docs/theory.md §8), the same for all three
methods: the factor :math:`1/(1-\beta)` cancels. Several: the problem is solved over
:math:`\Sigma = LL^\top` with ``scipy.optimize.minimize`` (Burer–Monteiro with full rank m,
whose local minima are global for a convex objective) at each event. Between events the set
of eigenvalues at the edge is fixed and Σ solves the equality-constrained (least-squares)
problem, smooth in :math:`\bar w`, so ``solve_ivp`` integrates a smooth field;
``solve_ivp`` events end a segment when the next eigenvalue reaches :math:`S^*` (entering)
or when the least eigenvalue of Σ reaches 0 (leaving), and the integration restarts with the
new set.

**What σ² means for the iterate.** :math:`\Sigma` is the covariance of PyTorch's iterate
along U. For NAG PyTorch's iterate *is* the look-ahead point at which the gradient is taken
(docs/theory.md §1), so the oscillation the gradient sees is the iterate's own: no extra
factor. The sketch's factor :math:`1+2\beta` relates it to the other (Sutskever) sequence
:math:`x_{k+1} = w_k - \eta g_k`, whose period-2 amplitude is :math:`1/(1+2\beta)` of the
iterate's (:func:`sutskever_amplitude_ratio`); tests measure both.

**Predictions** (time averages over the oscillation, :class:`Prediction`): loss
:math:`L(\bar w) + \tfrac12 S^*\operatorname{tr}\Sigma`; squared gradient norm
:math:`\|\bar g\|^2 + S^{*2}\operatorname{tr}\Sigma` (the cross term averages out; it can
grow while the loss falls), with the time-averaged gradient :math:`\bar g` above in place of
docs/theory.md §8's :math:`\nabla L(\bar w)` (they differ by
:math:`\tfrac12\sigma^2\nabla S`; :func:`predict`); per block B (index slices) the
oscillation energy :math:`S^{*2}\operatorname{tr}(U_B\Sigma U_B^\top)` and the lag-1
correlation of successive gradients :math:`(\|\bar g_B\|^2 - S^{*2}\operatorname{tr}(U_B\Sigma
U_B^\top)) / (\|\bar g_B\|^2 + S^{*2}\operatorname{tr}(U_B\Sigma U_B^\top))`: the
oscillating part flips sign every step, the mean part persists. Same formulas for GD, HB and NAG, with each
method's :math:`S^*`.

Assumptions: the oscillation is period-2 and small (third-order Taylor terms in δ dropped,
:math:`O(\eta)` discretisation errors of the mean motion dropped, as in the first-order flow);
the mean gradient and Σ vary slowly over the momentum's memory :math:`1/(1-\beta)` steps; the
start is below the edge and on the slow manifold of the sharp directions (their fast
transient at h ~ 1, which the flow does not resolve, shifts the slow coordinates by O(1));
time averages run over several self-stabilisation cycles (Damian, Nichani & Lee, ICLR 2023),
which the discrete runs describe around the flow. The flow does not determine the
fluctuation of the squared amplitude over those cycles (:func:`predict`'s
``amplitude_var``). Measured in ``tests/test_central_flow.py`` with the loss scaled so that
the edge stays at the same point as lr shrinks (docs/theory_central_flow.md): errors in loss,
sharpness and σ² fall 2-11x from lr 0.02 to 0.005.

A loss is an object with ``grad(w)``, ``hvp(w, v)``, ``top_eigs(w, k) -> (values, vectors)``
(descending, vectors as columns; optionally a keyword ``tol``, a relative residual tolerance
for iterative solvers, which the entering event loosens far from the edge:
:func:`solve_central_flow`'s ``adaptive_eigs``), ``grad_sharpness(w)`` (:math:`\nabla S` for the unit top
eigenvector), and, for several eigenvalues at the edge, ``grad_quadform(w, u, v)``
(:math:`\nabla(u^\top H(w) v)`, u and v fixed); optionally ``value(w)``.
:class:`ToyLoss` is one with everything in closed form.

Example::

    >>> import numpy as np
    >>> loss = sharpening_toy(scale=100.0)           # edge of GD at lr 0.01 is S* = 200
    >>> flow = solve_central_flow(loss, loss.w0, "gd", lr=0.01, momentum=0.0, horizon=30.0)
    >>> [kind for _, kind, _ in flow.events]
    ['enter', 'leave']
    >>> bool(np.allclose(flow.eigenvalues[flow.active == 1, 0], 200.0, rtol=1e-6))
    True
"""

import inspect
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.integrate import solve_ivp
from scipy.optimize import minimize, nnls

from dynamics._checks import check_momentum, check_positive
from dynamics.methods import get_method
from dynamics.quadratic import stability_edge


# --------------------------------------------------------------------------- closed forms
def edge_sharpness(method, lr, momentum=0.0):
    r""":math:`S^* = h^*/\eta`: 2/η (GD), 2(1+β)/η (HB), 2(1+β)/((1+2β)η) (NAG), broadcast."""
    m = get_method(method)
    return stability_edge(m, momentum if m.has_momentum else 0.0) / check_positive("lr", lr)


def sutskever_amplitude_ratio(method, momentum=0.0):
    r"""Period-2 amplitude at the edge of PyTorch's iterate (where the gradient is taken) over
    that of the other sequence of the method's two-sequence form: for NAG the Sutskever
    sequence :math:`x_{k+1} = w_k - \eta g_k` (PyTorch's iterate is its look-ahead point),
    ratio :math:`1+2\beta` (from :math:`1 - \eta S^* = -1/(1+2\beta)`). GD and HB take the
    gradient at their only sequence: 1."""
    m = get_method(method)
    b = check_momentum(momentum) if m.has_momentum else np.zeros_like(np.asarray(momentum, float))
    return 1.0 + 2.0 * b if m.nesterov else np.ones_like(b)


def start_lag_steps(method, momentum=0.0):
    r"""Steps by which a run started from zero momentum lags the flow started at the same
    point: :math:`c_b/(1-\beta)`, i.e. :math:`\beta/(1-\beta)` (HB), :math:`\beta^2/(1-\beta)`
    (NAG), 0 (GD), with :math:`c_b` read off :meth:`Method.update` as in
    :func:`dynamics.modified.initial_layer_shift`. For a constant gradient the zero-buffer
    iterate after K steps is :math:`w_0 - \eta g\,(K - c_b/(1-\beta))/(1-\beta)`: the flow from
    :math:`w_0` at time :math:`\eta(K - c_b/(1-\beta))`. The same first-order correction as
    the initial-layer shift of the start point, but as a shift of time it never leaves the
    trajectory (that shift, :math:`\eta c_b\nabla L(w_0)/(1-\beta)^2`, is far outside the
    region where it is linear on a network at β = 0.8)."""
    m = get_method(method)
    if not m.has_momentum:
        return 0.0
    beta = float(check_momentum(momentum))
    c_b = -float(m.update(0.0, 1.0, 1.0, beta)[0])
    return c_b / (1.0 - beta)


def time_averaged_loss(loss_mean, edge, sigma2):
    r""":math:`L(\bar w) + \tfrac12 S^*\operatorname{tr}\Sigma`, broadcast."""
    return np.asarray(loss_mean, float) + 0.5 * np.asarray(edge, float) * np.asarray(sigma2, float)


def time_averaged_grad_sq(grad_sq_mean, edge, sigma2):
    r""":math:`\|\nabla L(\bar w)\|^2 + S^{*2}\operatorname{tr}\Sigma`, broadcast (per block
    with the block's share of :math:`\operatorname{tr}\Sigma`)."""
    return np.asarray(grad_sq_mean, float) + np.asarray(edge, float) ** 2 * np.asarray(sigma2, float)


def lag1_correlation(mean_sq, osc_sq):
    r"""Lag-1 correlation :math:`(m - o)/(m + o)` of a persistent part of energy m and a
    sign-flipping part of energy o, broadcast; NaN where both are 0."""
    mean_sq, osc_sq = np.asarray(mean_sq, float), np.asarray(osc_sq, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (mean_sq - osc_sq) / (mean_sq + osc_sq)


def period_two_split(x, axis=0):
    r"""Split a sequence into its local mean :math:`(x_{k-1} + 2x_k + x_{k+1})/4` and the rest
    (the period-2 part): the filter removes :math:`(-1)^k` exactly and keeps linear trends.
    The first and last entries are NaN."""
    x = np.moveaxis(np.asarray(x, float), axis, 0)
    mean = np.full_like(x, np.nan)
    mean[1:-1] = 0.25 * (x[:-2] + 2.0 * x[1:-1] + x[2:])
    return np.moveaxis(mean, 0, axis), np.moveaxis(x - mean, 0, axis)


# --------------------------------------------------------------------------- Σ on the edge space
# Relative cut-off of the least-squares solves. Directions of Σ that move the averaged force
# by less than RCOND of the largest are not determined by the flow; the minimum-norm choice
# sets them to 0. Measured on two_edge_toy: the pair gradients of two separate sharp
# directions, in an eigenbasis rotated by 0.03 rad, have singular values 200, 200, 1.7e-5:
# inverting the last one put Σ_12 = 7.7 where Σ_11 = 0.0016, for a change of the force of 1e-4.
RCOND = 1e-6
def _pair_gradients(loss, w, vectors):
    """Columns ∇(u_iᵀHu_j) for i ≤ j, off-diagonal ones times √2 (so that the coefficient
    vector's norm is Σ's Frobenius norm: the least-squares solution is basis-free)."""
    m = vectors.shape[1]
    if m == 1:
        if callable(getattr(loss, "grad_quadform", None)):  # reuse u: no second eigensolve
            return np.asarray(loss.grad_quadform(w, vectors[:, 0], vectors[:, 0]), float)[:, None]
        return np.asarray(loss.grad_sharpness(w), float)[:, None]
    cols = []
    for i in range(m):
        for j in range(i, m):
            g = np.asarray(loss.grad_quadform(w, vectors[:, i], vectors[:, j]), float)
            cols.append(g if i == j else np.sqrt(2.0) * g)
    return np.stack(cols, axis=1)


def _unpack(coef, m):
    sigma = np.zeros((m, m))
    iu = np.triu_indices(m)
    scale = np.where(iu[0] == iu[1], 1.0, 1.0 / np.sqrt(2.0))
    sigma[iu] = coef * scale
    return sigma + np.triu(sigma, 1).T


def _pack(sigma):
    iu = np.triu_indices(sigma.shape[0])
    return sigma[iu] * np.where(iu[0] == iu[1], 1.0, np.sqrt(2.0))


def sigma_equality(grad, pair_grads):
    """Σ holding every eigenvalue of the edge space fixed (least squares, may be indefinite)."""
    coef = np.linalg.lstsq(pair_grads, -2.0 * grad, rcond=RCOND)[0]
    return _unpack(coef, int(round((np.sqrt(8 * pair_grads.shape[1] + 1) - 1) / 2)))


def sigma_complementarity(grad, pair_grads):
    r""":math:`\arg\min_{\Sigma\succeq0}\|2\nabla L + \sum\Sigma_{ij}\nabla(u_i^\top Hu_j)\|`
    (module docstring): ``nnls`` for one eigenvalue, ``minimize`` over :math:`\Sigma = LL^\top`
    for several."""
    m = int(round((np.sqrt(8 * pair_grads.shape[1] + 1) - 1) / 2))
    if m == 1:
        return np.array([[nnls(pair_grads, -2.0 * grad)[0][0]]])
    target = -2.0 * grad
    il = np.tril_indices(m)
    start = sigma_equality(grad, pair_grads)
    vals, vecs = np.linalg.eigh(start)
    start = (vecs * np.maximum(vals, 0.0)) @ vecs.T + 1e-6 * max(1.0, np.trace(np.abs(start))) * np.eye(m)

    def objective(lvec):
        low = np.zeros((m, m))
        low[il] = lvec
        r = pair_grads @ _pack(low @ low.T) - target
        # ||r||^2 has gradient 2<Γ, dΣ> with Γ = unpack(Gᵀr), so 4ΓL with respect to L
        return r @ r, (4.0 * _unpack(pair_grads.T @ r, m) @ low)[il]

    res = minimize(objective, np.linalg.cholesky(start)[il], jac=True, method="BFGS",
                   options={"gtol": 1e-12, "maxiter": 500})
    low = np.zeros((m, m))
    low[il] = res.x
    return low @ low.T


# --------------------------------------------------------------------------- the flow
@dataclass(frozen=True)
class CentralFlow:
    r"""A central flow sampled at ``t`` (t = k·lr). ``w`` (n, d): the time-averaged iterate;
    ``eigenvalues`` (n, k) the top k Hessian eigenvalues; ``sigma`` (n, m, m) the oscillation
    covariance in the basis ``vectors`` (n, d, m) of the edge space (zero-padded to the
    largest m reached); ``active`` (n,) how many eigenvalues sit at the edge; ``grad_mean``
    (n, d) the time-averaged gradient :math:`\nabla L + \tfrac12\sum\Sigma_{ij}\nabla(u_i^\top
    Hu_j) = -(1-\beta)\,d\bar w/dt`; ``events`` a
    list of (t, "enter"/"leave", new m); ``nfev`` gradient evaluations of the solver."""

    t: np.ndarray
    w: np.ndarray
    eigenvalues: np.ndarray
    sigma: np.ndarray
    vectors: np.ndarray
    active: np.ndarray
    grad_mean: np.ndarray
    edge: float
    method: str
    lr: float
    momentum: float
    events: list
    nfev: int
    segments: int
    success: bool
    message: str

    @property
    def sigma2(self):
        """tr Σ: the oscillation variance of the iterate (all of it along the edge space)."""
        return np.trace(self.sigma, axis1=1, axis2=2)


def _validate(loss, w0, method, lr, momentum, horizon):
    m = get_method(method)
    lr = float(check_positive("lr", lr))
    beta = float(check_momentum(momentum)) if m.has_momentum else 0.0
    horizon = float(check_positive("horizon", horizon))
    w0 = np.asarray(w0, dtype=float)
    if w0.ndim != 1 or w0.size == 0 or not np.all(np.isfinite(w0)):
        raise ValueError(f"w0=array of shape {w0.shape} is not valid; valid: a finite 1-D array with at least one entry")
    for name in ("grad", "top_eigs", "grad_sharpness"):
        if not callable(getattr(loss, name, None)):
            raise ValueError(f"loss={loss!r} has no callable {name!r}")
    return m, lr, beta, horizon, w0


def _edge_set(loss, w, edge, k, edge_rtol, eig=None):
    """Eigenpairs within edge_rtol of the edge, and Σ from the complementarity problem
    (``eig``: the top k eigenpairs at w if already computed)."""
    vals, vecs = loss.top_eigs(w, k) if eig is None else eig
    n_at = int(np.sum(vals >= edge * (1.0 - edge_rtol)))
    if n_at == 0:
        return 0
    if n_at == k:
        raise ValueError(f"max_edge={k - 1} eigenvalues at the edge is too few here; valid: raise max_edge")
    sigma = sigma_complementarity(np.asarray(loss.grad(w), float), _pair_gradients(loss, w, vecs[:, :n_at]))
    ev = np.linalg.eigvalsh(sigma)
    return int(np.sum(ev > 1e-9 * max(ev.max(), 1e-300)) if ev.max() > 0 else 0)


EVENT_TOL = 0.1  # the entering event's eigen-tolerance: EVENT_TOL·(S* − λ_prev)/S* (chosen on linreg)
EVENT_TOL_MAX = 1e-2  # ... at most this


def _takes_tol(loss):
    """Whether ``loss.top_eigs`` accepts the optional ``tol`` argument (or passes keywords on)."""
    try:
        params = inspect.signature(loss.top_eigs).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "tol" or p.kind is p.VAR_KEYWORD for p in params)


def solve_central_flow(loss, w0, method, lr, momentum, horizon, t_eval=None, max_edge=3,
                       ode_method="LSODA", rtol=1e-9, atol=1e-12, edge_rtol=1e-6, max_events=50,
                       lazy_eigs=True, adaptive_eigs=True):
    r"""Integrate the central flow of ``method`` (PyTorch's lr and momentum) from ``w0`` over
    [0, horizon] (t = k·lr) with ``solve_ivp``; returns a :class:`CentralFlow` sampled at
    ``t_eval`` (default: every step, t_k = k·lr).

    ``max_edge`` is the largest number of eigenvalues allowed at the edge together (the loss's
    top ``max_edge + 1`` eigenpairs are computed at the events and the samples; between events,
    with ``lazy_eigs``, only the m + 1 that a segment with m eigenvalues at the edge needs: its
    field needs m vectors, its entering event the (m+1)-th eigenvalue; ``lazy_eigs=False``
    computes all max_edge + 1 at every evaluation, the same flow at more cost). ``w0`` must lie
    below the edge: from above, the discrete method catapults first, which the central flow
    does not model.

    ``adaptive_eigs`` (for a loss whose ``top_eigs`` takes ``tol``, e.g. warm LOBPCG): the
    entering event needs the sign of :math:`\lambda_{m+1} - S^*`, not λ itself, so its
    eigen-solve gets the relative residual tolerance :math:`\tau = \min(c(S^*-\lambda_
    {prev})/S^*, \tau_{max})` (c = ``EVENT_TOL``, or ``adaptive_eigs``
    itself if it is a number in (0, 1); :math:`\tau_{max}` = ``EVENT_TOL_MAX``,
    :math:`\lambda_{prev}` the last value computed), the loss's own tolerance where τ is
    below its ``eig_tol``. A Ritz value θ with residual ‖r‖ lies within ‖r‖ of an eigenvalue
    of the symmetric H (the residual bound; Parlett, *The Symmetric Eigenvalue Problem*, ch. 4), here
    ‖r‖ ≤ τ·|θ_1|; the loose value is kept only if :math:`|S^* - \theta_{m+1}| >
    2\tau\max(|\theta_1|, S^*)` (the factor 2 covers θ_1 of the previous call, to which the
    loss's tolerance is relative), so its sign is the true one, else it is solved again at
    the loss's tolerance. Near the edge τ shrinks with the gap, so the root is found at full
    accuracy: the same events and flow as ``adaptive_eigs=False`` (every event solve at the
    loss's tolerance), to the eigen-solver's tolerance. As there, the bound holds for the
    eigenvalue each Ritz value tracks (a warm block can miss one rising from outside it;
    :class:`experiments.trace.central_flow_loss.NetworkLoss`). Field, samples and restarts
    always use the loss's tolerance.
    """
    m, lr, beta, horizon, w0 = _validate(loss, w0, method, lr, momentum, horizon)
    if int(max_edge) != max_edge or max_edge < 1:
        raise ValueError(f"max_edge={max_edge!r} is outside the valid range: integers >= 1")
    k = int(max_edge) + 1
    edge = float(edge_sharpness(m, lr, beta))
    eig0 = loss.top_eigs(w0, k)
    lam0 = eig0[0][0]
    if lam0 > edge * (1.0 + edge_rtol):
        raise ValueError(f"w0 has sharpness {lam0:g} above the edge {edge:g} of {m.name} at lr={lr:g}, "
                         f"momentum={beta:g}; valid: sharpness <= edge")
    if t_eval is None:
        t_eval = np.minimum(lr * np.arange(int(np.floor(horizon / lr * (1 + 1e-12))) + 1), horizon)
    t_eval = np.asarray(t_eval, float)
    if t_eval.ndim != 1 or np.any(np.diff(t_eval) < 0) or t_eval[0] < 0 or t_eval[-1] > horizon:
        raise ValueError(f"t_eval must be sorted within [0, horizon={horizon:g}]")
    speed = 1.0 / (1.0 - beta)
    memo = {}  # a few entries: the solver asks the field, then the events, at the same w

    if isinstance(adaptive_eigs, bool):
        factor = EVENT_TOL if adaptive_eigs else 0.0
    elif isinstance(adaptive_eigs, (int, float)) and 0 < adaptive_eigs < 1:
        factor = float(adaptive_eigs)
    else:
        raise ValueError(f"adaptive_eigs={adaptive_eigs!r} is not valid; valid: True, False or a factor c in (0, 1)")
    adaptive = factor > 0 and _takes_tol(loss)
    floor = float(getattr(loss, "eig_tol", 0.0) or 0.0)

    def eigs(w, n, tol=None):
        """Top n eigenpairs at w; ``tol`` None: the loss's tolerance."""
        key = ("eigs", w.tobytes())
        hit = memo.get(key)
        if hit is None or hit[0].size < n or (hit[2] is not None and (tol is None or hit[2] > tol)):
            if len(memo) > 4:
                memo.clear()
            size = n if lazy_eigs else max(n, k)
            memo[key] = (*(loss.top_eigs(w, size) if tol is None else loss.top_eigs(w, size, tol=tol)), tol)
        vals, vecs, _ = memo[key]
        return vals[:n], vecs[:, :n]

    last = {}  # the last λ_{m+1} the entering event computed (per segment)

    def event_eig(w, i):
        """λ_{i+1} (0-based i) with the event's adaptive tolerance (docstring)."""
        lam = last.get(i)
        tol = None
        if adaptive and lam is not None and lam < edge:
            tol = min(factor * (edge - lam) / edge, EVENT_TOL_MAX)
            tol = None if tol <= floor else tol
        vals = eigs(w, i + 1, tol)[0]
        if tol is not None and abs(edge - vals[i]) <= 2.0 * tol * max(abs(vals[0]), edge):
            vals = eigs(w, i + 1)[0]  # too close to call at τ: the loss's tolerance
        last[i] = float(vals[i])
        return last[i]

    def field(w, active):
        key = ("field", w.tobytes(), active)
        if key in memo:
            return memo[key]
        g = np.asarray(loss.grad(w), float)
        out = (g, None, None)
        if active:
            vecs = eigs(w, active)[1]
            pairs = _pair_gradients(loss, w, vecs)
            coef = np.linalg.lstsq(pairs, -2.0 * g, rcond=RCOND)[0]
            out = (g + 0.5 * pairs @ coef, _unpack(coef, active), vecs)
        memo[key] = out
        return out

    jac = None
    if callable(getattr(loss, "hessian", None)) and ode_method in ("LSODA", "BDF", "Radau"):
        # approximate Jacobian of the field: the stable flow's -H/(1-β) (exact below the edge);
        # the implicit solvers only use it in their Newton iterations
        def jac(t, w):
            return -speed * np.asarray(loss.hessian(w), float)

    ts, ws, acts, events = [], [], [], []
    t0, w_start, nfev, seg = 0.0, w0, 0, 0
    active = _edge_set(loss, w0, edge, k, edge_rtol, eig0)
    memo[("eigs", w0.tobytes())] = (*eig0, None)  # the first event call at w0
    message, success = "reached the horizon", True
    while True:
        seg += 1

        def rhs(t, w, active=active):
            return -speed * field(w, active)[0]

        last.clear()

        def enter(t, w, active=active):
            return event_eig(w, active) - edge
        enter.terminal, enter.direction = True, 1.0
        evs = [enter]
        if active > 0:
            def leave(t, w, active=active):
                return np.linalg.eigvalsh(field(w, active)[1])[0]
            leave.terminal, leave.direction = True, -1.0
            evs.append(leave)
        inside = t_eval[(t_eval >= t0) & (t_eval <= horizon)]
        sol = solve_ivp(rhs, (t0, horizon), w_start, method=ode_method, t_eval=inside, events=evs,
                        rtol=rtol, atol=atol, **({"jac": jac} if jac is not None else {}))
        nfev += int(sol.nfev)
        t_seg = np.asarray(sol.t, float)  # a segment may hold no sample (then sol.t is [])
        ts.append(t_seg)
        ws.append(np.asarray(sol.y, float).reshape(w0.size, -1).T)
        acts.append(np.full(t_seg.size, active))
        if sol.status != 1:
            success, message = sol.status == 0, str(sol.message)
            break
        hit = [i for i, te in enumerate(sol.t_events) if te.size]
        t_hit, w_hit = sol.t_events[hit[0]][0], sol.y_events[hit[0]][0]
        new = _edge_set(loss, w_hit, edge, k, edge_rtol)
        kind = "enter" if hit[0] == 0 else "leave"
        if kind == "leave" and new >= active:  # the event's root is just short of 0
            new = active - 1
        if kind == "enter" and new <= active:
            new = active + 1
        if new >= k:
            success, message = False, f"more than max_edge={k - 1} eigenvalues reached the edge"
            break
        events.append((float(t_hit), kind, int(new)))
        if len(events) >= max_events:
            success, message = False, f"max_events={max_events} events: stopped at t={t_hit:g}"
            break
        # samples exactly at t_hit belong to the segment that ended there
        t_eval = t_eval[t_eval > t_hit] if t_hit < horizon else t_eval
        t0, w_start, active = float(t_hit), w_hit, new
        if t0 >= horizon:
            break
    t = np.concatenate(ts)
    w = np.concatenate(ws)
    act = np.concatenate(acts)
    return _assemble(loss, t, w, act, edge, k, m, lr, beta, events, nfev, seg, success, message)


def _assemble(loss, t, w, act, edge, k, m, lr, beta, events, nfev, seg, success, message):
    """Eigenvalues, Σ and the edge basis at the sampled points: one call of the loss per point
    (the loss is a per-point oracle, e.g. a network)."""
    width = max(int(act.max()) if act.size else 0, 1)
    d = w.shape[1]
    eig = np.full((t.size, k), np.nan)
    sigma = np.zeros((t.size, width, width))
    vecs = np.zeros((t.size, d, width))
    grad_mean = np.empty_like(w)
    for i in range(t.size):
        vals, vv = loss.top_eigs(w[i], k)
        eig[i] = vals
        grad_mean[i] = g = np.asarray(loss.grad(w[i]), float)
        a = int(act[i])
        if a:
            pairs = _pair_gradients(loss, w[i], vv[:, :a])
            coef = np.linalg.lstsq(pairs, -2.0 * g, rcond=RCOND)[0]
            sigma[i, :a, :a] = _unpack(coef, a)
            vecs[i, :, :a] = vv[:, :a]
            grad_mean[i] = g + 0.5 * pairs @ coef
    return CentralFlow(t=t, w=w, eigenvalues=eig, sigma=sigma, vectors=vecs, active=act,
                       grad_mean=grad_mean, edge=edge,
                       method=m.name, lr=lr, momentum=beta, events=events, nfev=nfev, segments=seg,
                       success=success, message=message)


# --------------------------------------------------------------------------- predictions
class Prediction(NamedTuple):
    """Time-averaged predictions along a central flow, per sample (and per block: last axis).

    ``loss``, ``grad_sq``, ``sharpness``, ``sigma2`` have shape (n,); ``block_grad_sq``,
    ``block_osc_share`` (share of the oscillation energy), ``block_lag1``, and its two parts
    ``block_mean_sq`` (persistent) and ``block_osc_sq`` (sign-flipping), shape (n, blocks):
    a window's lag-1 correlation is lag1_correlation of their window sums.
    """

    loss: np.ndarray
    loss_mean: np.ndarray
    grad_sq: np.ndarray
    sharpness: np.ndarray
    sigma2: np.ndarray
    block_grad_sq: np.ndarray
    block_osc_share: np.ndarray
    block_lag1: np.ndarray
    block_mean_sq: np.ndarray
    block_osc_sq: np.ndarray


def _check_blocks(blocks, d):
    if blocks is None:
        return [slice(0, d)]
    out = []
    for b in blocks:
        if not isinstance(b, slice):
            raise ValueError(f"blocks={blocks!r} must be index slices within [0, {d})")
        start, stop, step = b.indices(d)
        if step != 1 or start >= stop or b.stop is not None and b.stop > d:
            raise ValueError(f"block={b!r} is outside the valid range: a non-empty slice within [0, {d})")
        out.append(b)
    return out


def predict(loss, flow, blocks=None, amplitude_var=0.0):
    r"""Time-averaged loss, squared gradient norm, sharpness and, per block (index slices), the
    squared gradient norm, share of the oscillation energy and lag-1 gradient correlation along
    ``flow`` (module docstring). The persistent part of the gradient is the time-averaged
    gradient ``flow.grad_mean`` (at the edge :math:`\nabla L` less its component along
    :math:`\nabla S`), not :math:`\nabla L(\bar w)`: the two differ by
    :math:`\tfrac12\sigma^2\nabla S`, which is O(1) where the oscillation energy is O(1/η).
    ``loss.value`` is needed for the loss (NaN without it).

    ``amplitude_var`` (scalar or (n,)): the variance over time of the squared oscillation
    amplitude :math:`\delta_k^2` along u, which the central flow leaves undetermined (it is
    set by the size of the self-stabilisation cycles around the flow). Its term
    :math:`\tfrac12(\delta_k^2-\sigma^2)\nabla S` persists from step to step and adds
    :math:`\tfrac14\operatorname{Var}(\delta^2)\|\nabla_B S\|^2` to each block's persistent
    energy; in blocks that carry :math:`\nabla S` but little of u it decides the lag-1
    correlation (tests/test_central_flow.py). Default 0: the central flow alone.
    """
    blocks = _check_blocks(blocks, flow.w.shape[1])
    amplitude_var = np.broadcast_to(check_positive("amplitude_var", amplitude_var, allow_zero=True),
                                    flow.t.shape)
    value = getattr(loss, "value", None)
    loss_mean = np.full(flow.t.size, np.nan)
    if value is not None:  # one oracle call per sample: the loss is a per-point object
        loss_mean = np.array([value(w) for w in flow.w], dtype=float)
    grads = flow.grad_mean
    # oscillation covariance in R^d restricted to each block: diag(U Σ Uᵀ) summed over the block
    diag = np.einsum("nia,nab,nib->ni", flow.vectors, flow.sigma, flow.vectors)
    osc_block = np.stack([diag[:, b].sum(axis=1) for b in blocks], axis=1)
    mean_block = np.stack([(grads[:, b] ** 2).sum(axis=1) for b in blocks], axis=1)
    grad_s = np.zeros_like(flow.w)  # ∇S where the amplitude fluctuates, else 0
    at_edge = (flow.active > 0) & (amplitude_var > 0)
    if at_edge.any():
        grad_s[at_edge] = [loss.grad_sharpness(w) for w in flow.w[at_edge]]
    fluct = 0.25 * amplitude_var[:, None] * grad_s**2
    mean_block = mean_block + np.stack([fluct[:, b].sum(axis=1) for b in blocks], axis=1)
    sigma2 = flow.sigma2
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(sigma2[:, None] > 0, osc_block / sigma2[:, None], np.nan)
    osc_energy = flow.edge ** 2 * osc_block
    return Prediction(
        loss=time_averaged_loss(loss_mean, flow.edge, sigma2), loss_mean=loss_mean,
        grad_sq=time_averaged_grad_sq((grads**2 + fluct).sum(axis=1), flow.edge, sigma2),
        sharpness=flow.eigenvalues[:, 0], sigma2=sigma2,
        block_grad_sq=mean_block + osc_energy, block_osc_share=share,
        block_lag1=lag1_correlation(mean_block, osc_energy), block_mean_sq=mean_block,
        block_osc_sq=osc_energy)


# --------------------------------------------------------------------------- discrete runs
JITTER = 1e-6  # per-step noise of discrete_run: seeds the period-2 mode as float32 rounding does


def discrete_run(loss, w0, method, lr, beta, steps, jitter=JITTER, seed=0):
    """The discrete iterates w_0..w_steps of PyTorch's rule (Method.update) on ``loss``, buffer
    started on the slow manifold ∇L/(1-β) as the flow assumes (dynamics.modified,
    start="manifold"), plus Gaussian jitter of size ``jitter`` per step. Without it the
    stable phase damps the period-2 mode to ~1e-30, and the run overshoots the edge by a
    large amount before the oscillation has grown back."""
    m = get_method(method)
    noise = jitter * np.random.default_rng(seed).standard_normal((steps, np.size(w0)))
    w = np.array(w0, float)
    buf = loss.grad(w) / (1 - beta) if m.has_momentum else np.zeros_like(w)
    out = np.empty((steps + 1, w.size))
    out[0] = w
    for k in range(steps):
        step, buf = m.update(loss.grad(w), buf, lr, beta)
        w = w + step + noise[k]
        out[k + 1] = w
    return out


# --------------------------------------------------------------------------- toy losses
@dataclass(frozen=True)
class ToyLoss:
    r"""A loss with closed-form derivatives to third order:

    .. math:: L(w) = \sum_i \tfrac12 a_i e^{r_i^\top w}(p_i^\top w)^2
              + \tfrac12 (w-c)^\top K (w-c).

    Term i is sharp along :math:`p_i`, with curvature :math:`a_i e^{\rho_i}` set by the slow
    coordinate :math:`\rho_i = r_i^\top w`: when the quadratic part drives :math:`\rho_i` up,
    the sharpness rises (progressive sharpening), and the oscillation along :math:`p_i`
    pushes it back (:math:`\tfrac12\sigma^2\nabla S` has the component
    :math:`\tfrac12 \sigma^2 a_i e^{\rho_i} r_i`). Each term is :math:`\phi(s,\rho) =
    \tfrac12 a e^\rho s^2` of two linear coordinates, so its derivative tensors are those of φ
    mapped by :math:`V = [p_i; r_i]`. Eigenpairs come from a dense ``eigh`` (small d).
    ``w0`` is a suggested start, ``blocks`` a suggested split into layers.
    """

    a: np.ndarray        # (m,)
    p: np.ndarray        # (m, d)
    r: np.ndarray        # (m, d)
    K: np.ndarray        # (d, d)
    c: np.ndarray        # (d,)
    w0: np.ndarray       # (d,)
    blocks: tuple = ()
    name: str = "toy"

    def _phi(self, w):
        """s, ρ, e = a e^ρ for each term; w may carry leading batch axes."""
        s, rho = w @ self.p.T, w @ self.r.T
        return s, rho, self.a * np.exp(rho)

    def value(self, w):
        w = np.asarray(w, float)
        s, _, e = self._phi(w)
        dw = w - self.c
        return 0.5 * (e * s**2).sum(-1) + 0.5 * np.einsum("...i,ij,...j->...", dw, self.K, dw)

    def grad(self, w):
        w = np.asarray(w, float)
        s, _, e = self._phi(w)
        return (e * s) @ self.p + (0.5 * e * s**2) @ self.r + (w - self.c) @ self.K

    def hessian(self, w):
        s, _, e = self._phi(np.asarray(w, float))
        pp = np.einsum("m,mi,mj->ij", e, self.p, self.p)
        pr = np.einsum("m,mi,mj->ij", e * s, self.p, self.r)
        rr = np.einsum("m,mi,mj->ij", 0.5 * e * s**2, self.r, self.r)
        return pp + pr + pr.T + rr + self.K

    def hvp(self, w, v):
        return self.hessian(w) @ np.asarray(v, float)

    def grad_quadform(self, w, u, v):
        r"""∇(uᵀH(w)v) = ∇³L[u, v] for fixed u, v, from φ's third derivatives."""
        s, _, e = self._phi(np.asarray(w, float))
        pu, ru, pv, rv = self.p @ u, self.r @ u, self.p @ v, self.r @ v
        # φ_ssρ = e, φ_sρρ = e s, φ_ρρρ = e s²/2, φ_sss = 0; ∇ = Σ_c φ_abc (Vu)_a (Vv)_b V_c
        to_p = e * (pu * rv + ru * pv) + e * s * ru * rv
        to_r = e * pu * pv + e * s * (pu * rv + ru * pv) + 0.5 * e * s**2 * ru * rv
        return to_p @ self.p + to_r @ self.r

    def top_eigs(self, w, k, tol=None):
        """Top k eigenpairs by a dense ``eigh``: exact, so ``tol`` (the protocol's optional
        residual tolerance, in (0, 1)) is checked and ignored."""
        if tol is not None and not 0 < tol < 1:
            raise ValueError(f"tol={tol!r} is outside the valid range (0, 1)")
        vals, vecs = np.linalg.eigh(self.hessian(w))
        return vals[::-1][:k], vecs[:, ::-1][:, :k]

    def grad_sharpness(self, w):
        u = self.top_eigs(w, 1)[1][:, 0]
        return self.grad_quadform(w, u, u)


def sharpening_toy(scale=1.0, rate=0.1):
    r"""A 6-D :class:`ToyLoss` with one sharp direction and three blocks of two coordinates.

    Sharp curvature :math:`\text{scale}\cdot e^{\rho}` along p (spread over blocks 0 and 1);
    :math:`\rho = w_4` rises towards :math:`\rho_c + w_5/2` (rate 2·``rate``), which decays
    slowly (rate ≈ ``rate``/4) towards :math:`\rho_c`: the sharpness climbs from
    :math:`\approx 0.5\,\text{scale}` past :math:`2\,\text{scale}` (the edge when
    scale = S*/2) and falls back later. The flow enters the edge at t ≈ 0.6/``rate`` and leaves
    it at t ≈ 1.7/``rate`` (GD; HB and NAG at β = ½ twice as early). ``rate`` sets how slowly
    the loss sharpens per step: the discrete runs overshoot the edge until their oscillation
    has grown from rounding level, over ~(rate·lr)^(-1/2) steps.
    """
    d = 6
    p = np.array([[0.6, 0.0, 0.0, 0.8, 0.0, 0.03]])  # a small share in block 2
    p /= np.linalg.norm(p)
    r = np.array([[0.0, 0.0, 0.0, 0.0, 1.0, 0.0]])
    q = np.array([0.0, 0.0, 0.0, 0.0, 1.0, -0.5])    # ρ - ρ_c - γ w5, γ = 1/2
    K = np.zeros((d, d))
    K[:4, :4] = 0.5 * np.eye(4)                      # mean motion in blocks 0 and 1
    K += 2.0 * np.outer(q, q)                         # ρ tracks ρ_c + ½ w5, fast
    K[5, 5] += 0.25                                   # w5 decays slowly
    c = np.array([1.0, -1.0, 0.5, 0.8, -0.3, 0.0])   # c_4 = ρ_c: e^{ρ_c} < 2, ends below the edge
    w0 = np.array([0.2, 0.5, -0.4, -0.3, np.log(0.5), 4.0])  # pᵀw0 = 0: no fast transient
    return ToyLoss(a=np.array([float(scale)]), p=p, r=r, K=float(rate) * K, c=c, w0=w0,
                   blocks=(slice(0, 2), slice(2, 4), slice(4, 6)), name="sharpening_toy")


def two_edge_toy(scale=1.0, rate=0.1):
    r"""An 8-D :class:`ToyLoss` with two sharp directions :math:`p_1 \perp p_2` (curvatures
    :math:`\text{scale}\,e^{\rho_1}` and :math:`0.8\,\text{scale}\,e^{\rho_2}`), whose slow
    coordinates :math:`\rho_i = w_{4+i}` are driven (rate 2·``rate``) towards targets above
    the edge :math:`2\,\text{scale}`: the first eigenvalue reaches the edge at t ≈ 0.4/rate,
    the second at t ≈ 0.8/rate (GD), and both stay there with a 2×2 Σ. Blocks: (0:2), (2:4),
    (4:8).
    """
    d = 8
    p = np.array([[0.6, 0.0, 0.8, 0.0, 0, 0, 0, 0], [0.0, 0.8, 0.0, -0.6, 0, 0, 0, 0]])
    r = np.zeros((2, d))
    r[0, 4], r[1, 5] = 1.0, 1.0
    K = np.zeros((d, d))
    K[:4, :4] = 0.5 * np.eye(4)
    K[4:, 4:] = np.array([[2.0, 0.3, 0.0, 0.0], [0.3, 2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0],
                          [0.0, 0.0, 0.0, 1.0]])
    c = np.array([1.0, -1.0, 0.5, 0.8, 1.4, 1.6, 0.5, -0.5])
    w0 = np.array([0.2, 0.5, -0.15, 2.0 / 3.0, np.log(0.5), np.log(0.4), 0.0, 0.0])  # P w0 = 0
    return ToyLoss(a=float(scale) * np.array([1.0, 0.8]), p=p, r=r, K=float(rate) * K, c=c, w0=w0,
                   blocks=(slice(0, 2), slice(2, 4), slice(4, 8)), name="two_edge_toy")
