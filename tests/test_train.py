"""experiments.runs.loop / experiments.runs.optim: config validation, determinism, divergence,
atomic run directories, clipping, schedules, the line search, and the optimiser
convention checked against dynamics.methods on the exact quadratic (linreg)."""

import math

import numpy as np
import pytest
import torch
import xarray as xr
from hypothesis import given
from hypothesis import strategies as st

from dynamics.methods import get_method
from experiments import store
from experiments.runs.data import load_data
from experiments.runs.models import build_model
from experiments.runs.optim import GOLDEN, clip_gradients, golden_section, lr_factors
from experiments.runs import RunConfig, run, train

TINY = dict(model="mlp", data="digits", model_args={"hidden": [16]}, steps=8, batch_size=16, threads=1)
LINREG = dict(model="linear", data="linreg", data_args={"dim": 6, "n_train": 64, "n_test": 16},
              batch_size=0, threads=1)


def without_timing(ds):
    return ds.drop_attrs() if hasattr(ds, "drop_attrs") else ds.assign_attrs({})


# ---------------------------------------------------------------- RunConfig
def test_config_round_trip_and_hashable():
    cfg = RunConfig(**TINY, data_args={"n_train": 100})
    d = cfg.to_dict()
    assert d["model_args"] == {"hidden": [16]} and d["data_args"] == {"n_train": 100}
    assert RunConfig.from_dict(d) == cfg and hash(RunConfig.from_dict(d)) == hash(cfg)
    assert RunConfig(lr=1).lr == 1.0 and isinstance(RunConfig(lr=1).to_dict()["lr"], float)


def test_config_gd_momentum_normalised():
    assert RunConfig(opt="gd", momentum=0.9) == RunConfig(opt="gd", momentum=0.0)
    assert RunConfig(opt="hb", momentum=0.9).momentum == 0.9


@pytest.mark.parametrize("key, value, words", [
    ("model", "vgg", ["model", "'vgg'", "seed-cnn"]),
    ("data", "imagenet", ["data", "imagenet", "mnist1d"]),
    ("opt", "sgd", ["opt", "'sgd'", "nag"]),
    ("schedule", "exp", ["schedule", "cosine"]),
    ("clip", "norm", ["clip", "layer"]),
    ("lr", 0.0, ["lr=0.0", "(0, inf)"]),
    ("lr", -1, ["lr=-1.0"]),
    ("lr", math.nan, ["lr=nan"]),
    ("momentum", 1.0, ["momentum=1.0", "[0, 1)"]),
    ("momentum", -0.1, ["momentum=-0.1"]),
    ("steps", 0, ["steps=0", "[1, inf)"]),
    ("batch_size", -1, ["batch_size=-1"]),
    ("clip_value", 0.0, ["clip_value=0.0"]),
    ("step_gamma", 1.5, ["step_gamma=1.5", "(0, 1]"]),
    ("line_search_evals", 1, ["line_search_evals=1", "[2, inf)"]),
    ("device", "gpu7", ["device", "gpu7"]),
    ("dtype", "float16", ["dtype='float16'", "float64"]),
    ("lr", "0.1", ["lr", "str", "float"]),
    ("steps", 10.0, ["steps", "float", "int"]),
    ("line_search", 1, ["line_search", "int", "bool"]),
    ("steps", True, ["steps", "bool", "int"]),
])
def test_config_rejects_bad_values(key, value, words):
    with pytest.raises(ValueError) as err:
        RunConfig.from_dict({key: value})
    for w in words:
        assert w in str(err.value)


def test_config_rejects_unknown_key_and_bad_combinations():
    with pytest.raises(ValueError, match="unknown RunConfig key.*'learning_rate'"):
        RunConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(ValueError, match="model='transformer' does not fit data='digits'"):
        RunConfig(model="transformer", data="digits")
    with pytest.raises(ValueError, match="model='seed-cnn' does not fit data='linreg'"):
        RunConfig(model="seed-cnn", data="linreg")
    with pytest.raises(ValueError, match=r"data_args has unknown key\(s\) 'dims'.*valid: .*dim,"):
        RunConfig(**{**LINREG, "data_args": {"dims": 3}})
    with pytest.raises(ValueError, match=r"model_args has unknown key\(s\) 'width'.*valid: activation, hidden"):
        RunConfig(model="mlp", model_args={"width": 3})
    with pytest.raises(ValueError, match="step_every=0.*schedule='step'"):
        RunConfig(schedule="step")


