r"""*Top held, bulk sharpening*: the what-if prediction with the oscillation from one model of
the curvature and the gradient norm from another (docs/findings/whatif.md, "Eleventh round"). It
is a predictor option of :mod:`experiments.whatif.predict`.

Two kinds of quantity respond to different parts of the spectrum:

- The successive-gradient correlation ρ, h/edge and the regime are set by the few top modes near
  the edge. An lr or method holds them there (self-stabilization; Damian, Nichani & Lee 2023).
  Their forecast is the ``inner`` predictor's (default :data:`TOP`: the plateau-escape forecast
  and the sharpening after an lr decrease, capped at the run's level, under the flow-time
  post-escape norm drift; the predictor in use from the seventh round to the eleventh).
- The norm E‖g‖² ≈ tr Σ + Σ_i h_i² E x_i² is a sum over every mode. The noise tr Σ and the bulk of
  the spectrum dominate it. Before k they sharpened with λ_max: the slope of log Σ tr H on
  log λ_max over the probes before k is 0.45–1.03 on the development families
  (``analyses/whatif_bulk.py``, ``coupling_before``).

So the norm and the update ratio are taken from the NQM under the flow-time progressive
sharpening (:class:`experiments.whatif.curvature.CurvatureForecast` with ``sharpening=True``,
the second round's forecast; docs/findings/whatif.md, "The conditional cap and sharpening in flow
time"). There the whole spectrum and the noise (Σ ∝ H) grow at the pre-k rate r = d log λ_max/dτ
in each plan's own flow time τ = Σ α/(1 − β), each mode capped at the method's edge. A change that
slows the flow slows that growth, so the norm ends lower than the unchanged run's: a decay, an
lr × 0.5, a lower momentum. A change that speeds the flow raises it. The ρ of that forecast is not
used: it moves the top modes with the bulk, which the top does not do.

``rate``: the growth rate of the bulk after k.

- ``"lambda"`` (the eleventh round's): r = d log λ_max/dτ over every probe below the edge since the
  first, clipped at 0 (:func:`experiments.whatif.curvature.sharpening_rate`). That rate includes
  the early escape from the initial plateau (λ_max ×22–221 on the CNNs), so after k it forecasts
  growth the bulk no longer makes: up to ×14 in the norm over 200 steps where the forks grew
  ×0.6–1.4 (figure 10).
- ``"trace"`` (the twelfth round's): the bulk's own *current* rate, r_b = the least-squares slope of
  log Σ_l tr H_l (the probes' Hutchinson traces summed over the layers) against the flow time τ
  over the last :data:`N_RATE` probes at or before k (the link model's trailing mean,
  :data:`experiments.whatif.drift.N_FIT`), not clipped (:func:`bulk_rate`). A bulk that
  shrinks, as on data the network interpolates, where the curvature and the noise vanish with the
  loss, then shrinks faster under a faster flow. With fewer than two such probes, r_b = 0: the
  fixed curvature.
- ``"power"`` (the thirteenth round's): the bulk sharpens as a power of the flow time,
  λ(τ) = λ_k (τ/τ_k)^b, so its rate d log λ/dτ = b/τ decays as the run goes on (a progressive
  sharpening that slows; the early escape from the plateau weighs on b as one doubling of τ among
  several, not on the rate at k as it does on the ``"lambda"`` slope). b is the least-squares slope
  of log λ_max against log τ over every probe below the edge after the first (τ > 0), clipped at 0
  (:func:`power_exponent`); each plan moves from τ_k in its own flow time, each mode capped at the
  method's edge (:class:`PowerForecast`). Over the next Δτ the growth is (1 + Δτ/τ_k)^b where the
  ``"lambda"`` rate gives e^{rΔτ}. Why: on the development runs' own probes (no fork, nothing
  capped; ``python -m analyses whatif_rate_forms``), log λ_max 200 steps after k is overforecast by
  a median 1.51 at the ``"lambda"`` rate and by 0.18 as a power of τ (the fixed curvature: −0.05;
  it is the best forecast of the unchanged run's own curvature, and the power the closest that
  grows, docs/findings/whatif.md, "Thirteenth round").
- ``"power_trace"``: the same with b from the summed Hessian trace Σ_l tr H_l over every probe
  at or before k (:func:`bulk_power_exponent`): the bulk's own exponent.
- ``"power_released"``: ``"power"`` on plans that keep the lr at or above step k − 1's (the run
  stays held by its lr), and the ``"lambda"`` rate on the flow clock on a plan that lowers it at or
  after k (a decay, lr × 0.5, a scheduled decay in the horizon): the decrease releases the run,
  which sharpens at its mean free rate (the premise of :mod:`experiments.whatif.sharpen`).

- ``"loss"`` (the fourteenth round's): the ``"lambda"`` rate, except in the *small-loss regime* of
  cross-entropy. The per-example gradient there is J_iᵀ(p_i − y_i), of size
  1 − p_{i,y} = 1 − e^{−ℓ_i} ≈ ℓ_i (within 10 % below :data:`SMALL_LOSS` = 0.2 nats), and the noise
  and the Gauss–Newton curvature shrink with it as the network fits its data. So where the mean
  training loss over the window before k is below 0.2 nats on a classification or language-model
  run and falling, the bulk and the noise follow the loss along each plan's flow:
  κ_t = (τ_t/τ_k)^{b_L}, b_L < 0 the slope of log L against log τ over the window's
  :data:`experiments.whatif.drift.N_BATCH` batch means, kept where |b_L| ≥ T_KEEP × its residual
  standard error (:func:`loss_exponent`; a power of τ, as the loss of a separable problem decays
  under gradient flow, Soudry et al. 2018, "The implicit bias of gradient descent on separable
  data"). A faster flow shrinks the bulk faster. Why: below 0.2 nats (eval8, eval12, eval16, 18
  checks) the predictor in use got the norm sign on 0.56 of the checks, the fixed curvature on 0.78
  (docs/findings/whatif.md, "Thirteenth round", 5).
- ``"loss_level"``: in the small-loss regime, the loss's forecast of the reference plan (the run's
  lr, momentum and method at k − 1 held on) times the ``"lambda"`` rate's effect of each plan over
  that reference, ‖g‖̂_j(c) = ‖g‖̂^loss_j(ref) · ‖g‖̂^λ_j(c) / ‖g‖̂^λ_j(ref) (the same for the
  update ratio in log10): the loss sets where the unchanged run goes, the flow-time sharpening and
  the edge what a change does to it (on eval16 an lr × 2 made the norm grow ×1.3–52 in that regime,
  which a bulk shrinking faster under a faster flow gets backwards). Elsewhere ``"lambda"``.

``level`` (the fifteenth round's): the level of the reference plan, the unchanged run's forecast,
with each plan's effect over it kept (the ``rate``'s; the same for the update ratio in log10):

- ``"model"``: the ``rate``'s own;
- ``"trend_small_loss"``: in the small-loss regime (above) the *trend* baseline's, window 0 carried
  along the run's own log-linear trend per step before k
  (:func:`experiments.whatif.drift.trend_forecast`; no theory);
  elsewhere the model's. On the two families of that kind held out in the thirteenth and
  fourteenth rounds the trend got the norm sign and the size more often than every model;
- ``"blend_small_loss"``: there the geometric mean of the model's level and the trend's, equal
  weights, ‖g‖̂_j(ref) = (‖g‖̂^model_j(ref) · ‖g‖̂^trend_j)^{1/2}; elsewhere the model's. The
  combination of two forecasts whose errors are not perfectly correlated errs less than either on
  average, and estimated weights seldom beat equal ones out of sample (Bates & Granger 1969, "The
  combination of forecasts"; Smith & Wallis 2009, "A simple explanation of the forecast
  combination puzzle");
- ``"blend"``: that geometric mean everywhere.

``mix`` (the sixteenth round's): model averaging over the bulk's future. The norm is the
equal-weight geometric mean of the norms forecast under ``rate``'s curvature and under each rate
of ``mix`` (:data:`MIX_RATES`; ``"held"``: the curvature held at its value at k, the link's NQM),
‖g‖̂_j(c) = (Π_m ‖g‖̂^m_j(c))^{1/M}, and the log10 update ratio their mean; the reference level
(``rate="loss_level"``, ``level``) is then set on that combination as above. The flow-time rate
since the first probe forecasts a sharpening that goes on (``"lambda"``), the power of τ one that
slows (``"power_trace"``), the held curvature none: on the nineteen families scored so far each of
the three is the best of them on the norm sign on some (eval14: λ 0.70, power 0.44, held 0.40;
eval18: 0.58, 0.80, 0.80; ``results/whatif_scores.json``), which no rule before k told apart. The
average of forecasts from different models errs less than the average model where their errors
differ (Bates & Granger 1969; Smith & Wallis 2009, as above); no weight is fitted.

``combine``:

- ``"level"``: the norm and the log10 update ratio are the sharpening model's, anchored on
  window 0 (:func:`experiments.whatif.core.anchor_on_window0`);
- ``"effect"``: the ``inner`` predictor's forecast of the reference plan (the run's lr, momentum
  and method at k − 1 held on, :func:`experiments.whatif.delta.reference_plan`, with its drift)
  times the sharpening model's effect of each plan over that reference,
  ‖g‖̂_j(c) = ‖g‖̂^inner_j(ref) · √(E‖g‖²_sharp,j(c) / E‖g‖²_sharp,j(ref)), and the same for the
  update ratio in log10. So the unchanged run's level is the predictor in use's, and only the
  change's effect on the norm is the bulk's.

Assumptions:

- The bulk and the noise keep moving after k at their flow-time rate before k (``rate``), log-linear
  in τ (in log τ for the power rates), capped at the method's edge. The top of the spectrum may be
  held meanwhile.
- The noise follows the curvature (Σ ∝ H, docs/theory.md §4).
- ρ is a property of the top modes alone.

No constant here was fitted on any score.
"""

