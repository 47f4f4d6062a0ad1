"""Guards for the experiments side: each test here fails on a named, plausible breakage (a
mutation) that the end-to-end tests do not see, and passes on the code.

- the link's lr at a probe step p is the lr of step p (an lr drop exactly at a probe);
- the network's top mode is capped at (1 − EDGE_MARGIN) = 0.95 of the stability edge (a
  constructed trace with the top mode past the edge);
- the link's scores and per-layer table compare predicted against measured (a made-up link
  dataset with known answers);
- the clip factors are min(1, ·): a threshold above the gradient norm leaves the gradients
  bit-for-bit and records factors exactly 1;
- the atomic write's temporary file is beside its target (same directory, so the rename is
  atomic), and ``DONE`` is the last file of a run directory to appear.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from dynamics.nqm.layer import LayerSpectrum, layer_prediction
from dynamics.quadratic import stability_edge
from experiments import store
from experiments.linking.core import link_trace
from experiments.linking.report import format_report, layer_table, link_scores
from experiments.linking.signal import fluctuation_correlation
from experiments.runs.optim import clip_gradients

# ------------------------------------------------------------------------------------------
# the link on constructed traces

@pytest.fixture
def rng():
    return np.random.default_rng(0)


LAYERS = ("conv", "fc")
N_PARAMS = {"conv": 50, "fc": 200}
SHARP = {"conv": 1.2, "fc": 0.6}   # block top eigenvalues
TRACE = {"conv": 8.0, "fc": 12.0}  # Hutchinson traces
NOISE = {"conv": 0.5, "fc": 2.0}


def _link_input(lr, probes, lam_global, rng, config=None):
    """A trace as the tracer writes it: per-step lr, grad_norm, grad_cos (random: the
    measured side is not what is tested here), per-probe constant per-layer summaries."""
    T = lr.size
    P = len(probes)
    per_probe = lambda d: (("probe_step", "layer"), np.tile([d[k] for k in LAYERS], (P, 1)))  # noqa: E731
    cos = rng.uniform(-1, 1, (T, len(LAYERS)))
    cos[0] = np.nan
    return xr.Dataset(
        {"lr": ("step", lr), "grad_norm": (("step", "layer"), rng.uniform(0.5, 2.0, (T, len(LAYERS)))),
         "grad_cos": (("step", "layer"), cos),
         "sharpness": per_probe(SHARP), "hessian_trace": per_probe(TRACE), "grad_noise": per_probe(NOISE),
         "sharpness_global": ("probe_step", np.full(P, float(lam_global))),
         "n_params": ("layer", [N_PARAMS[k] for k in LAYERS])},
        coords={"step": np.arange(T), "layer": list(LAYERS), "probe_step": np.asarray(probes)},
        attrs={"config": config or {"opt": "hb", "lr": float(lr[0]), "momentum": 0.5}})


def _expected_spectrum(layer, lam_global, cap):
    """The layer's spectrum with the network's top mode, written out from the definition
    (docs/theory.md §5; experiments.linking.predict.with_global_mode): top mode λ_G capped at
    ``cap``, weight λ_max,l / (capped λ_G)."""
    sp = LayerSpectrum.from_summary(SHARP[layer], TRACE[layer], N_PARAMS[layer], clip_trace=True)
    lam_g = min(lam_global, cap)
    eig, w = sp.eigenvalues.copy(), sp.weights.copy()
    eig[0], w[0] = lam_g, SHARP[layer] / lam_g
    return LayerSpectrum(eig, w)


def test_link_reads_the_lr_of_the_probe_step_itself(rng):
    """lr 1.0 before step 100 and 0.1 from it on, a probe exactly at 100: everything at that
    probe (lr, h, the cap of the network top mode, the prediction) uses 0.1."""
    method, beta = "hb", 0.5
    edge = float(stability_edge(method, beta))  # 3
    lr = np.where(np.arange(200) < 100, 1.0, 0.1)
    lam_g = 10.0  # h_G = 1 at lr 0.1 (below the edge); 10 at lr 1.0 (capped at 0.95 edge)
    trace = _link_input(lr, [0, 50, 100, 150], lam_g, rng)
    ds = link_trace(trace, combine="none", smooth=1, prediction="stationary")
    at = ds.sel(probe_step=100)
    assert float(at["lr"]) == 0.1 and float(ds["lr"].sel(probe_step=50)) == 1.0
    for layer in LAYERS:
        x = at.sel(layer=layer)
        assert float(x["h"]) == pytest.approx(0.1 * SHARP[layer], rel=1e-15)
        assert float(x["edge_ratio"]) == pytest.approx(0.1 * SHARP[layer] / edge, rel=1e-15)
        want = layer_prediction(method, 0.1, beta, _expected_spectrum(layer, lam_g, 0.95 * edge / 0.1),
                                NOISE[layer], noise_model="curvature")
        assert float(x["pred_grad_corr"]) == pytest.approx(want.grad_corr, rel=1e-9)
        assert float(x["pred_grad_sq_norm"]) == pytest.approx(want.grad_sq_norm, rel=1e-9)
        before = ds.sel(probe_step=50, layer=layer)  # lr 1.0 there: the top mode capped
        want_before = layer_prediction(method, 1.0, beta, _expected_spectrum(layer, lam_g, 0.95 * edge),
                                       NOISE[layer], noise_model="curvature")
        assert float(before["pred_grad_corr"]) == pytest.approx(want_before.grad_corr, rel=1e-9)
    assert float(at["edge_ratio_global"]) == pytest.approx(0.1 * lam_g / edge, rel=1e-15)
    # the two lrs give clearly different predictions, so the check above could fail
    assert abs(float(at["pred_grad_corr"].sel(layer="fc"))
               - float(ds["pred_grad_corr"].sel(probe_step=50, layer="fc"))) > 0.1


@pytest.mark.parametrize("method, beta", [("hb", 0.5), ("nag", 0.9), ("gd", 0.0)])
def test_network_top_mode_past_the_edge_is_held_at_095_of_it(rng, method, beta):
    """λ_G·lr = 4/3 of the edge: the prediction is that of a mode at 0.95 of the edge
    (stationary and, after the burn-in, through the schedule), not of an unstable or excluded
    one; with the signal term, its lag-1 correlation is that of h = 0.95·edge."""
    edge = float(stability_edge(method, beta))
    lr0 = 0.5
    lam_g = 4 / 3 * edge / lr0
    T = 800
    probes = np.arange(0, T, 100)
    trace = _link_input(np.full(T, lr0), probes, lam_g, rng, {"opt": method, "lr": lr0, "momentum": beta})
    ds = link_trace(trace, combine="none", smooth=1, prediction="stationary")
    assert np.allclose(ds["edge_ratio_global"], 4 / 3)
    for layer in LAYERS:
        want = layer_prediction(method, lr0, beta, _expected_spectrum(layer, lam_g, 0.95 * edge / lr0),
                                NOISE[layer], noise_model="curvature")
        got = ds.sel(layer=layer)
        np.testing.assert_allclose(got["pred_grad_corr"], want.grad_corr, rtol=1e-9)
        np.testing.assert_allclose(got["pred_grad_sq_norm"], want.grad_sq_norm, rtol=1e-9)
        assert int(got["pred_n_unstable"].max()) == 0
    # at 0.95 of the edge the network mode dominates and flips the gradient
    assert float(ds["pred_grad_corr"].max()) < -0.3
    sched = link_trace(trace, combine="none", smooth=1, prediction="schedule")
    # constant lr from x = 0: the moments converge like ρ^(2t), ρ < 0.98 at 0.95 edge, so by
    # step 400 the gap is < 0.98^800 ≈ 1e-7 of the stationary value (relative)
    late = sched.sel(probe_step=sched["probe_step"] >= 500)
    np.testing.assert_allclose(late["pred_grad_corr"], ds["pred_grad_corr"].sel(probe_step=late["probe_step"]),
                               rtol=1e-5)
    trace["grad_signal"] = ("probe_step", np.full(probes.size, 1.0))
    sig = link_trace(trace, combine="none", smooth=1, prediction="stationary", signal="fluct")
    np.testing.assert_allclose(sig["pred_mean_corr"], fluctuation_correlation(method, 0.95 * edge, beta),
                               rtol=1e-12)


# ------------------------------------------------------------------------------------------
# scores and the per-layer table on a made-up link dataset

def _made_up_link():
    """Two layers × five probes; the fifth probe is missing (NaN) in both. Layer a: predicted
    correlation 0.1..0.4, measured in the order 1, 3, 2, 4 (Pearson = Spearman = 0.8: deviations
    ±1.5, ±0.5 give Σxy = 4, Σx² = Σy² = 5); layer b: all negative, measured in the same rank order
    (Spearman 1) but one sign flipped. Norms: predicted 10^(0,1,2,3), measured 10^(0,2,1,3) in both layers."""
    nan = np.nan
    pc = np.array([[0.1, -0.1], [0.2, -0.2], [0.3, -0.3], [0.4, -0.4], [nan, nan]])
    mc = np.array([[0.1, 0.05], [0.3, -0.2], [0.2, -0.3], [0.4, -0.4], [nan, nan]])
    ps = 10.0 ** np.array([[0, 0], [1, 1], [2, 2], [3, 3], [nan, nan]])
    ms = 10.0 ** np.array([[0, 0], [2, 2], [1, 1], [3, 3], [nan, nan]])
    er = np.array([[0.5, 1.5], [0.6, 1.1], [0.7, 1.2], [0.8, 1.3], [nan, nan]])
    reg = np.array([["ripple", "flip"], ["ripple", "flip"], ["flip", "divergent"], ["monotone", "flip"],
                    ["ripple", "flip"]])
    dims = ("probe_step", "layer")
    return xr.Dataset({"pred_grad_corr": (dims, pc), "meas_grad_corr": (dims, mc), "pred_grad_sq_norm": (dims, ps),
                       "meas_grad_sq_norm": (dims, ms), "edge_ratio": (dims, er), "regime": (dims, reg)},
                      coords={"probe_step": [0, 10, 20, 30, 40], "layer": ["a", "b"]})


def _ranks(x):
    return np.argsort(np.argsort(x)).astype(float)


def test_link_scores_compare_predicted_with_measured():
    ds = _made_up_link()
    sc = link_scores(ds)
    keep = np.isfinite(ds["meas_grad_corr"].values)
    p, m = ds["pred_grad_corr"].values[keep], ds["meas_grad_corr"].values[keep]
    c = sc["grad_corr"]
    assert c["n"] == 8
    assert c["pearson"] == pytest.approx(np.corrcoef(p, m)[0, 1], rel=1e-12)
    assert c["spearman"] == pytest.approx(np.corrcoef(_ranks(p), _ranks(m))[0, 1], rel=1e-12)  # no ties
    assert c["sign_agreement"] == 7 / 8
    assert c["mean_abs_error"] == pytest.approx(np.mean(np.abs(p - m)), rel=1e-12)
    # 8 points in 10 bins: one point a bin, so calibration error = mean absolute error
    assert c["calibration_error"] == pytest.approx(c["mean_abs_error"], rel=1e-12)
    assert link_scores(ds, bins=1)["grad_corr"]["calibration_error"] == pytest.approx(abs(p.mean() - m.mean()),
                                                                                     abs=1e-15)
    n = sc["log10_grad_sq_norm"]
    # on log10: predicted (0,1,2,3), measured (0,2,1,3) in each layer: Pearson = Spearman = 0.8
    assert n["n"] == 8 and n["pearson"] == pytest.approx(0.8, rel=1e-12) and n["spearman"] == pytest.approx(0.8)
    assert n["mean_abs_error"] == pytest.approx(0.5) and n["sign_agreement"] == 1.0


def test_layer_table_on_known_answers():
    t = layer_table(_made_up_link())
    assert list(t.index) == ["a", "b"]
    a, b = t.loc["a"], t.loc["b"]
    assert a["n"] == 4 and b["n"] == 4
    assert a["h/edge"] == pytest.approx(0.65) and b["h/edge"] == pytest.approx(1.25)
    assert a["regime"] == "ripple" and b["regime"] == "flip"
    assert a["pred_corr"] == pytest.approx(0.25) and a["meas_corr"] == pytest.approx(0.25)
    assert b["pred_corr"] == pytest.approx(-0.25) and b["meas_corr"] == pytest.approx(-0.2125)
    assert a["spearman"] == pytest.approx(0.8) and b["spearman"] == 1.0  # b: same ranks
    assert a["sign_agree"] == 1.0 and b["sign_agree"] == 0.75
    assert a["pred_|g|^2"] == pytest.approx(1111 / 4) and a["meas_|g|^2"] == pytest.approx(1111 / 4)
    report = format_report(_made_up_link())
    assert "grad_corr: n=8" in report and "log10_grad_sq_norm: n=8, pearson=0.8, spearman=0.8" in report


# ------------------------------------------------------------------------------------------
# clipping: a factor is min(1, ·)

def _grads(scale):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 4, 5)]
    for p, s in zip(params, (0.1, 2.0, 10.0)):
        p.grad = scale * s * torch.randn(p.shape)
    return {"a": params[:1], "b": params[1:]}, params


@pytest.mark.parametrize("mode", ["global", "layer", "value"])
def test_threshold_above_the_gradient_leaves_it_and_records_factors_exactly_one(mode):
    groups, params = _grads(1.0)
    raw = [p.grad.clone() for p in params]
    total = float(torch.sqrt(sum((g ** 2).sum() for g in raw)))
    c = 10 * max(total, max(float(g.abs().max()) for g in raw))  # above every norm and entry
    g_factor, l_factors = clip_gradients(groups, mode, c)
    for r, p in zip(raw, params):
        assert torch.equal(p.grad, r)
    assert float(g_factor) == 1.0
    assert all(float(f) == 1.0 for f in l_factors.values()) and set(l_factors) == {"a", "b"}


def test_layer_clipping_of_one_layer_only():
    """Threshold between the two layers' norms: layer a untouched (factor exactly 1), layer b
    scaled to the threshold; the global factor is the change of the global norm."""
    groups, params = _grads(1.0)
    na = float(torch.linalg.vector_norm(params[0].grad))
    nb = float(torch.sqrt(sum((p.grad ** 2).sum() for p in params[1:])))
    c = (na + nb) / 2
    assert na < c < nb
    g_factor, f = clip_gradients(groups, "layer", c)
    assert float(f["a"]) == 1.0
    assert float(f["b"]) == pytest.approx(c / (nb + 1e-6), rel=1e-6)
    assert float(g_factor) == pytest.approx(np.hypot(na, c) / np.hypot(na, nb), rel=1e-5)


@pytest.mark.parametrize("mode", ["global", "layer"])
def test_clip_factor_with_small_gradients_is_that_of_clip_grad_norm(mode):
    """Norms ~1e-4: the 1e-6 in c/(‖g‖ + 1e-6) (clip_grad_norm_'s convention) is ~1 % of the
    factor, far above float32 rounding (1e-7), so the formula is checked, not just ≈ c/‖g‖."""
    groups, params = _grads(1e-5)
    raw = [p.grad.clone() for p in params]
    n_b = float(torch.sqrt(sum((g.double() ** 2).sum() for g in raw[1:])))
    n = float(torch.sqrt(sum((g.double() ** 2).sum() for g in raw)))
    c = 1e-5
    g_factor, f = clip_gradients(groups, mode, c)
    if mode == "global":
        assert float(g_factor) == pytest.approx(c / (n + 1e-6), rel=1e-5)
        assert float(f["b"]) == float(g_factor)
    else:
        assert float(f["b"]) == pytest.approx(c / (n_b + 1e-6), rel=1e-5)
    assert c / (n + 1e-6) < 0.999 * c / n  # the 1e-6 is visible at this tolerance


def test_value_clipping_factors_are_measured_and_a_zero_gradient_has_factor_one():
    """"value" clips entries; each factor is ‖clipped‖/‖raw‖ (small norms < 1 too), and a
    layer with a zero gradient, unchanged by clipping, has factor exactly 1 (not 0/0 or 0)."""
    groups, params = _grads(1e-2)
    params[0].grad.zero_()
    raw = [p.grad.clone() for p in params]
    c = 0.05
    g_factor, f = clip_gradients(groups, "value", c)
    assert float(f["a"]) == 1.0
    clipped_b = torch.sqrt(sum((r.clamp(-c, c).double() ** 2).sum() for r in raw[1:]))
    raw_b = torch.sqrt(sum((r.double() ** 2).sum() for r in raw[1:]))
    assert float(raw_b) < 1 and float(clipped_b / raw_b) < 0.9
    assert float(f["b"]) == pytest.approx(float(clipped_b / raw_b), rel=1e-5)
    assert float(g_factor) == pytest.approx(float(clipped_b / raw_b), rel=1e-5)  # layer a adds nothing
    with pytest.raises(ValueError, match="clip='norm' is unknown here; valid: global, layer, value"):
        clip_gradients(groups, "norm", c)


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_clip_factors_not_recorded_after_a_flush_are_one(engine):
    """Factors recorded in one block must not leak into the next block's unrecorded steps."""
    from experiments.trace.tracer import Tracer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tracer = Tracer(model, opt, block_size=2, engine=engine)
    x = torch.randn(8, 3)
    for step in range(5):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        tracer.after_backward()
        if step < 2:
            tracer.record_clip(global_factor=0.5, layer_factors=[0.25] * len(tracer.layers))
        opt.step()
        tracer.after_step()
    ds = tracer.dataset()
    np.testing.assert_array_equal(ds["clip_factor_global"].values, [0.5, 0.5, 1, 1, 1])
    np.testing.assert_array_equal(ds["clip_factor"].values[:2], 0.25)
    np.testing.assert_array_equal(ds["clip_factor"].values[2:], 1.0)


def test_clip_factor_recorded_in_training_is_one_below_the_threshold():
    from experiments.runs import RunConfig, train

    cfg = RunConfig(model="mlp", data="digits", model_args={"hidden": [8]}, steps=6, batch_size=16, threads=1,
                    opt="gd", lr=0.1, clip="global", clip_value=1e6)
    trace, _ = train(cfg)
    assert np.all(trace["clip_factor_global"].values == 1.0)
    assert np.all(trace["clip_factor"].values == 1.0)


# ------------------------------------------------------------------------------------------
# the store: temporary file beside its target, DONE last

def test_atomic_write_renames_from_the_targets_directory(tmp_path, monkeypatch):
    moves = []
    real = os.replace

    def spy(src, dst, *a, **k):
        moves.append((Path(src), Path(dst)))
        assert Path(src).exists()
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", spy)
    target = tmp_path / "deep" / "er" / "x.json"
    store.atomic_write_json(target, {"a": 1})
    assert len(moves) == 1
    src, dst = moves[0]
    assert dst == target and src.parent == target.parent and src.name.startswith(".tmp-")
    assert store.read_json(target) == {"a": 1}
    assert os.listdir(target.parent) == ["x.json"]


def test_done_is_the_last_file_of_a_run_to_appear(tmp_path, monkeypatch):
    run_dir = tmp_path / "r"
    store.write_failure(run_dir, {"lr": 1.0}, "Traceback: boom")  # a retried run
    seen = []
    real = os.replace

    def spy(src, dst, *a, **k):
        real(src, dst, *a, **k)
        seen.append((Path(dst).name, sorted(os.listdir(run_dir))))

    monkeypatch.setattr(os, "replace", spy)
    trace = xr.Dataset({"loss": ("step", [1.0, 0.5])}, coords={"step": [0, 1]})
    store.write_run(run_dir, {"lr": 1.0}, trace, {"diverged": False})
    names = [name for name, _ in seen]
    assert names[-1] == store.DONE and names.count(store.DONE) == 1
    assert set(names) == {store.CONFIG, store.TRACE, store.SUMMARY, store.DONE}
    # when DONE appears everything else is there and FAILED is gone; before, no DONE
    assert seen[-1][1] == sorted([store.CONFIG, store.TRACE, store.SUMMARY, store.DONE])
    assert all(store.DONE not in files for _, files in seen[:-1])
    assert store.is_done(run_dir) and not store.is_failed(run_dir)


def test_atomic_write_creates_missing_parents_and_writes_canonical_json(tmp_path):
    import json

    target = tmp_path / "a" / "b" / "c" / "x.json"
    obj = {"b": [1, 2], "a": {"z": 1.5, "y": None}}
    store.atomic_write_json(target, obj)
    # sorted keys, indent 2, newline at the end: the same object always gives the same bytes
    assert target.read_text() == json.dumps(obj, indent=2, sort_keys=True) + "\n"
    assert target.read_text().index('"a"') < target.read_text().index('"b"')


def test_json_of_numpy_and_torch_values(tmp_path):
    obj = {"f32": np.float32(0.5), "i64": np.int64(7), "arr": np.arange(3), "t": torch.tensor(2.5),
           "tv": torch.tensor([1.0, 2.0]), "b": np.bool_(True)}
    store.atomic_write_json(tmp_path / "x.json", obj)
    assert store.read_json(tmp_path / "x.json") == {"f32": 0.5, "i64": 7, "arr": [0, 1, 2], "t": 2.5,
                                                    "tv": [1.0, 2.0], "b": True}
    with pytest.raises(TypeError, match="object is not JSON serialisable"):
        store.atomic_write_json(tmp_path / "y.json", {"a": object()})
    assert not (tmp_path / "y.json").exists()


def test_trace_file_is_netcdf3_that_scipy_reads(tmp_path):
    ds = xr.Dataset({"loss": ("step", [1.0, 0.5])}, coords={"step": [0, 1]})
    store.atomic_write_dataset(tmp_path / "t.nc", ds)
    assert (tmp_path / "t.nc").read_bytes()[:3] == b"CDF"  # netCDF classic, what engine="scipy" writes
    xr.testing.assert_identical(xr.open_dataset(tmp_path / "t.nc", engine="scipy").load(), ds)


def test_failure_record_and_states(tmp_path):
    run_dir = tmp_path / "r"
    store.atomic_write_json(run_dir / store.CONFIG, {"lr": 1.0})  # started, neither done nor failed
    assert not store.is_failed(run_dir) and not store.is_done(run_dir)
    store.write_failure(run_dir, {"lr": 2.0}, "Traceback: boom")
    assert store.read_json(run_dir / store.CONFIG) == {"lr": 2.0}
    assert (run_dir / store.FAILED).read_text() == "Traceback: boom"
    assert store.is_failed(run_dir)
    (run_dir / store.DONE).write_text("")  # DONE wins over a stale FAILED
    assert not store.is_failed(run_dir)
    with pytest.raises(ValueError, match=f"path={str(tmp_path / 'x')!r} is not a finished run"):
        store.load_run(tmp_path / "x")


# ------------------------------------------------------------------------------------------
# probes: the noise reported for another batch size

def test_noise_for_a_given_batch_size_is_the_per_example_variance_over_it():
    """tr Cov of a mean over B' examples is σ²/B' (σ² the per-example variance, estimated from
    micro-batch means of b examples as b·Σs²): so noise(B')·B' is the same for every B', and
    equals noise(default)·B (default: the probe batch's own size B)."""
    from experiments.trace.probes import microbatch_moments
    from tests.test_sharpness import Net, data, loss_fn

    torch.manual_seed(3)
    model = Net().double()
    batch = data(16)
    params = list(model.parameters())
    blocks = [[0, 1], [2], [3]]
    default, _ = microbatch_moments(model, params, blocks, loss_fn, batch, 4)
    for b2 in (4, 64):
        noise, _ = microbatch_moments(model, params, blocks, loss_fn, batch, 4, noise_batch_size=b2)
        np.testing.assert_allclose(noise.numpy() * b2, default.numpy() * 16, rtol=1e-12)
    assert float(default.sum()) > 0


# ------------------------------------------------------------------------------------------
# the link's schedule route and smoothing; collect with a failed run

def test_schedule_window_at_probe_zero_skips_step_zero():
    """Step 0 has no previous gradient: the predicted correlation of a window starting at 0 sums
    over t = 1..W−1, as the measured one does (grad_cos is NaN at t = 0)."""
    from dynamics.nqm.schedule import schedule_prediction
    from experiments.linking.predict import schedule_predict_layers

    sp = LayerSpectrum(np.linspace(0.2, 1.0, 10))
    lrs = np.full(100, 1.0)
    corr, sq = schedule_predict_layers("hb", lrs, 0.5, np.array([0, 50]), {"a": [(sp, 0.5)] * 2}, window=50,
                                       align="after")
    ref = schedule_prediction("hb", lrs, 0.5, np.broadcast_to(sp.eigenvalues, (100, 10)),
                              np.broadcast_to(sp.weights * sp.noise_per_mode(0.5, "curvature"), (100, 10)))
    g2, lag = ref["grad_sq"], ref["lag1"]
    t = np.arange(1, 50)
    assert corr[0, 0] == pytest.approx(lag[t].sum() / np.sqrt(g2[t].sum() * g2[t - 1].sum()), rel=1e-12)
    t = np.arange(50, 100)
    assert corr[1, 0] == pytest.approx(lag[t].sum() / np.sqrt(g2[t].sum() * g2[t - 1].sum()), rel=1e-12)
    assert sq[1, 0] == pytest.approx(g2[t].mean(), rel=1e-12)


def test_layer_top_mode_past_the_edge_is_held_below_it_in_the_schedule_route(rng):
    """Without the global mode, a layer whose own top mode has h = 1.2·edge: the schedule route
    holds that mode at 0.95·edge/α at every step, so after the burn-in it gives the stationary
    prediction of the spectrum with that mode at 0.95 of the edge (finite, not diverging)."""
    from dynamics.nqm.stationary import stationary_gradient_moments

    method, beta, lr0 = "hb", 0.5, 0.5
    edge = float(stability_edge(method, beta))
    T = 600
    trace = _link_input(np.full(T, lr0), np.arange(0, T, 100), 0.0, rng)
    trace["sharpness"] = trace["sharpness"] * 0 + 1.2 * edge / lr0
    ds = link_trace(trace, combine="none", smooth=1, prediction="schedule", global_mode=False)
    for layer in LAYERS:
        sp = LayerSpectrum.from_summary(1.2 * edge / lr0, TRACE[layer], N_PARAMS[layer], clip_trace=True)
        # the mode's curvature is capped, its noise (∝ the measured λ, times its weight) is not
        eig = np.minimum(sp.eigenvalues, 0.95 * edge / lr0)
        m = stationary_gradient_moments(method, eig, lr0, beta, sp.weights * sp.noise_per_mode(NOISE[layer], "curvature"))
        late = ds.sel(layer=layer, probe_step=ds["probe_step"] >= 300)
        # from x = 0 the moments converge like ρ^(2t); the capped mode fast (ρ = √β ≈ 0.71), the
        # flattest modes of the power law slower: still 2e-8 off at step 300; 1e-6 allows that
        # (an uncapped mode past the edge would grow without bound)
        np.testing.assert_allclose(late["pred_grad_corr"], m.lag1.sum() / m.grad_sq.sum(), rtol=1e-6)
        np.testing.assert_allclose(late["pred_grad_sq_norm"], m.grad_sq.sum(), rtol=1e-6)


def test_smoothing_is_the_centred_rolling_mean_of_the_probes(rng):
    """smooth=3: the model is fed the centred mean over the probe and its two neighbours (two
    at the ends); with curvature noise the predicted squared norm is linear in the noise."""
    lr = np.full(500, 0.2)
    trace = _link_input(lr, np.arange(0, 500, 100), 0.0, rng)
    noise = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    trace["grad_noise"] = (("probe_step", "layer"), np.stack([noise, noise], 1))
    ds = link_trace(trace, combine="none", smooth=3, prediction="stationary", global_mode=False)
    fed = np.array([1.5, 7 / 3, 14 / 3, 28 / 3, 12.0])
    for layer in LAYERS:
        sp = LayerSpectrum.from_summary(SHARP[layer], TRACE[layer], N_PARAMS[layer], clip_trace=True)
        want = layer_prediction("hb", 0.2, 0.5, sp, fed, noise_model="curvature").grad_sq_norm
        np.testing.assert_allclose(ds["pred_grad_sq_norm"].sel(layer=layer), want, rtol=1e-9)
    np.testing.assert_array_equal(ds["grad_noise"].sel(layer="fc"), noise)  # the output stays raw


def test_collect_skips_a_failed_run_of_the_spec(tmp_path):
    from experiments.sweeps.collect import collect
    from experiments.sweeps.spec import parse_spec

    spec = parse_spec({"name": "s", "root": str(tmp_path), "base": {"model": "linear", "data": "linreg", "steps": 2},
                       "grid": {"lr": [0.1, 0.2]}})
    (_, c0, id0), (_, c1, id1) = spec.points
    trace = xr.Dataset({"loss": ("step", [1.0, 0.5])}, coords={"step": [0, 1]})
    store.write_run(tmp_path / id0, c0.to_dict(), trace, {"final_loss": 0.5, "diverged": False})
    store.write_failure(tmp_path / id1, c1.to_dict(), "Traceback: boom")
    ds = collect(spec)
    assert ds.attrs["n_runs"] == 1
    assert float(ds["final_loss"].sel(lr=0.1)) == 0.5 and np.isnan(float(ds["final_loss"].sel(lr=0.2)))


def test_measured_window_options_and_mean_cosine(rng):
    """Explicit probe steps and an odd window (centred: p − ⌊W/2⌋ ≤ t < p + ⌈W/2⌉), the plain
    mean cosine over the finite steps of the window, the default window (smallest spacing; 50
    for a single probe) and the window's valid range."""
    from experiments.linking.measure import default_window, measured_window

    T = 30
    norms = rng.uniform(0.5, 2.0, T)
    cos = np.concatenate([[np.nan], rng.uniform(-1, 1, T - 1)])
    cos[12] = np.nan
    trace = xr.Dataset({"grad_norm": (("step", "layer"), norms[:, None]), "grad_cos": (("step", "layer"), cos[:, None])},
                       coords={"step": np.arange(T), "layer": ["a"], "probe_step": [0, 10, 20]})
    ds = measured_window(trace, probe_steps=[13], window=5)
    assert list(ds["probe_step"].values) == [13] and ds.attrs["window"] == 5
    t = np.array([11, 13, 14, 15])  # 11..15 without the NaN at 12
    assert float(ds["meas_mean_cos"].squeeze()) == pytest.approx(cos[t].mean(), rel=1e-12)
    assert float(ds["meas_grad_sq_norm"].squeeze()) == pytest.approx(np.mean(norms[11:16] ** 2), rel=1e-12)
    assert int(ds["meas_steps"].squeeze()) == 4
    one = measured_window(trace, window=1, align="after")
    assert one.attrs["window"] == 1
    assert float(one["meas_grad_sq_norm"].sel(probe_step=10, layer="a")) == pytest.approx(norms[10] ** 2)
    with pytest.raises(ValueError, match=r"window=0 is outside the valid range \[1, inf\)"):
        measured_window(trace, window=0)
    with pytest.raises(ValueError, match="align='middle' is unknown; valid: center, after"):
        measured_window(trace, align="middle")
    assert measured_window(trace).attrs["window"] == 10
    assert default_window([0, 30, 40, 100]) == 10 and default_window([7]) == 50 and default_window([5, 5]) == 50


def test_report_edge_cases_bins_and_skipped():
    """bins reach both scores; a layer without a finite pair has n = 0, NaN means and no regime;
    the report names the skipped runs and puts one blank line between table and scores."""
    ds = _made_up_link()
    log_p, log_m = np.log10(ds["pred_grad_sq_norm"].values), np.log10(ds["meas_grad_sq_norm"].values)
    keep = np.isfinite(log_p) & np.isfinite(log_m)
    assert link_scores(ds, bins=1)["log10_grad_sq_norm"]["calibration_error"] == pytest.approx(
        abs(log_p[keep].mean() - log_m[keep].mean()), abs=1e-15)
    empty = ds.copy(deep=True)
    empty["meas_grad_corr"].loc[{"layer": "b"}] = np.nan
    empty["regime"] = empty["regime"].astype(object)
    empty["regime"].loc[{"layer": "b"}] = None
    t = layer_table(empty)
    assert t.loc["b", "n"] == 0 and np.isnan(t.loc["b", "pred_corr"]) and np.isnan(t.loc["b", "meas_corr"])
    assert t.loc["b", "regime"] == ""
    ds.attrs["skipped"] = "r1: opt='adam' is not linked"
    lines = format_report(ds).split("\n")
    assert lines[-1] == "skipped: r1: opt='adam' is not linked"
    assert lines[-4] == "" and lines[-3].startswith("grad_corr: n=8, pearson=") and "h/edge" in lines[0]


def test_mean_cosine_counts_steps_per_layer(rng):
    from experiments.linking.measure import measured_window

    T = 20
    cos = rng.uniform(-1, 1, (T, 2))
    cos[0] = np.nan
    cos[3:8, 1] = np.nan  # layer b: five steps fewer
    trace = xr.Dataset({"grad_norm": (("step", "layer"), np.ones((T, 2))), "grad_cos": (("step", "layer"), cos)},
                       coords={"step": np.arange(T), "layer": ["a", "b"], "probe_step": [0]})
    ds = measured_window(trace, window=T, align="after")
    for j, layer in enumerate("ab"):
        c = cos[:, j]
        assert float(ds["meas_mean_cos"].sel(layer=layer, probe_step=0)) == pytest.approx(np.nanmean(c), rel=1e-12)