def test_train_rejects_batch_larger_than_data():
    with pytest.raises(ValueError, match="batch_size=100 .*64"):
        train(RunConfig(**{**LINREG, "batch_size": 100}))


# ---------------------------------------------------------------- determinism
def test_same_config_gives_identical_trace_and_rng_is_restored():
    # seed-cnn has dropout, so the RNG stream matters as well as init and data order
    cfg = RunConfig(model="seed-cnn", data="digits", model_args={"channels": 4, "hidden": 16},
                    steps=6, batch_size=16, threads=1, seed=3)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, sa = train(cfg)
    after = torch.rand(3)
    b, sb = train(cfg)
    xr.testing.assert_identical(without_timing(a), without_timing(b))
    assert torch.equal(before, after)  # train() left the caller's RNG stream alone
    for key in ("final_loss", "test_accuracy", "final_batch_loss"):
        assert sa[key] == sb[key]
    c, _ = train(RunConfig(**{**cfg.to_dict(), "seed": 4}))
    assert not np.array_equal(a.loss.values, c.loss.values)


# ---------------------------------------------------------------- divergence
def test_huge_lr_diverges_and_is_recorded():
    cfg = RunConfig(**LINREG, opt="gd", lr=1e4, steps=200)
    trace, summary = train(cfg)
    assert summary["diverged"] is True
    s = summary["diverged_step"]
    assert 0 < s < 200 and summary["steps_done"] == s + 1 == trace.sizes["step"]
    loss, gnorm = trace.loss.values, trace.grad_norm_global.values
    assert np.all(np.isfinite(loss[:s]) & np.isfinite(gnorm[:s]))
    assert not (np.isfinite(loss[s]) and np.isfinite(gnorm[s]))
    assert summary["final_loss"] is None and summary["test_loss"] is None
    # h = lr*s_max = 1e4 >> 2: the error grows by |1 - h| per step from a finite start, so
    # float32 overflows (3.4e38) within about 40/log10(1e4) = 10 steps
    assert s < 40


def test_stable_run_does_not_diverge():
    _, summary = train(RunConfig(**LINREG, opt="hb", lr=0.5, momentum=0.5, steps=20))
    assert summary["diverged"] is False and summary["diverged_step"] is None
    assert summary["steps_done"] == 20 and summary["final_loss"] is not None
    assert (summary["n_train"], summary["n_test"]) == (64, 16)


# ---------------------------------------------------------------- the convention, end to end
@pytest.mark.parametrize("opt", ["gd", "hb", "nag"])
def test_full_batch_linreg_matches_the_quadratic_recursion(opt):
    """On linreg (exact: Hessian diag(s), w* the exact minimiser, residual variance σ²) the
    full-batch loss is L(w) = ½ Σ s_i (w_i − w*_i)² + σ²/2, and each coordinate follows
    dynamics.methods' update rule. Checked against that numpy recursion in float64;
    float32 training gives relative errors ~1e-6 per step, rtol 1e-4 over 30 steps."""
    cfg = RunConfig(**LINREG, opt=opt, lr=0.8, momentum=0.6, steps=30)
    trace, _ = train(cfg)
    trace64, _ = train(RunConfig(**{**cfg.to_dict(), "dtype": "float64"}))
    data = load_data("linreg", **cfg.data_kwargs)
    ex = data.info.extras
    torch.manual_seed(cfg.seed)  # train() seeds, then builds the model first
    w = build_model("linear", data.info).fc.weight.detach().double().numpy()[0]
    s, w_star, sigma = ex["hessian_eigenvalues"], ex["w_star"], ex["noise_std"]
    method, buf, expected = get_method(opt), np.zeros_like(w), []
    for _ in range(cfg.steps):
        expected.append(0.5 * np.sum(s * (w - w_star) ** 2) + sigma ** 2 / 2)
        step, buf = method.update(s * (w - w_star), buf, lr=cfg.lr, momentum=cfg.momentum)
        w = w + step
    np.testing.assert_allclose(trace.loss.values, expected, rtol=1e-4)
    # float64 training: only the float32 storage of the data remains (XᵀX/n = diag(s) to
    # ~1e-7 relative), so 1e-6 is ample and 100x tighter than float32
    np.testing.assert_allclose(trace64.loss.values, expected, rtol=1e-6)