import functools
from dataclasses import dataclass, fields

import numpy as np

from experiments.linking.core import run_method
from experiments.runs.data import KINDS
from experiments.whatif import drift, sharpen
from experiments.whatif.core import ANCHORED, anchor_on_window0, measure_windows, nqm_predictor
from experiments.whatif.curvature import CurvatureForecast, flow_time, sharpening_rate
from experiments.whatif.delta import reference_plan

COMBINES = ("level", "effect")
LEVELS = ("model", "trend_small_loss", "blend_small_loss", "blend")
RATES = ("lambda", "trace", "power", "power_trace", "power_released", "loss", "loss_level")
MIX_RATES = ("lambda", "trace", "power", "power_trace", "power_released", "held")  # mix=: no loss rate (the level's)
SMALL_LOSS = 0.2  # nats: 1 − e^{−ℓ} is within 10 % of ℓ below it (rate="loss")
N_RATE = drift.N_FIT  # probes in the bulk's rate (rate="trace")
SHARPENING = CurvatureForecast(sharpening=True)  # the second round's flow-time sharpening, edge-capped
# the top's forecast: the predictor in use from the seventh round to the eleventh (sharpen_decay_run)
TOP = drift.predictor("flow", inner=sharpen.predictor("run"))


@dataclass(frozen=True)
class BulkForecast(CurvatureForecast):
    """The flow-time forecast of :class:`~experiments.whatif.curvature.CurvatureForecast` at a
    given rate ``bulk_rate`` (the bulk's, :func:`bulk_rate`) in place of λ_max's."""

    sharpening: bool = True
    bulk_rate: float = 0.0

    def rate(self, probe_tau, lam, below_edge):
        return float(self.bulk_rate)


