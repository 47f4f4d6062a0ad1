r"""Progressive sharpening after an lr *decrease*, as a curvature option of the what-if
predictions (:func:`experiments.whatif.core.nqm_predictor`'s ``curvature``) composed with the
plateau-escape forecast of the predictor in use (:mod:`experiments.whatif.escape`;
docs/findings/whatif.md, "Seventh round").

Why. In the seed setting the layers' gradient norms *grow* after the step decay ×0.1 (×1.18–1.46
over 900 steps) while every fixed-curvature model predicts a fall: after the decay the layers'
block sharpness rises more (×1.12–1.73) than their gradient noise (the diagnosis). Before the
decay the run's λ_max is held, below the method's edge, at a level its lr sets (h/edge 0.2–0.3 at
batch 32, the stochastic edge of Andreyev & Beneventano 2024); the decay lifts that level ten-fold
and the run, now at h/edge ≈ 0.02, is far below any edge: progressive sharpening (Cohen et al.
2021: λ_max rises while the run is below its edge, until it meets it) resumes.

The model. Per plan, the first step t_d ≥ k whose lr is below the lr of step k − 1 (a decay change
at k, an lr × f < 1, or a scheduled decay inside the horizon) starts the sharpening; from t_d on

.. math::

    \lambda'_{t_d} = \min(\bar\lambda, c_{t_d}),\qquad
    \lambda'_{t+1} = \min\big(\lambda'_t\, e^{r\,\delta_t},\; c_{t+1}\big),\qquad
    \delta_t = \alpha_t/(1-\beta_t),

(:func:`experiments.whatif.curvature.forecast_factor` started at t_d, κ = 1 before it) with

- *the rate r in flow time*, d log λ_max/dτ, τ = Σ α/(1 − β) (docs/theory.md §3: the first-order
  modified equation of HB and NAG is the gradient flow in τ, and sharpening is a motion along it):
  the least-squares slope of log λ_max against τ over the probes at or before k that were below
  their edge (:func:`experiments.whatif.curvature.sharpening_rate` over all such probes, clipped
  at 0: the second round's rate), i.e. the run's own mean rate of sharpening while it was free to
  sharpen. After a decay × 0.1 each step advances τ ten times less, so the per-step rise is a tenth
  of the rate before. Not the rate of the early rise after the plateau escape alone: on the
  development seed run that rise is ×15 over 30 units of flow time (0.09 per unit), an order of
  magnitude above the mean, and would put λ_max at its cap within the horizon (the escape is a
  different motion, :mod:`experiments.whatif.escape`);
- *the cap c_t* (``level``): ``"edge"``, the new method's edge, c_t = (1 − m) edge(method_t,
  β_t)/α_t (m the link's margin); or ``"run"``, the run's own level h̄ (its h/edge at k, the mean
  over the probes of λ̄) carried to the new lr, c_t = min(h̄, 1 − m) edge_t/α_t: the level the
  run's lr held λ_max at before k is assumed to be the one it holds it at after, so a decrease
  × f lets λ_max rise at most × 1/f (the third round's run-level cap);
- the gradient noise follows the curvature (``noise``, Σ ∝ H, as in
  :mod:`experiments.whatif.curvature` (c)).

*The held level after an increase* (``increase="held"``, the ninth round's candidate;
docs/findings/whatif.md, "Ninth round"). The run-level cap above lets a decrease × f raise λ_max at
most × 1/f: the level h̄ the run's lr held λ_max at before k is the one it holds it at after.
The same assumption, read for a change that *lowers* the held level — an lr increase, or a
momentum or method whose edge is lower — predicts a fall of λ_max to h̄ edge_t/α_t from k on
(the stochastic edge of Andreyev & Beneventano 2024: the lr holds λ_max; at and above the edge the
catapult of Lewkowycz et al. 2020 and the self-stabilization of Damian et al. 2023 bring it back
down), on plans without an lr decrease:

.. math::  \lambda'_t = \min\big(\bar\lambda,\; \min(\bar h, 1 - m)\,\mathrm{edge}_t/\alpha_t\big),\quad t \ge k,

gated on the run having left its lazy phase (λ̄ ≥ 2 λ_0, the third round's ``sharpened`` gate,
:func:`experiments.whatif.curvature.held_by_lr`: before it λ_max is the initialization's, which no
lr holds). Measured before this candidate was written, on four development groups (the CNN's
development, eval2, eval3, eval6): in all ten lr × 2 forks of runs held at h̄ ≥ 0.2 the network's
h/edge after the change was at most 1.05 h̄ (λ_max at least halved; in six far lower, a
catapult), where a fixed curvature predicts 2 h̄. Over every group since (``python -m analyses
whatif_misses``) it holds in 21 of 31 such forks, and in 1 of 8 on the transformer and the GRU
(eval9, eval10), whose λ_max did not fall (docs/findings/whatif.md, "Ninth round"). Where the cap
does not bind (a plan that raises the held level, or the unchanged run), nothing moves.

*The held part of the curvature* (``increase="partial"``, the tenth round's candidate;
docs/findings/whatif.md, "Tenth round"). ``"held"`` moves the whole of λ̄, or none of it behind its
gate. Measured on the development groups before this candidate was written (``python -m analyses
whatif_misses`` over them: in the runs held at h̄ ≥ 0.2, the lr × 2 fork's h/edge after k over the
unchanged run's, which a fixed curvature puts at 2 and the held level at 1, beside λ̄/λ_0, the
run's λ_max before k over its first probe's): the plain CNNs had sharpened ×22–221 from their
initialization and the ratio was at most 1.1 in 14 of their 18 checks (below 0.1, a catapult, in
6); the tanh MLP, the ResNet, the transformer and the GRU had sharpened ×1.0–10 and the ratio was
0.87–1.80, at most 1.1 in 2 of 13. The reading: λ_0 is the architecture's curvature at its
initialization, which no lr holds; the rise above it is progressive sharpening, stopped by the lr
(Cohen et al. 2021; at the stochastic edge, Andreyev & Beneventano 2024), so only that part
follows the held level, and the ratio is 1 + λ_0/λ̄:

.. math::  \lambda'_t = \lambda_0 + (\bar\lambda - \lambda_0)\,
           \min\big(1,\; c_t/\bar\lambda\big),\qquad
           c_t = \min(\bar h, 1 - m)\,\mathrm{edge}_t/\alpha_t,\quad t \ge k,

on plans without an lr decrease, where λ̄ > λ_0 (no gate: a run at its initial curvature moves
nothing, one that sharpened ×100 moves as ``"held"``). Assumed: the initial curvature and the
sharpened part add, and the latter scales with the held level. No constant was fitted.

Where it does not act. A plan without an lr decrease inside the horizon, a rate of 0 (no probe
before k shows sharpening below the edge), and a run still on its plateau for which the escape
forecast acts (its forecast is kept: the escape is the earlier, faster motion): there the
forecast is the escape forecast's, so every such plan's prediction is the predictor in use's to
the bit (tests/test_whatif_sharpen.py). Assumptions: the mean sharpening rate before k persists
after the decrease in the new flow time until the cap; each layer's block spectrum scales with
the network's top mode (as in :mod:`experiments.whatif.curvature`). No constant here was fitted on
any score.
"""