# ---------------------------------------------------------------- run directories
def test_run_writes_directory_and_is_resume_safe(tmp_path, monkeypatch):
    cfg = RunConfig(**LINREG, steps=5)
    out = tmp_path / "r"
    summary = run(cfg, out)
    assert store.is_done(out)
    ds = store.load_run(out)
    assert ds.attrs["config"] == cfg.to_dict() and ds.attrs["summary"] == summary
    np.testing.assert_array_equal(ds.step.values, np.arange(5))

    import experiments.runs.loop as train_mod

    def boom(*a, **k):
        raise AssertionError("a finished run must not be retrained")

    monkeypatch.setattr(train_mod, "train", boom)
    assert run(cfg, out) == summary
    with pytest.raises(ValueError, match="another config"):
        run(RunConfig(**LINREG, steps=6), out)


def test_directory_without_done_is_rerun(tmp_path):
    """A writer killed after summary.json but before DONE: the run is not taken as finished."""
    cfg = RunConfig(**LINREG, steps=4)
    out = tmp_path / "r"
    store.atomic_write_json(out / store.CONFIG, cfg.to_dict())
    store.atomic_write_json(out / store.SUMMARY, {"steps_done": -1})
    assert not store.is_done(out)
    summary = run(cfg, out)
    assert summary["steps_done"] == 4 and store.read_json(out / store.SUMMARY)["steps_done"] == 4
    assert store.is_done(out)


def test_crash_mid_run_leaves_no_partial_files(tmp_path, monkeypatch):
    import experiments.trace.tracer as trace_mod

    calls = {"n": 0}
    original = trace_mod.Tracer.after_step

    def crash_at_step_3(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return original(self)

    monkeypatch.setattr(trace_mod.Tracer, "after_step", crash_at_step_3)
    out = tmp_path / "r"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(RunConfig(**LINREG, steps=10), out)
    assert {p.name for p in out.iterdir()} == {store.CONFIG, store.FAILED}
    assert not store.is_done(out) and store.is_failed(out)
    assert "simulated crash" in (out / store.FAILED).read_text()
    with pytest.raises(ValueError, match="not a finished run"):
        store.load_run(out)
    monkeypatch.setattr(trace_mod.Tracer, "after_step", original)
    run(RunConfig(**LINREG, steps=10), out)  # a rerun completes the directory
    assert store.is_done(out) and not store.is_failed(out)


# ---------------------------------------------------------------- clipping
def _grads_fixture():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 4, 5)]
    for p, scale in zip(params, (0.1, 2.0, 10.0)):
        p.grad = scale * torch.randn(p.shape)
    return {"a": params[:1], "b": params[1:]}, params


