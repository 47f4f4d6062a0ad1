"""The link's protocol (docs/theory.md §9) on the development and evaluation families of issue 16:
per family and pooled over each role, the link (``prediction="auto"``: the response model where the
probe recorded its inputs) beside the old NQM link, persistence, one mode at the network's h and the
constant 0, on the same points; per regime of the network's h/edge; the within-probe layer ranking;
the log10-norm error. Writes ``results/link_families.json``.

The roles were fixed before any score was looked at: the model (:mod:`dynamics.nqm.response`, its
input smoothing) was chosen on the development families only; the evaluation families are
reported, never used to choose. The held-out families (``link_heldout_*``) were written after the
last choice (the causal response inputs) and scored once with the default link; the second held-out
family (``link_heldout2_*``) was committed before any run of it and scored once with the final default,
after the candidates (f), (g) were rejected on the development families. Per family and pooled, the
protocol's ceilings of every target (``ceiling*``: Spearman, sign, calibration floor, small h, layer
ranking, log10-norm floor) and where the link's sign misses (``sign_misses``).

    for f in experiments/specs/link_dev_*.toml experiments/specs/link_eval_*.toml experiments/specs/link_heldout*.toml; do
        .venv/bin/optdyn sweep $f --workers 1; done          # ~25 CPU-min on 2 shared cores
    .venv/bin/python -m analyses link_families --variants    # -> results/link_families.json
"""

import argparse
from pathlib import Path

import numpy as np
import xarray as xr

from experiments import store
from experiments.linking.core import link
from experiments.linking.report import format_protocol, protocol_scores, ranking_ceiling

SPECS = Path(__file__).resolve().parents[1] / "experiments" / "specs"
DEVELOPMENT = ("link_dev_seed_cnn", "link_dev_mlp_digits", "link_dev_gru_pytext")
# written after every choice above was made and scored once with the default link (nothing chosen on them)
HELDOUT = ("link_heldout_seed_cnn", "link_heldout_mlp_digits")
# written and committed before any run of it, after the candidates (f), (g) were rejected on the development
# families; scored once with the default link (nothing chosen on it)
HELDOUT2 = ("link_heldout2_mlp_mnist1d",)
EVALUATION = ("link_eval_resnet_mnist1d", "link_eval_transformer_pytext", "link_eval_seed_cnn_sgd",
              "link_eval_seed_cnn_b128", "link_eval_linreg")
OUT = Path(__file__).resolve().parents[1] / "results" / "link_families.json"


def family(name, root=None, **options):
    """The link Dataset of one family's finished runs (not written beside the runs)."""
    return link(SPECS / f"{name}.toml", root=root, recompute=True, write=False, **options)


