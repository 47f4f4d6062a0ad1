r"""A forecast of the unchanged run's plateau escape, as a curvature option of the what-if
predictions (:func:`experiments.whatif.core.nqm_predictor`'s ``curvature``;
docs/findings/whatif.md, "Fifth round").

The networks of the what-if settings start on a plateau: λ_max stays at its initialization's
value λ_0 for a few hundred steps, then rises ×20–100 within one probe spacing, and the
gradient norms and correlations of every layer move with it. A model of the change at fixed
curvature cannot foresee it. The model here:

(a) *Escape from the plateau, exponential in flow time.* Near the plateau (a saddle of the
    loss, or the lazy initial phase) the learned direction grows from its small initial size
    as :math:`\delta(\tau) = \delta_0 e^{\mu\tau}` along the gradient flow the method follows,
    τ = Σ α/(1 − β) (docs/theory.md §3; the first, exponential phase of the sigmoidal mode
    learning of Saxe, McClelland & Ganguli 2014, "Exact solutions to the nonlinear dynamics of
    learning in deep linear neural networks"; saddle-to-saddle dynamics, Jacot et al. 2021),
    and the curvature it adds grows with it (a smooth function of δ, to leading order a
    power of it), so the *excess* over the plateau is exponential in flow time:

    .. math::  \lambda(\tau) = \lambda_0 + e_k\, e^{r(\tau - \tau_k)},

    λ_0 the first probe's λ_max (the plateau's level), e_k = λ_k − λ_0 the excess at the probe
    at k, r the least-squares slope of log(λ_p − λ_0) against the probes' τ_p over the last
    :data:`N_FIT` probes at or before k with a positive excess (the first probe's excess is 0
    by definition and is not used), clipped at 0; no escape with fewer than two, or with
    e_k ≤ 0 (the run is not rising at k).
(b) *The rise ends at the method's edge.* The learned mode's growth saturates; the bound the
    repo's theory gives on where is the stability edge of the method in use (docs/theory.md
    §2; Cohen et al. 2021: λ_max does not stay above edge(method, β)/α): the cap
    :math:`c_t = (1 - m)\,\mathrm{edge}(\text{method}_t, \beta_t)/\alpha_t` (m the link's
    margin, :data:`experiments.linking.predict.EDGE_MARGIN`), under each plan's own lr,
    momentum and method. Assumed: the escape ends at the cap (the run's later level is not
    known before the escape; real runs often settle lower, which the forecast overstates).
(c) *An escape is forecast only where it is due.* Per plan, the escape is *due* if the
    uncapped path of (a), in the plan's own flow time (a larger lr or momentum runs through it
    faster, a decay slower), reaches that plan's cap (b) within the horizon. Then the forecast
    curvature is :math:`\lambda'_t = \min(\lambda(\tau_t),\; c_t)` for t ≥ k, from the
    probe at k (κ_t = λ'_t/λ̄, λ̄ the trailing mean the link model's spectra are built from:
    where an escape is under way the last probe, not a mean lagging behind it, is the state
    at k); otherwise nothing moves (κ ≡ 1, the fixed-curvature model exactly). A run that has
    already left its plateau — a probe before the one at k at
    :data:`experiments.whatif.curvature.SHARPENED` (2) times λ_0 or more — has escaped, and
    no escape is forecast for it (its later, slower sharpening is not this model's).

The link model then runs at the forecast curvature: every layer's spectrum and (``noise``)
its curvature-proportional noise are scaled by κ_t = λ'_t/λ̄, as
:mod:`experiments.whatif.curvature` does, so the correlation follows the top mode's new h/edge
(oscillating as it nears the edge) and E‖g‖² ≈ tr Σ + E‖Hx‖² rises with κ (the norm jump
at an escape). Assumptions besides those above: every layer's block spectrum scales with the
network's top mode (a common scale, as in the curvature forecast); the plateau's λ_0 is the
first probe's; the rate measured on the last probes persists until the cap.
"""

import functools
from dataclasses import dataclass

import numpy as np

from dynamics.quadratic import stability_edge
from experiments.linking.predict import EDGE_MARGIN
from experiments.whatif.core import nqm_predictor
from experiments.whatif.curvature import SHARPENED, flow_steps

N_FIT = 3  # probes at or before k in the fit of the escape's rate (as the link model's trailing mean)


@dataclass(frozen=True)
class Escape:
    """The fitted escape at k: the plateau ``lam0``, the excess ``excess`` at k, the rate ``rate``
    per unit flow time (0: none) and the last probe's ``lam_k``."""

    lam0: float
    excess: float
    rate: float
    lam_k: float

    @property
    def rising(self):
        return bool(self.rate > 0 and self.excess > 0)


NONE = Escape(np.nan, 0.0, 0.0, np.nan)