@pytest.mark.parametrize("mode", ["global", "layer", "value"])
def test_clip_modes_give_the_promised_norms(mode):
    groups, params = _grads_fixture()
    raw = [p.grad.clone() for p in params]
    c = 1.5
    g_factor, l_factors = clip_gradients(groups, mode, c)
    norm = lambda ts: float(torch.sqrt(sum((t.double() ** 2).sum() for t in ts)))  # noqa: E731
    raw_by = {"a": raw[:1], "b": raw[1:]}
    new_by = {name: [p.grad for p in ps] for name, ps in groups.items()}
    if mode == "global":
        assert norm([p.grad for p in params]) == pytest.approx(c, rel=1e-5)
        for r, p in zip(raw, params):  # one common factor: directions kept
            torch.testing.assert_close(p.grad, r * float(g_factor))
    if mode == "layer":
        assert norm(new_by["a"]) == pytest.approx(norm(raw_by["a"]), rel=1e-6)  # 0.17 < c: untouched
        assert norm(new_by["b"]) == pytest.approx(c, rel=1e-5)
    if mode == "value":
        assert max(float(p.grad.abs().max()) for p in params) <= c
        torch.testing.assert_close(params[2].grad, raw[2].clamp(-c, c))
    for name in groups:  # recorded factors are ‖clipped‖/‖raw‖
        assert float(l_factors[name]) == pytest.approx(norm(new_by[name]) / norm(raw_by[name]), rel=1e-5)
    assert float(g_factor) == pytest.approx(norm([p.grad for p in params]) / norm(raw), rel=1e-5)


@pytest.mark.parametrize("mode", ["global", "layer"])
def test_clipping_in_training_is_recorded_and_applied(mode):
    """Plain GD: the update is lr × clipped gradient, so per layer ‖Δθ‖ = lr·factor·‖g‖."""
    cfg = RunConfig(**{**TINY, "model_args": {"hidden": [8]}}, opt="gd", lr=0.1, clip=mode, clip_value=0.05)
    trace, _ = train(cfg)
    f = trace.clip_factor.values
    assert np.all(f <= 1) and np.any(f < 1)
    np.testing.assert_allclose(trace.update_norm.values, 0.1 * f * trace.grad_norm.values, rtol=1e-4)
    if mode == "global":
        np.testing.assert_allclose(f, np.repeat(trace.clip_factor_global.values[:, None], f.shape[1], 1))
        np.testing.assert_allclose(trace.clip_factor_global * trace.grad_norm_global, 0.05, rtol=1e-4)
    else:
        np.testing.assert_allclose(np.minimum(trace.grad_norm.values, 0.05), f * trace.grad_norm.values, rtol=1e-4)