def pooled(datasets, scores):
    """Protocol scores over several families' link Datasets together (layers differ between
    families, so the points are pooled flat)."""
    keys = ("pred_grad_corr", "theory_grad_corr", "theory_grad_sq_norm", "nqm_grad_corr", "base_persist_corr", "base_one_mode_corr", "base_const_corr",
            "meas_grad_corr", "pred_grad_sq_norm", "nqm_grad_sq_norm", "base_persist_sq", "meas_grad_sq_norm")
    keys += tuple(f"meas_{s}{i}_grad_{q}" for q in ("corr", "sq_norm") for s in ("half", "alt") for i in (1, 2)
                  if all(f"meas_{s}{i}_grad_{q}" in d for d in datasets))
    parts = []
    for i, ds in enumerate(datasets):
        ratio = ds["edge_ratio_global"].broadcast_like(ds["meas_grad_corr"])
        flat = xr.Dataset({k: ds[k] for k in keys}).assign(edge_ratio_global=ratio)
        flat = flat.stack(point=[d for d in ("run", "probe_step", "layer") if d in flat.dims]).reset_index("point")
        flat = flat.drop_vars([c for c in flat.coords if c != "point"]).assign_coords(point=np.arange(flat.sizes["point"]))
        parts.append(flat.expand_dims(run=[i]).rename(point="layer"))  # one "probe" row per family
    ds = xr.concat(parts, dim="run", join="outer")
    sc = protocol_scores(ds)
    # a row here is a family, not a probe: the within-probe ranking is the families' probe-weighted mean
    sc["layer_ranking"], sc["layer_ranking_probes"] = {}, {}
    for label in scores[0]["layer_ranking"]:
        pairs = [(f["layer_ranking"][label], f["layer_ranking_probes"][label]) for f in scores
                 if f["layer_ranking_probes"][label]]
        n = sum(c for _, c in pairs)
        sc["layer_ranking"][label] = float(sum(v * c for v, c in pairs) / n) if n else float("nan")
        sc["layer_ranking_probes"][label] = n
    if all("ceiling_layer_ranking" in f for f in scores):
        n = sum(f["ceiling_layer_ranking"]["probes"] for f in scores)
        r = sum(f["ceiling_layer_ranking"]["split_half"] * f["ceiling_layer_ranking"]["probes"] for f in scores
                if f["ceiling_layer_ranking"]["probes"]) / n if n else float("nan")
        sc["ceiling_layer_ranking"] = ranking_ceiling(r, n)
    return sc


def measured(ds):
    """What the probe measured, independent of any model: block top eigenvalues <= 0 (points whose
    regime is 'undefined'), batch sharpness over the network's λ_max, lr·batch sharpness over the
    edge, and the share of points the link predicts."""
    r = (ds["batch_sharpness_global"] / ds["sharpness_global"]).values.ravel()
    r = r[np.isfinite(r)]
    e = (ds["lr"] * ds["batch_sharpness_global"] / ds["edge"]).values.ravel()
    e = e[np.isfinite(e)]
    q = lambda x, p: float(np.quantile(x, p)) if x.size else float("nan")  # noqa: E731
    return {"block_top_eigenvalue_le_0": int((ds["sharpness"] <= 0).sum()),
            "block_points": int(np.isfinite(ds["sharpness"]).sum()),
            "regime_undefined": int((ds["regime"] == "undefined").sum()),
            "batch_sharpness_over_lambda_max": {"median": q(r, 0.5), "q10": q(r, 0.1), "q90": q(r, 0.9)},
            "lr_batch_sharpness_over_edge": {"median": q(e, 0.5), "max": float(e.max()) if e.size else float("nan")},
            "predicted_share_where_measured": float(np.isfinite(ds["pred_grad_corr"]).sum()
                                                    / max(int(np.isfinite(ds["meas_grad_corr"]).sum()), 1))}


def sign_misses(ds):
    """Where the link's sign misses, per regime of the network's h/edge (protocol points): the count of
    points and of misses (predicted > 0 where measured < 0, and the reverse), the mean link, theory,
    persistence and measured values at the misses, the share of misses with |measured| < 0.05 (within
    the window's sampling noise of 0), and the median drift share D/(N + S⁺) at the misses and over the
    regime (the response model's parts, ``pred_drift``)."""
    from experiments.linking.report import REGIMES, _dims, _flat, protocol_points

    keep = protocol_points(ds)
    f = lambda k: np.where(keep, _flat(ds, k), np.nan)  # noqa: E731
    meas, link_, theory, pers = f("meas_grad_corr"), f("pred_grad_corr"), f("theory_grad_corr"), f("base_persist_corr")
    ratio = np.asarray(ds["edge_ratio_global"].broadcast_like(ds["meas_grad_corr"]).transpose(*_dims(ds)).values, float)
    share = f("pred_drift") / (f("grad_noise") + np.clip(f("grad_signal"), 0, None))
    ok = np.isfinite(meas) & np.isfinite(link_)
    miss = ok & (np.sign(link_) != np.sign(meas))
    mean = lambda x, m: float(np.nanmean(x[m])) if m.any() else float("nan")  # noqa: E731
    med = lambda x, m: float(np.nanmedian(x[m])) if m.any() else float("nan")  # noqa: E731
    out = {}
    for reg, lo, hi in REGIMES:
        r = ok & (ratio >= lo) & (ratio < hi)
        m = r & miss
        out[reg] = {"n": int(r.sum()), "misses": int(m.sum()), "pred_pos_meas_neg": int((m & (link_ > 0)).sum()),
                    "pred_neg_meas_pos": int((m & (link_ < 0)).sum()), "mean_link": mean(link_, m),
                    "mean_theory": mean(theory, m), "mean_persistence": mean(pers, m), "mean_meas": mean(meas, m),
                    "share_abs_meas_below_0.05": mean(np.abs(meas) < 0.05, m),
                    "drift_share_median_misses": med(share, m), "drift_share_median_all": med(share, r)}
    return out


