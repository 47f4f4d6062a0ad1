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

- The bulk and the noise keep sharpening after k at the flow-time rate λ_max had before k, over
  the probes below the edge (all of them since the first). The top of the spectrum may be held
  meanwhile.
- The noise follows the curvature (Σ ∝ H, docs/theory.md §4).
- ρ is a property of the top modes alone.

No constant here was fitted on any score.
"""

import functools


from experiments.linking.core import run_method
from experiments.whatif.core import ANCHORED, anchor_on_window0, measure_windows, nqm_predictor
from experiments.whatif.curvature import CurvatureForecast
from experiments.whatif import drift, sharpen
from experiments.whatif.delta import reference_plan

COMBINES = ("level", "effect")
SHARPENING = CurvatureForecast(sharpening=True)  # the second round's flow-time sharpening, edge-capped
# the top's forecast: the predictor in use from the seventh round to the eleventh (sharpen_decay_run)
TOP = drift.predictor("flow", inner=sharpen.predictor("run"))


def bulk_predictor(trace, config, at, plans, windows, combine="level", inner=None):
    """A predictor (:data:`experiments.whatif.predict.PREDICTOR`'s signature): the ``inner``
    predictor's output (default :data:`TOP`) with its ρ, and the norm and update ratio of the
    module docstring in ``anchored_grad_norm`` / ``anchored_update_ratio``. ``trace``: the run
    before ``at``."""
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r} is unknown; valid: {', '.join(COMBINES)}")
    inner = TOP if inner is None else inner
    n = len(plans)
    all_plans = list(plans) + [reference_plan(plans[0], at)]
    top = inner(trace, config, at, all_plans, windows)
    bulk = nqm_predictor(trace, config, at, all_plans, windows, curvature=SHARPENING)
    method, momentum = run_method(config)
    meas0 = measure_windows(trace, windows[:1], method, momentum).isel(window=0, drop=True)
    top_corr, top_norm, top_ratio = ((top[k] for k in ANCHORED) if all(k in top for k in ANCHORED)
                                     else anchor_on_window0(meas0, top))
    _, norm, ratio = anchor_on_window0(meas0, bulk)
    if combine == "effect":  # the inner's reference level times the bulk's effect over the reference
        ref = dict(change=n)
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


def predictor(combine="level", **kw):
    """:func:`bulk_predictor` with ``combine`` (and keywords) bound: a PREDICTOR."""
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r} is unknown; valid: {', '.join(COMBINES)}")
    return functools.partial(bulk_predictor, combine=combine, **kw)


__all__ = ["COMBINES", "SHARPENING", "TOP", "bulk_predictor", "predictor"]
