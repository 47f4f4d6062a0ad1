r"""A forecast of the curvature after a change, for the what-if predictions
(:mod:`experiments.whatif.predict`; docs/theory.md §2, §4, §5).

The link model holds the last probe's spectrum fixed after the change. Measured on real
networks, the curvature moves in ways that depend on the lr and method:

(a) *Cap / self-stabilisation.* The network's top Hessian eigenvalue λ_max does not stay
    above the stability edge of the method in use: full-batch GD and momentum methods train
    at the edge, λ_max ≈ edge(method, β)/α (Cohen et al. 2021, "Gradient descent on neural
    networks typically occurs at the edge of stability"), and when a step makes λ_max
    exceed it, the dynamics lower λ_max back to it within a few steps (Damian, Nichani &
    Lee 2023, "Self-stabilization: the implicit bias of gradient descent at the edge of
    stability"; the catapult of Lewkowycz et al. 2020). With mini-batch SGD the full-batch
    λ_max settles *below* the edge, at the level where the *batch* sharpness reaches it
    (Andreyev & Beneventano 2024, "Edge of stochastic stability", docs/theory.md §7). So
    after a change to the lr α', the momentum β' or the method,
    :math:`\lambda_{\max} \le h_c\,\mathrm{edge}(\text{method}', \beta')/\alpha'` with
    ``level="edge"``: :math:`h_c = 1 - m` (the link's margin m,
    :data:`experiments.linking.predict.EDGE_MARGIN`), or ``level="run"``: :math:`h_c =
    \min(\bar h, 1 - m)`, h̄ the run's own α λ_max / edge at k (over the probes λ_k is
    taken from, below), the stochastic edge measured (assumed: the run sits at it, and the
    change does not change the ratio of λ_max to the batch sharpness). Doubling the lr then
    halves λ_max.
(b) *Progressive sharpening.* Below the edge λ_max rises (Cohen et al. 2021), at a rate
    r = d log λ_max / dt measured from the run's own probes before the change: the
    least-squares slope of log λ_max against the step over the probes at or before k where
    h/edge = α λ_max / edge < ``below`` (far from the edge, so that the rise is sharpening
    and not the edge holding λ_max), the last ``last`` of them (r = 0 with fewer than
    two). Assumed: the rate persists after the change until λ_max meets the cap.

Per step, with the cap :math:`c_t = h_c\,\mathrm{edge}_t/\alpha_t` of the plan,
:math:`\lambda'_k = \min(\lambda_k, c_k)` and
:math:`\lambda'_{t+1} = \min(\lambda'_t e^{r}, c_{t+1})`, λ_k the curvature the link model's
spectra are built from (the trailing mean of the last probes at or before k,
:func:`experiments.whatif.predict.nqm_predictor`'s ``smooth``): so a plan that changes
nothing, without sharpening, has λ' ≡ λ_k and its prediction is the fixed-curvature one.
After a decay ×0.1
the cap moves ten times higher and (b) predicts a rise at the rate r; after an lr increase
(a) predicts a fall.

The forecast is a factor κ_t = λ'_t / λ_k (1 before k). Assumed: each layer's block
spectrum scales with the network's top mode (the whole Hessian is multiplied by κ_t, as
for a network whose curvature changes by a common scale), and (c) the gradient noise
follows the curvature, Σ ∝ H (the NQM's curvature-proportional noise, docs/theory.md §4;
the Fisher–Hessian proximity near a minimum), so the per-mode noise σ_i² scales by κ_t too
(``noise``). With it a rising H raises E‖g‖² ≈ tr Σ + E‖Hx‖² after a decay.
"""

from dataclasses import dataclass

import numpy as np

from dynamics.quadratic import stability_edge
from experiments.linking.predict import EDGE_MARGIN


