r"""A forecast of the curvature after a change, for the what-if predictions
(:mod:`experiments.whatif.predict`; docs/theory.md §2, §3, §4, §7).

The link model holds the last probe's spectrum fixed after the change. Measured on real
networks, the curvature moves in ways that depend on the lr and method:

(a) *Cap / self-stabilisation.* The network's top Hessian eigenvalue λ_max does not stay
    above the stability edge of the method in use: full-batch GD and momentum methods train
    at the edge, λ_max ≈ edge(method, β)/α (Cohen et al. 2021, "Gradient descent on neural
    networks typically occurs at the edge of stability"), and when a step makes λ_max
    exceed it, the dynamics lower λ_max back to it within a few steps (Damian, Nichani &
    Lee 2023, "Self-stabilization: the implicit bias of gradient descent at the edge of
    stability"; the catapult of Lewkowycz et al. 2020). So after a change to the lr α',
    the momentum β' or the method, :math:`\lambda_{\max} \le h_c\,\mathrm{edge}(\text{method}',
    \beta')/\alpha'`, :math:`h_c = 1 - m` (the link's margin m,
    :data:`experiments.linking.predict.EDGE_MARGIN`): ``level="edge"``.

    With mini-batch SGD the full-batch λ_max settles *below* the edge, at the level where
    the *batch sharpness* :math:`b = E_B[g_B^\top H_B g_B/\|g_B\|^2]` reaches it (Andreyev &
    Beneventano 2024, "Edge of stochastic stability", docs/theory.md §7): there α b ≈ edge,
    and λ_max = α b·(λ_max/b)/α is held at the run's own h̄ = α λ_max/edge, which the new lr
    and method move as :math:`h_c = \min(\bar h, 1 - m)` (assumed: the ratio λ_max/b does
    not change with the change). That holds only where the run *sits* at its stochastic
    edge. ``level="stochastic"`` applies it only there, decided by the measurement itself:
    the mean over the probes of λ̄ (the last ``smooth`` at or before k) of
    :math:`\alpha_p b_p/\mathrm{edge}` (α_p the lr that brought the network to probe p, b_p
    the probe's ``batch_sharpness_global``, measured at the training batch size) reaches
    1 − m, the same margin as the cap's, no threshold fitted; elsewhere (far from the edge,
    e.g. a small lr's lazy phase, where the lr does not hold λ_max) and where the trace has
    no batch sharpness (the assumption cannot be checked), the method's edge cap only.
    ``level="run"`` applies h̄ unconditionally (the earlier model, kept for comparison).

    At batch 32 the batch sharpness stays at 0.1–0.6 of its edge, so the stochastic gate
    never opens, yet λ_max did fall after an lr increase in runs at h̄ = 0.2–0.8 and did not
    in runs still in their lazy phase (h̄ ≈ 0.001, λ_max at its initial value; docs/findings/
    whatif.md). Two gates ask instead whether the lr can be what holds λ_max at all:
    ``level="sharpened"``: the run has left its lazy phase, its λ̄ at least
    :data:`SHARPENED` (2) times the λ_max of its first probe (progressive sharpening has begun,
    Cohen et al. 2021; before it λ_max is the initialization's, set by no lr). Assumed: the
    level a sharpened run reached is the one its lr holds. ``level="relaxed"``: the network's
    top mode relaxes within one window W of the prediction, α λ̄/(1 − β) ≥ 1/W (its time
    constant (1 − β)/(αλ) in steps, the overdamped root of HB and NAG,
    docs/theory.md §2): the lr can act on λ_max only through the top mode's motion, which a
    slower mode does not make within the horizon. Both apply h̄ where they hold and the
    method's edge elsewhere.
(b) *Progressive sharpening* (Cohen et al. 2021) happens in the time of the gradient flow
    the method follows, :math:`\tau = \sum_j \alpha_j/(1-\beta_j)` (docs/theory.md §3: the
    first-order modified equation ẋ = −∇f/(1−β) in t = kα; the same for HB and NAG), not in
    steps: after a decay ×0.1 each step advances τ ten times less. The rate
    r = d log λ_max / dτ is the least-squares slope of log λ_max against τ over the probes
    at or before k where the run was below its edge (α_p b_p/edge < 1 − m; α_p λ_max/edge
    < 1 − m where the probe has no batch sharpness), the last ``last`` of them (all if 0),
    clipped at 0 (a fall of λ_max below the edge is not sharpening); r = 0 with fewer than
    two. Assumed: the rate persists after the change, in the new flow time, until λ_max
    meets the cap.

Per step, with the cap :math:`c_t = h_c\,\mathrm{edge}_t/\alpha_t` and the flow time of the
step :math:`\delta_t = \alpha_t/(1-\beta_t)` of the plan,
:math:`\lambda'_k = \min(\lambda_k, c_k)` and
:math:`\lambda'_{t+1} = \min(\lambda'_t e^{r\delta_t}, c_{t+1})`, λ_k the curvature the link
model's spectra are built from (the trailing mean of the last probes at or before k,
:func:`experiments.whatif.core.nqm_predictor`'s ``smooth``): so a plan that changes
nothing, without sharpening, has λ' ≡ λ_k and its prediction is the fixed-curvature one.
After a decay ×0.1 the cap moves ten times higher and (b) predicts a rise at a tenth of the
per-step rate before; after an lr increase (a) predicts a fall where the run is at its
stochastic edge.

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
    """Which parts of the forecast are on: ``cap`` (a) at the ``level`` "stochastic", "edge"
    or "run", ``sharpening`` (b) over the ``last`` probes below the edge (0: all), ``noise``
    (c). The defaults: the stochastic-edge cap with the noise following the curvature (not on
    in the what-if predictions by default: :data:`experiments.whatif.core.FORECAST`)."""

    cap: bool = True
    level: str = "stochastic"  # the run's own h/edge where it sits at its stochastic edge, else the edge's
    sharpening: bool = False
    noise: bool = True
    last: int = 0  # 0: all probes that qualify
    margin: float = EDGE_MARGIN

    def __post_init__(self):
        if int(self.last) < 0:
            raise ValueError(f"last={self.last!r} is outside the valid range [0, inf) (0: all probes)")
        if self.level not in LEVELS:
            raise ValueError(f"level={self.level!r} is unknown; valid: {', '.join(LEVELS)}")
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin={self.margin!r} is outside the valid range [0, 1)")

    def rate(self, probe_tau, lam, below_edge):
        """d log λ_max / dτ (:func:`sharpening_rate` over the probes ``below_edge``; 0 if
        ``sharpening`` is off)."""
        return sharpening_rate(probe_tau, lam, below_edge, last=self.last) if self.sharpening else 0.0

    def cap_level(self, h_run=np.inf, at_edge=False):
        """h_c: 1 − margin, or min(h̄, 1 − margin) (``level="run"``, or a gated level where
        ``at_edge``: :func:`held_by_lr`)."""
        run_level = self.level == "run" or (self.level not in ("run", "edge") and at_edge)
        return min(h_run, 1 - self.margin) if run_level and np.isfinite(h_run) else 1 - self.margin

    def factor(self, lam_at, rate, at, plan, h_run=np.inf, at_edge=False):
        """κ_t, t = 0..T−1 (T = len(plan["lr"])): the forecast λ'_t / ``lam_at`` under a plan
        (per-step ``lr``, ``momentum``, ``method``), 1 before ``at``; ``h_run``: the run's
        h/edge at k (h̄); ``at_edge``: whether the run sits at its stochastic edge
        (:func:`at_stochastic_edge`)."""
        lrs = np.asarray(plan["lr"], dtype=float)
        caps = np.full(lrs.size, np.inf)
        if self.cap:
            edges = np.array([float(stability_edge(m, b)) for m, b in zip(plan["method"], plan["momentum"])])
            caps = self.cap_level(h_run, at_edge) * edges / lrs
        return forecast_factor(lam_at, rate, at, caps, self.rate_steps(lrs, plan["momentum"]))

    def rate_steps(self, lr, momentum):
        """The clock the rate runs on, per step: the flow time δ_t (:func:`flow_steps`)."""
        return flow_steps(lr, momentum)


LEVELS = ("stochastic", "edge", "run", "sharpened", "relaxed")
SHARPENED = 2.0  # level="sharpened": λ̄ at least this many times the first probe's λ_max


def held_by_lr(level, *, h_batch=(), lam_first=np.nan, lam_now=np.nan, lr=np.nan, momentum=0.0, window=np.inf,
               margin=EDGE_MARGIN):
    r"""Whether the run-level cap applies under ``level``: "stochastic": :func:`at_stochastic_edge`
    of ``h_batch``; "sharpened": λ̄ (``lam_now``) ≥ :data:`SHARPENED` × ``lam_first``;
    "relaxed": α λ̄/(1 − β) ≥ 1/``window``; "run": always; "edge": never."""
    if level not in LEVELS:
        raise ValueError(f"level={level!r} is unknown; valid: {', '.join(LEVELS)}")
    if level == "stochastic":
        return at_stochastic_edge(h_batch, margin)
    if level == "sharpened":
        return bool(np.isfinite(lam_first) and lam_first > 0 and lam_now >= SHARPENED * lam_first)
    if level == "relaxed":
        return bool(np.isfinite(lr * lam_now) and lr * lam_now / (1 - momentum) >= 1 / window)
    return level == "run"


def flow_steps(lr, momentum):
    r"""δ_t = α_t/(1−β_t): the gradient-flow time of each step (docs/theory.md §3)."""
    lr, momentum = np.broadcast_arrays(np.asarray(lr, dtype=float), np.asarray(momentum, dtype=float))
    if np.any(momentum >= 1) or np.any(momentum < 0):
        raise ValueError(f"momentum={momentum!r} is outside the valid range [0, 1)")
    return lr / (1 - momentum)


def flow_time(lr, momentum):
    r"""τ_k = Σ_{j<k} α_j/(1−β_j), k = 0..T (T = len(lr)): the flow time at the start of step k."""
    return np.concatenate([[0.0], np.cumsum(flow_steps(lr, momentum))])


def at_stochastic_edge(h_batch, margin=EDGE_MARGIN):
    r"""Whether the run sits at its stochastic edge: the mean of ``h_batch`` (α_p b_p/edge at the
    probes of λ̄) reaches 1 − ``margin``. False where none is finite (no batch sharpness)."""
    h = np.asarray(h_batch, dtype=float)
    h = h[np.isfinite(h)]
    return bool(h.size and h.mean() >= 1 - margin)


def below_edge(h_lam, h_batch, margin=EDGE_MARGIN):
    r"""Per probe: below its edge, α b/edge < 1 − ``margin`` (``h_batch``), or where that is not
    finite α λ_max/edge < 1 − ``margin`` (``h_lam``)."""
    h_lam, h_batch = np.asarray(h_lam, dtype=float), np.asarray(h_batch, dtype=float)
    h = np.where(np.isfinite(h_batch), h_batch, h_lam)
    with np.errstate(invalid="ignore"):
        return np.isfinite(h) & (h < 1 - margin)


def sharpening_rate(probe_tau, lam, keep, *, last=0, clip=True):
    r"""max(0, least-squares slope of log λ against the flow time ``probe_tau``) over the probes
    where ``keep`` is true and λ is finite and positive (the last ``last`` of them; all if 0);
    the slope itself with ``clip=False``. 0.0 if fewer than two qualify."""
    probe_tau, lam, keep = (np.asarray(a) for a in (probe_tau, lam, keep))
    if not probe_tau.shape == lam.shape == keep.shape:
        raise ValueError(f"probe_tau {probe_tau.shape}, lam {lam.shape} and keep {keep.shape} must have one shape")
    lam = lam.astype(float)
    with np.errstate(invalid="ignore"):
        keep = keep.astype(bool) & np.isfinite(lam) & (lam > 0) & np.isfinite(probe_tau)
    t, y = probe_tau[keep].astype(float), np.log(lam[keep])
    if last:
        t, y = t[-int(last):], y[-int(last):]
    if t.size < 2 or np.ptp(t) == 0:
        return 0.0
    slope = float(np.polyfit(t, y, 1)[0])
    return max(slope, 0.0) if clip else slope


def forecast_factor(lam_at, rate, at, caps, dtau=None):
    r"""κ_t = λ'_t / λ_at with :math:`\lambda'_{at} = \min(\lambda_{at}, c_{at})`,
    :math:`\lambda'_{t+1} = \min(\lambda'_t e^{r\delta_t}, c_{t+1})` (``caps`` c_t per step,
    inf for no cap; ``dtau`` δ_t the flow time of step t, 1 per step if None) and κ_t = 1 for
    t < ``at``."""
    caps = np.asarray(caps, dtype=float)
    dtau = np.ones(caps.size) if dtau is None else np.asarray(dtau, dtype=float)
    if not (np.isfinite(lam_at) and lam_at > 0):
        raise ValueError(f"lam_at={lam_at!r} is outside the valid range (0, inf)")
    if not 0 <= at <= caps.size:
        raise ValueError(f"at={at} is outside the valid range [0, {caps.size}]")
    if dtau.shape != caps.shape:
        raise ValueError(f"dtau {dtau.shape} and caps {caps.shape} must have one shape")
    kappa = np.ones(caps.size)
    lam = lam_at
    for t in range(at, caps.size):
        lam = min(lam if t == at else lam * np.exp(rate * dtau[t - 1]), caps[t])
        kappa[t] = lam / lam_at
    return kappa