def power_exponent(probe_tau, lam, keep):
    r"""b = max(0, least-squares slope of log λ against log τ) over the probes where ``keep``
    is true, τ > 0 and λ is finite and positive; 0.0 if fewer than two qualify."""
    probe_tau = np.asarray(probe_tau, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_tau = np.where(probe_tau > 0, np.log(probe_tau), np.nan)
    return sharpening_rate(log_tau, lam, keep)


@dataclass(frozen=True)
class PowerForecast(CurvatureForecast):
    """:class:`~experiments.whatif.curvature.CurvatureForecast` with λ growing as a power of the
    flow time, λ'_{t+1} = min(λ'_t (τ_{t+1}/τ_t)^b, c_{t+1}) from k on (τ each plan's own flow
    time, c its edge cap): the rate b runs on the clock log τ. ``rate`` returns b
    (:func:`power_exponent`)."""

    sharpening: bool = True
    exponent: float | None = None  # b given (the bulk's, :func:`bulk_power_exponent`); None: λ_max's
    released: bool = False  # a plan that lowers the lr: λ_max's free rate on the flow clock instead

    def rate(self, probe_tau, lam, below_edge):
        b = power_exponent(probe_tau, lam, below_edge) if self.exponent is None else float(self.exponent)
        return (b, sharpening_rate(probe_tau, lam, below_edge)) if self.released else b

    def factor(self, lam_at, rate, at, plan, h_run=np.inf, at_edge=False):
        if self.released:
            b, free = rate
            lrs = np.asarray(plan["lr"], dtype=float)
            if 0 < at < lrs.size and np.any(lrs[at:] < lrs[at - 1]):
                flow = CurvatureForecast(**{f.name: getattr(self, f.name) for f in fields(CurvatureForecast)})
                return flow.factor(lam_at, free, at, plan, h_run, at_edge)
            rate = b
        return super().factor(lam_at, rate, at, plan, h_run, at_edge)

    def rate_steps(self, lr, momentum):
        """log(τ_{t+1}/τ_t) per step t (0 while τ_t = 0): the clock of a power of τ."""
        tau = flow_time(lr, momentum)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(tau[:-1] > 0, np.log(tau[1:] / tau[:-1]), 0.0)


POWER = PowerForecast()  # rate="power": λ_max's power of the flow time, edge-capped


def _summed_trace(trace, at, momentum):
    """(τ, Σ_l tr H_l) at the probes at or before ``at`` (NaN where a layer's trace is missing)."""
    probes = trace["probe_step"].values
    keep = probes <= at
    tr = trace["hessian_trace"].transpose("probe_step", "layer").values[keep].astype(float)
    total = np.where(np.all(np.isfinite(tr), axis=1), tr.sum(axis=1), np.nan)
    tau = flow_time(trace["lr"].values, momentum)[np.clip(probes[keep], 0, trace.sizes["step"])]
    return tau, total


def bulk_power_exponent(trace, at, momentum):
    """b of :func:`power_exponent` from the summed Hessian trace Σ_l tr H_l over every probe at
    or before ``at`` (``rate="power_trace"``)."""
    tau, total = _summed_trace(trace, at, momentum)
    return power_exponent(tau, total, np.ones(total.size, bool))


def bulk_rate(trace, at, momentum, last=N_RATE):
    r"""r_b = d log Σ_l tr H_l / dτ: the least-squares slope over the last ``last`` probes at or
    before ``at`` whose summed trace is finite and positive (τ = Σ α/(1 − β) up to the probe,
    :func:`experiments.whatif.curvature.flow_time`), not clipped
    (:func:`experiments.whatif.curvature.sharpening_rate` with ``clip=False``); 0.0 with fewer than
    two or a constant τ."""
    tau, total = _summed_trace(trace, at, momentum)
    return sharpening_rate(tau, total, np.ones(total.size, bool), last=int(last), clip=False)


def loss_exponent(trace, at, momentum, width, n_batch=drift.N_BATCH):
    r"""(b_L, L_k): the slope of log L̄_j on log τ̄_j over ``n_batch`` consecutive batches j of the
    window [at − width, at) (L̄_j the batch's mean training loss, τ̄_j its mean flow time), kept where
    |b_L| ≥ T_KEEP × its residual standard error (:func:`experiments.whatif.drift.fit_drift`), else 0;
    and L_k, the window's mean loss. (0, NaN) where the window does not fit before ``at``."""
    if not 0 < width <= at <= trace.sizes["step"]:
        return 0.0, float("nan")
    loss = trace["loss"].values.astype(float)
    tau = flow_time(trace["lr"].values, momentum)
    parts = np.array_split(np.arange(at - width, at), int(n_batch))
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.log([np.nanmean(loss[p]) for p in parts])
        t = np.log([tau[p].mean() for p in parts])
    slope = drift.fit_drift(t, y[:, None], np.zeros((t.size, 1)))[0][0]
    return float(slope), float(np.nanmean(loss[at - width:at]))


def small_loss_exponent(trace, at, momentum, width, data):
    """b_L of :func:`loss_exponent` where the run is in the small-loss regime at ``at`` (a
    cross-entropy task, the window's mean loss below :data:`SMALL_LOSS`, a kept b_L < 0); else None."""
    b, loss_k = loss_exponent(trace, at, momentum, width)
    cross_entropy = KINDS.get(data, ("",))[0] in ("classify", "lm")
    return b if cross_entropy and loss_k < SMALL_LOSS and b < 0 else None


def bulk_curvature(rate, trace, at, momentum, width=None, data=None):
    """The curvature forecast of the bulk under ``rate`` (:data:`RATES` or :data:`MIX_RATES`; the module docstring);
    ``width``: the window, ``data``: the run's dataset name (its task) (both for the loss rates)."""
    if rate == "loss":
        b = small_loss_exponent(trace, at, momentum, width, data)
        return SHARPENING if b is None else PowerForecast(exponent=b)
    if rate in ("lambda", "loss_level"):  # loss_level: the loss model sets only the level (bulk_predictor)
        return SHARPENING
    if rate == "power":
        return POWER
    if rate == "power_released":
        return PowerForecast(released=True)
    if rate == "power_trace":
        return PowerForecast(exponent=bulk_power_exponent(trace, at, momentum))
    if rate == "trace":
        return BulkForecast(bulk_rate=bulk_rate(trace, at, momentum))
    if rate == "held":
        return None  # nqm_predictor's fixed curvature (the candidate ``fixed``)
    raise ValueError(f"rate={rate!r} is unknown; valid: {', '.join(RATES)}")


def _check(combine, rate, level, mix):
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r} is unknown; valid: {', '.join(COMBINES)}")
    if rate not in RATES:
        raise ValueError(f"rate={rate!r} is unknown; valid: {', '.join(RATES)}")
    if level not in LEVELS:
        raise ValueError(f"level={level!r} is unknown; valid: {', '.join(LEVELS)}")
    bad = [r for r in mix if r not in MIX_RATES]
    if bad or isinstance(mix, str):
        raise ValueError(f"mix={mix!r}: each entry must be one of {', '.join(MIX_RATES)} (a tuple)")