def bates_granger(ds):
    """The alternative to equal weights that was tried on the development families: weights
    from each run's past errors, w = MSE_persistence / (MSE_theory + MSE_persistence) over all
    layers of the probes before (equal until two earlier probes were scored); ``pred_*`` replaced."""
    out = ds.copy()
    for name, theory, pers, meas, log in (("pred_grad_corr", "theory_grad_corr", "base_persist_corr",
                                           "meas_grad_corr", False),
                                          ("pred_grad_sq_norm", "theory_grad_sq_norm", "base_persist_sq",
                                           "meas_grad_sq_norm", True)):
        f = np.log if log else (lambda x: x)
        a, b, m = f(ds[theory]), f(ds[pers]), f(ds[meas])
        ok = np.isfinite(a) & np.isfinite(b) & np.isfinite(m)
        past = lambda e: e.where(ok).sum("layer").cumsum("probe_step").shift(probe_step=1)  # noqa: E731
        n = ok.sum("layer").cumsum("probe_step").shift(probe_step=1)
        w = (past((b - m) ** 2) / (past((a - m) ** 2) + past((b - m) ** 2))).where(n >= 2 * ds.sizes["layer"])
        w = w.fillna(0.5)
        mixed = xr.where(np.isfinite(b), w * a + (1 - w) * b, a)
        out[name] = np.exp(mixed) if log else mixed
    return out


def theory_residuals(ds):
    """Why correcting the theory by its past residuals can help or not: the Pearson correlation of the
    theory's residual e = meas − theory at p with e at p−1 (``lag1``) and with the mean of e over q < p
    (``past_mean``), same run and layer; subtracting a past residual lowers the error variance only where
    that correlation exceeds ½ (var(e_p − e_{p−1}) = 2σ²(1 − r)). ``with_persistence``: the correlation
    of the theory's and persistence's errors (a combination gains most where it is low)."""
    from scipy import stats

    e = ds["meas_grad_corr"] - ds["theory_grad_corr"]
    prev = e.shift(probe_step=1)
    n = np.isfinite(prev).cumsum("probe_step")
    past = (prev.fillna(0.0).cumsum("probe_step") / n).where(n > 0)
    e_p = ds["meas_grad_corr"] - ds["base_persist_corr"]
    out = {}
    for label, other in (("lag1", prev), ("past_mean", past), ("with_persistence", e_p)):
        a, b = e.values.ravel(), other.broadcast_like(e).values.ravel()
        ok = np.isfinite(a) & np.isfinite(b) & np.isfinite(ds["base_persist_corr"].values.ravel())
        out[label] = float(stats.pearsonr(a[ok], b[ok]).statistic) if ok.sum() > 2 else float("nan")
    return out