def fit_escape(probe_tau, lam, n_fit=N_FIT):
    r"""The escape of the module docstring (a) from the probes at or before k (``probe_tau``
    their flow times, ascending; ``lam`` their λ_max; the last one at k). :data:`NONE` where the
    run has already left its plateau (a probe before the last at ≥ SHARPENED × λ_0), where
    fewer than two of the last ``n_fit`` probes after the first have a positive excess, or
    where λ is not finite."""
    probe_tau, lam = np.asarray(probe_tau, dtype=float), np.asarray(lam, dtype=float)
    if probe_tau.shape != lam.shape or probe_tau.ndim != 1:
        raise ValueError(f"probe_tau {probe_tau.shape} and lam {lam.shape} must be one-dimensional, of one shape")
    if int(n_fit) < 2:
        raise ValueError(f"n_fit={n_fit} is outside the valid range [2, inf)")
    if lam.size < 2 or not np.all(np.isfinite(lam)) or lam[0] <= 0:
        return NONE
    lam0 = lam[0]
    if np.any(lam[1:-1] >= SHARPENED * lam0):
        return NONE  # escaped before k
    t, e = probe_tau[1:][-int(n_fit):], lam[1:][-int(n_fit):] - lam0
    ok = e > 0
    if ok.sum() < 2 or e[-1] <= 0 or np.ptp(t[ok]) == 0:
        return NONE
    rate = max(float(np.polyfit(t[ok], np.log(e[ok]), 1)[0]), 0.0)
    return Escape(float(lam0), float(e[-1]), rate, float(lam[-1]))


def escape_path(esc, at, plan, margin=EDGE_MARGIN):
    r"""(λ(τ_t)/λ_k uncapped, the cap c_t, due) for t = 0..T−1 under ``plan`` (per-step ``lr``,
    ``momentum``, ``method``; T its length), the growth 1 before ``at``; ``due``: the path
    reaches the cap at some t in [at, T) (module docstring (c))."""
    lrs = np.asarray(plan["lr"], dtype=float)
    T = lrs.size
    if not 0 <= at <= T:
        raise ValueError(f"at={at} is outside the valid range [0, {T}]")
    edges = {}
    for m, b in zip(plan["method"][at:], plan["momentum"][at:]):
        edges.setdefault((m, float(b)), float(stability_edge(m, float(b))))
    cap = np.full(T, np.inf)
    cap[at:] = [(1 - margin) * edges[(m, float(b))] for m, b in zip(plan["method"][at:], plan["momentum"][at:])]
    cap[at:] /= lrs[at:]
    growth = np.ones(T)
    if not esc.rising:
        return growth, cap, False
    dtau = np.concatenate([[0.0], np.cumsum(flow_steps(lrs[at:], plan["momentum"][at:]))[:-1]])
    with np.errstate(over="ignore"):
        growth[at:] = (esc.lam0 + esc.excess * np.exp(esc.rate * dtau)) / esc.lam_k
    due = bool(np.any(esc.lam_k * growth[at:] >= cap[at:]))
    return growth, cap, due


@dataclass(frozen=True)
class EscapeForecast:
    """The plateau-escape forecast as a ``curvature`` option of
    :func:`experiments.whatif.core.nqm_predictor` (its ``rate`` / ``factor`` interface:
    ``rate`` returns the fitted :class:`Escape`, ``factor`` the κ_t of the module docstring);
    ``noise``: the gradient noise scales with the curvature too."""

    noise: bool = True
    n_fit: int = N_FIT
    margin: float = EDGE_MARGIN
    level: str = "edge"  # no run-level cap (the gate of experiments.whatif.curvature.held_by_lr stays shut)

    def __post_init__(self):
        if int(self.n_fit) < 2:
            raise ValueError(f"n_fit={self.n_fit} is outside the valid range [2, inf)")
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin={self.margin!r} is outside the valid range [0, 1)")

    def rate(self, probe_tau, lam, below_edge=None):
        """The :class:`Escape` fitted on the probes at or before k (``below_edge`` unused)."""
        return fit_escape(probe_tau, lam, self.n_fit)

    def factor(self, lam_at, esc, at, plan, h_run=np.inf, at_edge=False):
        """κ_t = λ'_t / ``lam_at`` (λ̄) for t = 0..T−1: min(λ_k × growth, cap)/λ̄ from ``at`` on
        where the escape is due under ``plan``; ``None`` where it is not: then nothing moves and
        :func:`~experiments.whatif.core.nqm_predictor` keeps the fixed curvature, h/edge
        included (``h_run``, ``at_edge`` unused)."""
        if not (np.isfinite(lam_at) and lam_at > 0):
            raise ValueError(f"lam_at={lam_at!r} is outside the valid range (0, inf)")
        growth, cap, due = escape_path(esc, at, plan, self.margin)
        if not due:
            return None
        kappa = np.minimum(esc.lam_k * growth, cap) / lam_at
        kappa[:at] = 1.0
        return kappa


def predictor(**kw):
    """:func:`experiments.whatif.core.nqm_predictor` with ``curvature=EscapeForecast(**kw)``: a PREDICTOR."""
    return functools.partial(nqm_predictor, curvature=EscapeForecast(**kw))


__all__ = ["Escape", "EscapeForecast", "N_FIT", "NONE", "escape_path", "fit_escape", "predictor"]