def bulk_predictor(trace, config, at, plans, windows, combine="level", inner=None, rate="lambda", level="model",
                   mix=()):
    """A predictor (:data:`experiments.whatif.predict.PREDICTOR`'s signature): the ``inner``
    predictor's output (default :data:`TOP`) with its ρ, and the norm and update ratio of the
    module docstring in ``anchored_grad_norm`` / ``anchored_update_ratio``. ``trace``: the run
    before ``at``. ``bulk_curvature_factor`` is ``rate``'s forecast's (not the mix's)."""
    _check(combine, rate, level, mix)
    inner = TOP if inner is None else inner
    n = len(plans)
    method, momentum = run_method(config)
    width, data = windows[0][1] - windows[0][0], config.get("data")
    small = (small_loss_exponent(trace, at, momentum, width, data)
             if rate == "loss_level" or level.endswith("_small_loss") else None)
    b_loss = small if rate == "loss_level" else None
    trend_weight = {"model": 0.0, "trend_small_loss": float(small is not None),
                    "blend_small_loss": 0.5 * (small is not None), "blend": 0.5}[level]
    with_ref = combine == "effect" or b_loss is not None or trend_weight > 0
    all_plans = list(plans) + ([reference_plan(plans[0], at)] if with_ref else [])
    top = inner(trace, config, at, all_plans, windows)
    bulk = nqm_predictor(trace, config, at, all_plans, windows,
                         curvature=bulk_curvature(rate, trace, at, momentum, width=width, data=data))
    meas0 = measure_windows(trace, windows[:1], method, momentum).isel(window=0, drop=True)
    top_corr, top_norm, top_ratio = ((top[k] for k in ANCHORED) if all(k in top for k in ANCHORED)
                                     else anchor_on_window0(meas0, top))
    _, norm, ratio = anchor_on_window0(meas0, bulk)
    if mix:  # the geometric mean of the norms under each curvature forecast, the mean log10 ratio
        members = [(norm, ratio)] + [anchor_on_window0(meas0, nqm_predictor(
            trace, config, at, all_plans, windows, curvature=bulk_curvature(r, trace, at, momentum)))[1:] for r in mix]
        norm = np.exp(sum(np.log(m) for m, _ in members) / len(members))
        ratio = sum(r for _, r in members) / len(members)
    ref = dict(change=n)
    if b_loss is not None:  # the loss model's reference level times the flow-time sharpening's effect over it
        loss = nqm_predictor(trace, config, at, all_plans[n:], windows, curvature=PowerForecast(exponent=b_loss))
        _, loss_norm, loss_ratio = anchor_on_window0(meas0, loss)
        norm = loss_norm.isel(change=0) * norm / norm.isel(ref)
        ratio = loss_ratio.isel(change=0) + ratio - ratio.isel(ref)
    if trend_weight > 0:  # the reference level (partly) the run's own trend, each plan's effect over it kept
        trend_norm, trend_ratio = drift.trend_forecast(trace, at, windows, meas0)
        w = trend_weight
        norm = norm.isel(ref) ** (1 - w) * trend_norm ** w * norm / norm.isel(ref)
        ratio = (1 - w) * ratio.isel(ref) + w * trend_ratio + ratio - ratio.isel(ref)
    if combine == "effect":  # the inner's reference level times the bulk's effect over the reference
        norm = top_norm.isel(ref) * norm / norm.isel(ref)
        ratio = top_ratio.isel(ref) + ratio - ratio.isel(ref)
    dims = ("change", "window", "layer")
    ds = top.isel(change=slice(0, n))
    take = lambda v: v.isel(change=slice(0, n)).transpose(*dims)  # noqa: E731
    ds["anchored_grad_corr"] = take(top_corr)
    ds["anchored_grad_norm"] = take(norm).reindex(layer=ds["layer"].values)
    ds["anchored_update_ratio"] = take(ratio).reindex(layer=ds["layer"].values)
    ds["bulk_curvature_factor"] = bulk["curvature_factor"].isel(change=slice(0, n))
    return ds


def predictor(combine="level", rate="lambda", level="model", mix=(), **kw):
    """:func:`bulk_predictor` with ``combine``, ``rate``, ``level``, ``mix`` (and keywords) bound: a PREDICTOR."""
    _check(combine, rate, level, tuple(mix) if isinstance(mix, list) else mix)
    return functools.partial(bulk_predictor, combine=combine, rate=rate, level=level, mix=tuple(mix), **kw)


__all__ = ["COMBINES", "LEVELS", "MIX_RATES", "N_RATE", "POWER", "RATES", "SHARPENING", "SMALL_LOSS", "TOP", "BulkForecast", "PowerForecast",
           "bulk_curvature", "bulk_power_exponent", "bulk_predictor", "bulk_rate", "loss_exponent", "power_exponent",
           "predictor", "small_loss_exponent"]