def inverse_variance(ds):
    """Candidate (d): weights inversely proportional to each forecast's error variance from the model
    of the estimator, w_theory = v_P / (v_T + v_P), per run and layer. The window's sampling variance
    is v_s = (half₁ − half₂)²/4 (Spearman–Brown: the full window's error variance is half a half's;
    E(half₁ − half₂)² = 2σ_h²); each forecast's own error variance is its past mean squared error
    (probes q < p, same run and layer) less the target's sampling variance, which both share and which
    does not change the optimal weights. Equal until two earlier probes; the norm keeps equal weights
    (no half-window norms are recorded); ``pred_grad_corr`` replaced."""
    out = ds.copy()
    theory, pers, meas = ds["theory_grad_corr"], ds["base_persist_corr"], ds["meas_grad_corr"]
    v_s = (ds["meas_half1_grad_corr"] - ds["meas_half2_grad_corr"]) ** 2 / 4

    def past_var(err):
        e = (err**2 - v_s).shift(probe_step=1)
        n = np.isfinite(e).cumsum("probe_step")
        return (e.fillna(0.0).cumsum("probe_step") / n).where(n >= 2).clip(min=1e-6)

    v_t, v_p = past_var(meas - theory), past_var(meas - pers)
    w = (v_p / (v_t + v_p)).fillna(0.5)
    out["pred_grad_corr"] = xr.where(np.isfinite(pers), w * theory + (1 - w) * pers, theory)
    return out


def with_nqm(ds):
    """Candidate (e): equal weights over every forecast at hand that has no fitted constant and
    ranks layers — the response model, persistence and the earlier NQM link (``nqm_grad_corr``);
    the default's forecast where persistence is undefined; ``pred_grad_corr`` replaced."""
    out = ds.copy()
    three = (ds["theory_grad_corr"] + ds["base_persist_corr"] + ds["nqm_grad_corr"]) / 3
    out["pred_grad_corr"] = xr.where(np.isfinite(three), three, ds["pred_grad_corr"])
    return out


def top_direction(ds, noise_term):
    """Candidates (f) ``noise_term="mode"`` and (g) ``"exact"``: the theory of
    :func:`dynamics.nqm.response.top_direction_response` (the mean gradient's part along the network's
    top Ritz vector, ``grad_signal_top``, given the top mode's displacement correlation at h = lr·λ_max)
    from the probe's raw inputs, combined with persistence as the default is; ``pred_grad_corr`` and
    ``theory_grad_corr`` replaced (the norm is the default's: N + S⁺ either way)."""
    from dynamics.nqm.response import top_direction_response
    from experiments.linking.response import forecast_link

    parts = []
    for r in ds["run"].values:
        x = ds.sel(run=r)
        g = lambda k: x[k].broadcast_like(x["grad_signal"]).values  # noqa: E731
        out = top_direction_response(str(x["opt"].values), g("lr"), float(x["momentum"].values), g("grad_signal"),
                                     g("grad_noise"), g("grad_curv"), g("grad_curv_mean"), g("buffer_curv"),
                                     g("grad_signal_top"), g("sharpness_global"), noise_term=noise_term)
        parts.append(out["corr"])
    theory = xr.DataArray(np.stack(parts), dims=("run",) + ds["grad_signal"].dims[-2:],
                          coords={d: ds[d] for d in ("run",) + ds["grad_signal"].dims[-2:]})
    theory = theory.transpose(*ds["theory_grad_corr"].dims).where(np.isfinite(ds["theory_grad_corr"]))
    corr, _ = forecast_link("persistence", theory, ds["theory_grad_sq_norm"], ds["meas_grad_corr"],
                            ds["meas_grad_sq_norm"])
    return ds.assign(theory_grad_corr=theory, pred_grad_corr=corr)