# ---------------------------------------------------------------- schedules
def test_lr_factors_against_the_formulas():
    k, n = np.arange(100), 100
    np.testing.assert_allclose(lr_factors("constant", n), 1.0)
    np.testing.assert_allclose(lr_factors("step", n, step_every=30, step_gamma=0.5), 0.5 ** (k // 30))
    cos = lr_factors("cosine", n, final_lr_factor=0.1)
    assert cos[0] == 1.0 and cos[50] == pytest.approx(0.55) and np.all(np.diff(cos) < 0)
    lin = lr_factors("linear", n)
    np.testing.assert_allclose(lin, 1 - k / n)
    warm = lr_factors("linear", n, warmup_steps=9)
    np.testing.assert_allclose(warm[:10], np.arange(1, 11) / 10)
    np.testing.assert_allclose(warm[9:], 1 - (k[9:] - 9) / 91)


@pytest.mark.parametrize("schedule, extra", [("step", {"step_every": 3, "step_gamma": 0.5}),
                                             ("cosine", {"warmup_steps": 2}), ("linear", {})])
def test_trace_lr_follows_the_schedule(schedule, extra):
    cfg = RunConfig(**LINREG, lr=0.3, steps=9, schedule=schedule, **extra)
    trace, _ = train(cfg)
    expected = 0.3 * lr_factors(schedule, 9, **extra)
    np.testing.assert_allclose(trace.lr.values, expected, rtol=1e-12)


# ---------------------------------------------------------------- line search
def test_golden_section_uses_exactly_n_evaluations_and_meets_the_bracket():
    for n in (2, 5, 12):
        calls = []
        m, _ = golden_section(lambda x: calls.append(x) or (x - 0.3) ** 2, 0.0, 4.0, n)
        assert len(calls) == n
        assert abs(m - 0.3) <= GOLDEN ** (n - 1) * 4.0  # the final bracket's width
    m, v = golden_section(lambda x: math.nan if x > 1 else -x, 0.0, 4.0, 10)  # NaN counts as +inf
    assert m <= 1 and v == -m


@given(st.floats(0.0, 4.0), st.integers(2, 30))
def test_golden_section_error_within_final_bracket(m0, n):
    m, v = golden_section(lambda x: (x - m0) ** 2, 0.0, 4.0, n)
    assert abs(m - m0) <= GOLDEN ** (n - 1) * 4.0 + 1e-12 and v == (m - m0) ** 2


@given(st.sampled_from(["constant", "step", "cosine", "linear"]), st.integers(1, 300), st.integers(0, 50),
       st.floats(0.0, 1.0))
def test_lr_factors_bounded_and_monotone_after_warmup(schedule, steps, warmup, final):
    f = lr_factors(schedule, steps, warmup_steps=warmup, step_every=7, step_gamma=0.5, final_lr_factor=final)
    assert f.shape == (steps,) and np.all((f > 0) | (f == final)) and np.all(f <= 1)
    assert np.all(np.diff(f[warmup:]) <= 1e-15)  # non-increasing after the warm-up
    assert np.all(np.diff(f[:warmup + 1]) >= 0) or schedule == "step"


def test_line_search_finds_the_exact_line_minimiser_on_a_quadratic():
    """One full-batch GD step on linreg: the loss along −g is minimised by α* = gᵀg / gᵀHg
    (H = diag(s)); the recorded multiplier must be within the bracket width of α*/lr."""
    cfg = RunConfig(**LINREG, opt="gd", lr=0.5, steps=1, line_search=True, line_search_evals=20,
                    line_search_max=8.0)
    trace, _ = train(cfg)
    data = load_data("linreg", **cfg.data_kwargs)
    ex = data.info.extras
    torch.manual_seed(cfg.seed)
    w = build_model("linear", data.info).fc.weight.detach().double().numpy()[0]
    g = ex["hessian_eigenvalues"] * (w - ex["w_star"])
    alpha_star = g @ g / (g @ (ex["hessian_eigenvalues"] * g))
    m = float(trace.line_search_multiplier[0])
    assert abs(m - alpha_star / 0.5) <= GOLDEN ** 19 * 8.0 + 1e-4
    assert float(trace.lr[0]) == pytest.approx(0.5 * m)


def test_line_search_training_runs_with_dropout_and_momentum():
    cfg = RunConfig(model="seed-cnn", data="digits", model_args={"channels": 4, "hidden": 16}, steps=4,
                    batch_size=16, threads=1, line_search=True, line_search_evals=4)
    trace, summary = train(cfg)
    m = trace.line_search_multiplier.values
    assert np.all((m > 0) & (m < 4.0)) and not summary["diverged"]
    np.testing.assert_allclose(trace.lr.values, 0.05 * m)


# ---------------------------------------------------------------- adam, probes, eval
def test_adam_eval_every_and_probe():
    cfg = RunConfig(**{**TINY, "model_args": {"hidden": [8]}, "steps": 6}, opt="adam", lr=0.01, eval_every=3,
                    probe_every=3)
    trace, summary = train(cfg)
    np.testing.assert_array_equal(trace.eval_step.values, [3, 6])
    assert np.all((trace.test_accuracy >= 0) & (trace.test_accuracy <= 1))
    assert trace.test_accuracy.values[-1] == pytest.approx(summary["test_accuracy"])
    np.testing.assert_array_equal(trace.probe_step.values, [0, 3])
    assert np.all(np.isfinite(trace.sharpness.values))


# ---------------------------------------------------------------- more tasks and options
def test_batches_are_epoch_permutations_dropping_the_remainder():
    from experiments.runs.loop import batches

    it = batches(10, 3, torch.Generator().manual_seed(0), "cpu")
    epoch = torch.cat([next(it) for _ in range(3)])
    assert sorted(epoch.tolist()) == sorted(set(epoch.tolist())) and len(epoch) == 9
    full = batches(10, 0, None, "cpu")
    assert next(full).tolist() == list(range(10))


def test_language_model_training_reports_per_byte_accuracy():
    cfg = RunConfig(model="transformer", data="pytext", model_args={"dim": 8, "layers": 1, "heads": 2},
                    data_args={"seq_len": 16, "n_train": 64}, opt="adam", lr=0.01, steps=3, batch_size=8,
                    threads=1)
    trace, summary = train(cfg)
    assert 0 <= summary["test_accuracy"] <= 1 and summary["test_loss"] < 8  # ln 256 = 5.5 at chance
    assert "blocks.0.attn.qkv" in trace.layer.values


def test_per_tensor_trace_with_layer_clipping_uses_module_factors():
    cfg = RunConfig(**{**TINY, "model_args": {"hidden": [8]}}, clip="layer", clip_value=0.01, per_tensor=True)
    trace, _ = train(cfg)
    f = trace.clip_factor
    np.testing.assert_array_equal(f.sel(layer="fc1.weight").values, f.sel(layer="fc1.bias").values)
    assert np.all(f.values < 1)


def test_line_search_restores_batchnorm_statistics():
    from experiments.runs.optim import get_rng_state, line_search_step
    from experiments.runs.loop import make_loss_fn

    data = load_data("digits")
    torch.manual_seed(0)
    net = build_model("resnet", data.info, width=4)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    batch = (data.x_train[:16], data.y_train[:16])
    loss_fn = make_loss_fn("classify")
    rng = get_rng_state()
    loss_fn(net, batch).backward()
    stats = [b.clone() for b in net.buffers()]
    m = line_search_step(net, opt, loss_fn, batch, evals=5, max_multiplier=2.0, rng_state=rng)
    assert 0 < m < 2
    for before, after in zip(stats, net.buffers()):
        assert torch.equal(before, after)


@pytest.mark.slow
def test_seed_cnn_learns_mnist1d():
    """300 HB steps of batch 32 take the seed CNN well above chance (10%) on MNIST-1D."""
    _, summary = train(RunConfig(model="seed-cnn", data="mnist1d", opt="hb", lr=0.05, momentum=0.9, steps=300,
                                 threads=1))
    assert not summary["diverged"] and summary["test_accuracy"] > 0.3


# ---------------------------------------------------------------- probe settings
def test_probe_fields_validate_and_round_trip():
    for key, value in (("probe_batch_size", -1), ("hutchinson_samples", -1), ("noise_microbatches", 1)):
        with pytest.raises(ValueError, match=key):
            RunConfig(**{key: value})
    plain = RunConfig(**TINY).to_dict()
    assert {"probe_batch_size", "hutchinson_samples", "noise_microbatches"} <= set(plain)
    cfg = RunConfig(**TINY, probe_batch_size=64, hutchinson_samples=3, noise_microbatches=8)
    assert cfg.to_dict()["probe_batch_size"] == 64 and RunConfig.from_dict(cfg.to_dict()) == cfg
    assert RunConfig.from_dict(plain) == RunConfig(**TINY)


def test_probe_batch_noise_and_signal_reach_the_trace():
    """Full-batch linreg probed on all 64 examples in 8 micro-batches: grad_noise is reported
    for the training batch (all 64: Σ s²/8) and grad_signal + grad_noise = ‖ḡ‖² = the
    full-batch gradient norm² the tracer records at the probe step (float64 round-off)."""
    cfg = RunConfig(**{**LINREG, "dtype": "float64"}, opt="hb", lr=0.3, momentum=0.5, steps=12,
                    probe_every=5, probe_batch_size=64, hutchinson_samples=3, noise_microbatches=8)
    trace, _ = train(cfg)
    assert trace.attrs["hutchinson_samples"] == 3 and trace.attrs["noise_microbatches"] == 8
    probes = trace.probe_step.values
    g2 = trace.grad_norm.sel(step=probes).values ** 2
    got = (trace.grad_signal + trace.grad_noise).values
    np.testing.assert_allclose(got, g2, rtol=1e-8)
    assert np.all(trace.grad_noise.values > 0)
