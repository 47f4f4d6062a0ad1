"""How well the curvature's growth after k is forecast by each form of the rate (docs/findings/whatif.md,
"Thirteenth round"), on the runs themselves (no fork): for each run of the named groups'
specs (:data:`analyses.whatif_scores.GROUPS`; default: the development groups,
:data:`analyses.whatif_forecast_choice.GROUPS`) and each of the group's fork steps k, the network's
λ_max and the layers' summed Hessian trace Σ_l tr H_l are fitted on the probes at or before k and
carried to the run's own probes after k, in its flow time τ = Σ α/(1 − β)
(:func:`experiments.whatif.curvature.flow_time`), by each form of :data:`FORMS`:

- ``fixed``: no growth (log q' = log q_k);
- ``lambda``: e^{r(τ − τ_k)}, r the least-squares slope of log q against τ over every probe, clipped
  at 0 (the eleventh round's rate, :func:`experiments.whatif.curvature.sharpening_rate`);
- ``last3``: the same slope over the last three probes, not clipped (the twelfth round's);
- ``power``: (τ/τ_k)^b, b the least-squares slope of log q against log τ over the probes with
  τ > 0, clipped at 0 (the thirteenth round's, :func:`experiments.whatif.bulk.power_exponent`).

Every probe is used and nothing is capped (the predictors fit λ_max's rate on the probes below the
edge and cap each mode at it; this compares the forms alone). Prints and writes
``results/whatif_rate_forms.json``: per quantity, form and horizon (the probes 100 and 200 steps
after k), the median of the forecast's error log q' − log q (its bias), the median of its absolute
value, and the number of points:

    .venv/bin/python -m analyses whatif_rate_forms                # ~1 min (the runs are in the store)
    .venv/bin/python -m analyses whatif_rate_forms evaluation_9
"""

from pathlib import Path

import numpy as np

from analyses.whatif_forecast_choice import GROUPS as DEVELOPMENT
from analyses.whatif_scores import GROUPS, ROOT
from experiments.linking.core import run_method
from experiments.runs.config import run_id
from experiments.store import atomic_write_json, read_trace
from experiments.sweeps import SPECS_DIR, expand, load_spec
from experiments.whatif.bulk import power_exponent
from experiments.whatif.curvature import flow_time, sharpening_rate

OUT = Path(__file__).resolve().parents[1] / "results" / "whatif_rate_forms.json"
FORMS = ("fixed", "lambda", "last3", "power")
HORIZONS = (100, 200)  # steps after k


def forecast(form, tau, q, at_tau):
    """log q' at the flow times ``at_tau`` (after k) from the probes (``tau``, ``q``) at or before k,
    by ``form`` (:data:`FORMS`); the last of those probes is the state at k."""
    tau, q, at_tau = (np.asarray(a, dtype=float) for a in (tau, q, at_tau))
    if form not in FORMS:
        raise ValueError(f"form={form!r} is unknown; valid: {', '.join(FORMS)}")
    ok = np.isfinite(q) & (q > 0)
    if not ok[-1]:
        raise ValueError(f"q={float(q[-1])!r} at k (the last probe) is outside the valid range (0, inf)")
    keep = np.ones(tau.size, bool)
    if form == "fixed":
        return np.full(at_tau.shape, np.log(q[-1]))
    if form == "power":
        return np.log(q[-1]) + power_exponent(tau, q, keep) * np.log(at_tau / tau[-1])
    rate = sharpening_rate(tau, q, keep) if form == "lambda" else sharpening_rate(tau, q, keep, last=3, clip=False)
    return np.log(q[-1]) + rate * (at_tau - tau[-1])


def run_errors(trace, momentum, at):
    """{(quantity, form, horizon): forecast error log q' − log q} at the probes ``HORIZONS`` after
    ``at`` that the run has, for λ_max ("lambda_max") and Σ_l tr H_l ("trace")."""
    probes = trace["probe_step"].values
    tau = flow_time(trace["lr"].values, momentum)[np.clip(probes, 0, trace.sizes["step"])]
    h = trace["hessian_trace"].transpose("probe_step", "layer").values.astype(float)
    quantities = {"lambda_max": trace["sharpness_global"].values.astype(float),
                  "trace": np.where(np.all(np.isfinite(h), axis=1), h.sum(axis=1), np.nan)}
    out = {}
    before = probes <= at
    for name, q in quantities.items():
        if not (np.isfinite(q[before][-1]) and q[before][-1] > 0):
            continue
        for horizon in HORIZONS:
            j = np.flatnonzero(probes == at + horizon)
            if j.size == 0 or not (np.isfinite(q[j[0]]) and q[j[0]] > 0):
                continue
            for form in FORMS:
                pred = forecast(form, tau[before], q[before], tau[j[0]])
                out[(name, form, horizon)] = float(pred - np.log(q[j[0]]))
    return out


def summarize(errors):
    """{quantity: {form: {horizon: {"bias", "median_abs", "n"}}}} of lists of errors."""
    out = {}
    for (name, form, horizon), e in sorted(errors.items()):
        e = np.asarray(e)
        out.setdefault(name, {}).setdefault(form, {})[str(horizon)] = {
            "bias": float(np.median(e)), "median_abs": float(np.median(np.abs(e))), "n": int(e.size)}
    return out


def main(argv=()):
    groups = list(argv) or list(DEVELOPMENT)
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise ValueError(f"groups={bad}: not among the valid groups {list(GROUPS)}")
    errors = {}
    for group in groups:
        spec_name, steps = GROUPS[group]
        for config in expand(load_spec(SPECS_DIR / f"{spec_name}.toml")):
            trace = read_trace(ROOT / run_id(config))
            momentum = run_method(config.to_dict())[1]
            for at in steps:
                for key, err in run_errors(trace, momentum, at).items():
                    errors.setdefault(key, []).append(err)
    summary = summarize(errors)
    for name, forms in summary.items():
        for form, by_h in forms.items():
            cells = [f"+{h}: bias {v['bias']:+.2f}, median |err| {v['median_abs']:.2f} (n {v['n']})"
                     for h, v in by_h.items()]
            print(f"{name:10s} {form:6s} " + "  ".join(cells))
    atomic_write_json(OUT, {"command": "python -m analyses whatif_rate_forms", "groups": groups, "forms": summary})
    return 0