def variants(names, linked, root=None):
    """The forecasts tried (candidates of docs/findings/link.md), pooled over ``names``: label →
    protocol scores. Chosen on the development families only; the evaluation ones are reported."""
    makes = {"combine=none (theory alone)": lambda n: family(n, root, combine="none"),
             "combine=persistence (equal weights, default)": lambda n: linked[n],
             "combine=residual (a: theory + past mean residual)": lambda n: family(n, root, combine="residual"),
             "combine=change (b: persistence + theory's change)": lambda n: family(n, root, combine="change"),
             "combine=persistence2 (c: theory with two past windows)": lambda n: family(n, root, combine="persistence2"),
             "inverse-variance weights, sampling variance from the halves (d)": lambda n: inverse_variance(linked[n]),
             "Bates-Granger weights from past errors": lambda n: bates_granger(linked[n]),
             "equal weights over theory, persistence and the NQM link (e)": lambda n: with_nqm(linked[n]),
             "top direction as the top mode's displacement, on the default (f)":
                 lambda n: top_direction(linked[n], "mode"),
             "top direction, exact one-step noise term (g)": lambda n: top_direction(linked[n], "exact"),
             "(g) with no signal along the top direction (its exact noise term alone)":
                 lambda n: top_direction(linked[n].assign(grad_signal_top=0 * linked[n]["grad_signal_top"]), "exact")}
    out = {}
    for label, make in makes.items():
        dss = [make(n) for n in names]
        scs = [protocol_scores(d) for d in dss]
        out[label] = pooled(dss, scs)
        edge = lambda s, p: {k: s["regimes"][">=0.5"][p][k] for k in  # noqa: E731
                             ("n", "mean_pred", "mean_meas", "pred_pos_meas_neg", "sign_agreement")}
        out[label]["families"] = {n: {"spearman": s["corr"]["link"]["spearman"],
                                      "sign_agreement": s["corr"]["link"]["sign_agreement"],
                                      "edge_link": edge(s, "link"), "edge_theory": edge(s, "theory")}
                                  for n, s in zip(names, scs)}
    return out


def main(argv=()):
    parser = argparse.ArgumentParser(prog="python -m analyses link_families", description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="store root of the runs (default: the specs' root)")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--variants", action="store_true",
                        help="also the forecasts tried (development: chosen on; evaluation: reported) and the "
                             "development families pooled for response_smooth 1 (default), 2, 3 (trailing means)")
    args = parser.parse_args(list(argv))
    result = {"development": DEVELOPMENT, "evaluation": EVALUATION, "held_out": HELDOUT, "held_out2": HELDOUT2,
              "families": {}, "pooled": {}}
    linked = {}
    for role, names in (("development", DEVELOPMENT), ("evaluation", EVALUATION), ("held_out", HELDOUT),
                        ("held_out2", HELDOUT2)):
        for name in names:
            ds = family(name, args.root)
            linked[name] = ds
            sc = protocol_scores(ds)
            sc["skipped"] = ds.attrs.get("skipped", "")
            sc["runs"] = int(ds.sizes.get("run", 1))
            sc["measured"] = measured(ds)
            sc["theory_residuals"] = theory_residuals(ds)
            sc["sign_misses"] = sign_misses(ds)
            result["families"][name] = {"role": role, **sc}
            print(f"=== {name} ({role}, {sc['runs']} runs)\n{format_protocol(sc)}\n")
        sc = pooled([linked[n] for n in names], [result["families"][n] for n in names])
        result["pooled"][role] = sc
        print(f"=== pooled {role}\n{format_protocol(sc)}\n")
    if args.variants:
        for role, names in (("development", DEVELOPMENT), ("evaluation", EVALUATION)):
            result[f"{role}_variants"] = variants(names, linked, args.root)
            for label, sc in result[f"{role}_variants"].items():
                print(f"=== {role}, {label}\n{format_protocol(sc)}\n")
        for smooth in (1, 2, 3):
            dss = [family(n, args.root, response_smooth=smooth) for n in DEVELOPMENT]
            sc = pooled(dss, [protocol_scores(d) for d in dss])
            result["development_variants"][f"response_smooth={smooth}"] = sc
            print(f"=== development, response_smooth={smooth}\n{format_protocol(sc)}\n")
    store.atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0