@dataclass(frozen=True)
class CurvatureForecast:
    """Which parts of the forecast are on: ``cap`` (a) at the ``level`` "run" or "edge",
    ``sharpening`` (b) with its probe rule (``below``, ``last``), ``noise`` (c). The defaults
    are the forecast chosen on the development setting (docs/findings/whatif.md)."""

    cap: bool = True
    level: str = "run"  # the cap at the run's own h/edge, or "edge": at (1 - margin) x the edge
    sharpening: bool = False
    noise: bool = True
    below: float = 0.25
    last: int = 2  # 0: all probes that qualify
    margin: float = EDGE_MARGIN

    def __post_init__(self):
        if not 0 < self.below <= np.inf:
            raise ValueError(f"below={self.below!r} is outside the valid range (0, inf]")
        if int(self.last) < 0:
            raise ValueError(f"last={self.last!r} is outside the valid range [0, inf) (0: all probes)")
        if self.level not in ("edge", "run"):
            raise ValueError(f"level={self.level!r} is unknown; valid: edge, run")
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin={self.margin!r} is outside the valid range [0, 1)")

    def rate(self, probe_steps, lam, h_edge, at):
        """d log λ_max / dt from the probes at or before ``at`` with h/edge < ``below``
        (the last ``last`` of them; 0 if fewer than two, or if ``sharpening`` is off)."""
        return sharpening_rate(probe_steps, lam, h_edge, at, below=self.below, last=self.last) \
            if self.sharpening else 0.0

    def factor(self, lam_at, rate, at, plan, h_run=np.inf):
        """κ_t, t = 0..T−1 (T = len(plan["lr"])): the forecast λ'_t / ``lam_at`` under a plan
        (per-step ``lr``, ``momentum``, ``method``), 1 before ``at``; ``h_run``: the run's
        h/edge at k (h̄, used with ``level="run"``)."""
        lrs = np.asarray(plan["lr"], dtype=float)
        caps = np.full(lrs.size, np.inf)
        if self.cap:
            edges = np.array([float(stability_edge(m, b)) for m, b in zip(plan["method"], plan["momentum"])])
            h = 1 - self.margin if self.level == "edge" or not np.isfinite(h_run) else min(h_run, 1 - self.margin)
            caps = h * edges / lrs
        return forecast_factor(lam_at, rate, at, caps)


def sharpening_rate(probe_steps, lam, h_edge, at, *, below=0.5, last=0):
    r"""Least-squares slope of log λ against the step over the probes ``probe_steps`` ≤ ``at``
    whose ``h_edge`` is below ``below`` and whose λ is finite and positive (the last ``last``
    of them; all if 0). 0.0 if fewer than two qualify."""
    probe_steps, lam, h_edge = (np.asarray(a, dtype=float) for a in (probe_steps, lam, h_edge))
    if not probe_steps.shape == lam.shape == h_edge.shape:
        raise ValueError(f"probe_steps {probe_steps.shape}, lam {lam.shape} and h_edge {h_edge.shape} "
                         f"must have one shape")
    with np.errstate(invalid="ignore"):
        keep = (probe_steps <= at) & np.isfinite(lam) & (lam > 0) & np.isfinite(h_edge) & (h_edge < below)
    t, y = probe_steps[keep], np.log(lam[keep])
    if last:
        t, y = t[-int(last):], y[-int(last):]
    if t.size < 2 or np.ptp(t) == 0:
        return 0.0
    return float(np.polyfit(t, y, 1)[0])


def forecast_factor(lam_at, rate, at, caps):
    r"""κ_t = λ'_t / λ_at with :math:`\lambda'_{at} = \min(\lambda_{at}, c_{at})`,
    :math:`\lambda'_{t+1} = \min(\lambda'_t e^{r}, c_{t+1})` (``caps`` c_t per step, inf for no
    cap) and κ_t = 1 for t < ``at``."""
    caps = np.asarray(caps, dtype=float)
    if not (np.isfinite(lam_at) and lam_at > 0):
        raise ValueError(f"lam_at={lam_at!r} is outside the valid range (0, inf)")
    if not 0 <= at <= caps.size:
        raise ValueError(f"at={at} is outside the valid range [0, {caps.size}]")
    kappa = np.ones(caps.size)
    lam = lam_at
    for t in range(at, caps.size):
        lam = min(lam if t == at else lam * np.exp(rate), caps[t])
        kappa[t] = lam / lam_at
    return kappa