import functools
from dataclasses import dataclass, field

import numpy as np

from dynamics.quadratic import stability_edge
from experiments.linking.predict import EDGE_MARGIN
from experiments.whatif.core import nqm_predictor
from experiments.whatif.curvature import flow_steps, forecast_factor, held_by_lr, sharpening_rate
from experiments.whatif.escape import EscapeForecast

LEVELS = ("edge", "run")
INCREASES = ("none", "held", "partial")


def first_decrease(plan, at):
    """The first step t ≥ ``at`` whose lr is below that of step ``at`` − 1 (None if none, or
    ``at`` < 1)."""
    lr = np.asarray(plan["lr"], dtype=float)
    if not 1 <= at <= lr.size:
        return None
    down = np.flatnonzero(lr[at:] < lr[at - 1])
    return int(at + down[0]) if down.size else None


@dataclass(frozen=True)
class DecaySharpening:
    """The sharpening after an lr decrease (module docstring) on top of the plateau-escape
    forecast ``escape``: :func:`~experiments.whatif.core.nqm_predictor`'s ``curvature``
    interface (``rate`` returns (the escape fit, the sharpening rate); ``factor`` κ_t or None)."""

    level: str = "edge"
    noise: bool = True
    margin: float = EDGE_MARGIN
    escape: EscapeForecast = field(default_factory=EscapeForecast)
    increase: str = "none"  # "held" / "partial": the held level after a change that lowers it (module docstring)

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"level={self.level!r} is unknown; valid: {', '.join(LEVELS)}")
        if self.increase not in INCREASES:
            raise ValueError(f"increase={self.increase!r} is unknown; valid: {', '.join(INCREASES)}")
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin={self.margin!r} is outside the valid range [0, 1)")

    def rate(self, probe_tau, lam, below_edge):
        """(the escape forecast's fit, the flow-time sharpening rate over the probes ``below_edge``,
        the first probe's λ_max)."""
        lam0 = float(np.asarray(lam, dtype=float)[0]) if np.size(lam) else np.nan
        return self.escape.rate(probe_tau, lam, below_edge), sharpening_rate(probe_tau, lam, below_edge), lam0

    def caps(self, plan, h_run=np.inf, level=None):
        """c_t per step of ``plan`` (module docstring) at ``level`` (default: the forecast's)."""
        level = self.level if level is None else level
        lrs = np.asarray(plan["lr"], dtype=float)
        edges = np.array([float(stability_edge(m, b)) for m, b in zip(plan["method"], plan["momentum"])])
        h_c = min(h_run, 1 - self.margin) if level == "run" and np.isfinite(h_run) else 1 - self.margin
        return h_c * edges / lrs

    def factor(self, lam_at, rates, at, plan, h_run=np.inf, at_edge=False):
        """κ_t: the escape forecast's where it acts; else the sharpening from the plan's first lr
        decrease (:func:`first_decrease`) where the rate is positive; else None (nothing moves)."""
        esc, r, lam0 = rates
        kappa = self.escape.factor(lam_at, esc, at, plan, h_run, at_edge)
        if kappa is not None:
            return kappa
        t_d = first_decrease(plan, at)
        if t_d is None:
            return self.held(lam_at, lam0, at, plan, h_run)
        if not r > 0:
            return None
        return forecast_factor(lam_at, r, t_d, self.caps(plan, h_run), flow_steps(plan["lr"], plan["momentum"]))

    def held(self, lam_at, lam0, at, plan, h_run):
        """κ_t of the held level after a change that lowers it (``increase="held"``, or of the
        part of λ̄ above λ_0 for ``"partial"``; module docstring), or None where it is off, the
        gate is shut, or the cap does not bind."""
        if self.increase == "none":
            return None
        if self.increase == "held" and not held_by_lr("sharpened", lam_first=lam0, lam_now=lam_at):
            return None
        if self.increase == "partial" and not (np.isfinite(lam0) and 0 < lam0 < lam_at):
            return None
        caps = self.caps(plan, h_run, level="run")[at:]
        # binds: below λ̄ by more than rounding (the unchanged plan's cap is λ̄ itself, up to it)
        if not np.any(caps < lam_at * (1 - 1e-9)):
            return None
        kappa = np.ones(len(plan["lr"]))
        kappa[at:] = np.minimum(lam_at, caps) / lam_at
        if self.increase == "partial":  # only the part above λ_0 follows the held level
            kappa[at:] = (lam0 + (lam_at - lam0) * kappa[at:]) / lam_at
        return kappa


def predictor(level="edge", **kw):
    """:func:`~experiments.whatif.core.nqm_predictor` with ``curvature=DecaySharpening(level)``:
    the model under the predictor in use's drift (:func:`experiments.whatif.drift.drift_predictor`'s
    ``inner``)."""
    return functools.partial(nqm_predictor, curvature=DecaySharpening(level=level, **kw))


__all__ = ["DecaySharpening", "INCREASES", "LEVELS", "first_decrease", "predictor"]
