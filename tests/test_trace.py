"""The tracer's per-step statistics against slow, obviously-correct per-parameter references.

The tracer computes in the model's dtype (float32 here) with fused ``_foreach`` norms; the
references are float64 loops. Float32 sums of at most a few hundred terms carry a relative
error of order 1e-6, hence rtol=1e-5 throughout (min/max are exact element values).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from experiments.store import atomic_write_dataset
from experiments.trace.tracer import ROOT_LAYER, Tracer

RTOL = 1e-5


class Tiny(nn.Module):
    """Conv + MLP with a root-owned parameter, an unused layer and a frozen layer."""

    def __init__(self, bn=False, dropout=0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.3))
        self.conv = nn.Conv1d(1, 3, 3)
        self.fc = nn.Sequential(nn.Linear(18, 5), nn.BatchNorm1d(5) if bn else nn.Identity(),
                                nn.Dropout(dropout), nn.Tanh(), nn.Linear(5, 2))
        self.unused = nn.Linear(2, 2)
        self.frozen = nn.Linear(2, 2).requires_grad_(False)

    def forward(self, x):
        h = F.leaky_relu(self.conv(x)).flatten(1)
        return self.frozen(self.fc(h)) * self.scale


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def batches(n, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 8, generator=g), torch.randint(0, 2, (size,), generator=g))
            for _ in range(n)]


def train(model, opt, tracer, data, clip=None, probe=False, sched=None):
    """Train while recording a float64 reference of raw gradients and parameters."""
    traced = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ref = []
    for batch in data:
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        tracer.after_backward(loss)
        g = {n: (p.grad.double().clone() if p.grad is not None
                 else torch.zeros_like(p, dtype=torch.float64)) for n, p in traced}
        before = {n: p.detach().double().clone() for n, p in traced}
        lr = opt.param_groups[0]["lr"]
        if clip is not None:
            clip(tracer)
        opt.step()
        tracer.after_step()
        if sched is not None:
            sched.step()
        after = {n: p.detach().double().clone() for n, p in traced}
        ref.append(dict(g=g, d={n: after[n] - before[n] for n in g}, theta=after,
                        loss=loss.item(), lr=lr))
        if probe and tracer.should_probe():
            tracer.probe(loss_fn, batch)
    return ref


def owner(name):
    return name.rpartition(".")[0] or ROOT_LAYER


def cat(step, key, layer, per_tensor=False):
    return torch.cat([v.reshape(-1) for n, v in step[key].items()
                      if (n if per_tensor else owner(n)) == layer])


def cos(a, b):
    return (a @ b / (a.norm() * b.norm())).item()


def check_against_reference(ds, ref, per_tensor=False):
    v = {k: ds[k].values for k in ds.data_vars}
    for li, layer in enumerate(ds.layer.values):
        for t, step in enumerate(ref):
            g, d, th = (cat(step, k, layer, per_tensor) for k in ("g", "d", "theta"))
            expect = dict(grad_norm=g.norm(), param_norm=th.norm(), update_norm=d.norm(),
                          grad_abs_mean=g.abs().mean(), grad_abs_max=g.abs().max(),
                          grad_abs_min=g.abs().min())
            for k, e in expect.items():
                np.testing.assert_allclose(v[k][t, li], e.item(), rtol=RTOL, err_msg=k)
            with np.errstate(divide="ignore"):  # a layer without update: log10(0) = -inf
                ratio = np.log10((d.abs().mean() / th.abs().mean()).item())
            np.testing.assert_allclose(v["update_ratio"][t, li], ratio, atol=1e-5)
            if t == 0:
                assert np.isnan(v["grad_cos"][t, li]) and np.isnan(v["update_cos"][t, li])
            else:
                prev = ref[t - 1]
                np.testing.assert_allclose(v["grad_cos"][t, li],
                                           cos(g, cat(prev, "g", layer, per_tensor)), atol=1e-5)
                np.testing.assert_allclose(v["update_cos"][t, li],
                                           cos(d, cat(prev, "d", layer, per_tensor)), atol=1e-5)
        assert v["n_params"][li] == cat(ref[0], "g", layer, per_tensor).numel()
    flat = lambda step, k: torch.cat([x.reshape(-1) for x in step[k].values()])  # noqa: E731
    for t, step in enumerate(ref):
        np.testing.assert_allclose(v["loss"][t], step["loss"], rtol=1e-6)
        np.testing.assert_allclose(v["lr"][t], step["lr"], rtol=1e-6)
        np.testing.assert_allclose(v["grad_norm_global"][t], flat(step, "g").norm(), rtol=RTOL)
        if t:
            np.testing.assert_allclose(v["grad_cos_global"][t],
                                       cos(flat(step, "g"), flat(ref[t - 1], "g")), atol=1e-5)
            np.testing.assert_allclose(v["update_cos_global"][t],
                                       cos(flat(step, "d"), flat(ref[t - 1], "d")), atol=1e-5)
    assert np.isnan(v["grad_cos_global"][0]) and np.isnan(v["update_cos_global"][0])


@pytest.mark.parametrize("engine", ["fused", "numpy", "torch"])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_statistics_match_per_parameter_reference_across_blocks(per_tensor, engine):
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    # 7 steps with blocks of 3: two full flushes and a partial block at dataset()
    tracer = Tracer(model, opt, block_size=3, per_tensor=per_tensor, engine=engine)
    ref = train(model, opt, tracer, batches(7), sched=sched)
    ds = tracer.dataset()
    assert ds.sizes["step"] == 7
    check_against_reference(ds, ref, per_tensor)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    expected = names if per_tensor else [ROOT_LAYER, "conv", "fc.0", "fc.4", "unused"]
    assert list(ds.layer.values) == expected
    # the unused layer never gets a gradient: zero norm, undefined cosine
    unused = "unused.weight" if per_tensor else "unused"
    assert (ds.grad_norm.sel(layer=unused) == 0).all()
    assert np.isnan(ds.grad_cos.sel(layer=unused)).all()


@pytest.mark.parametrize("engine", ["fused", "numpy", "torch"])
def test_adam_batchnorm_dropout_match_reference(engine):
    torch.manual_seed(1)
    model = Tiny(bn=True, dropout=0.3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracer = Tracer(model, opt, block_size=4, engine=engine)
    ref = train(model, opt, tracer, batches(6))
    check_against_reference(tracer.dataset(), ref)


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_global_norm_equals_torch_get_total_norm_exactly(engine):
    torch.manual_seed(2)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracer = Tracer(model, opt, engine=engine)
    norms = []
    for batch in batches(3):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        tracer.after_backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms.append(torch.nn.utils.get_total_norm(grads).item())
        opt.step()
        tracer.after_step()
    # same per-tensor fused norms and the same reduction as torch: bit-identical
    np.testing.assert_array_equal(tracer.dataset().grad_norm_global.values,
                                  np.array(norms, dtype=np.float32))


def test_fused_global_norm_is_the_float64_norm_of_the_float32_gradients():
    """The fused engine sums g² in float64: within n·2⁻⁵³ (n < 1000 terms here, rtol 1e-12) of
    the exact norm of the stored float32 gradients, which torch's float32 get_total_norm
    meets only to float32 rounding (rtol 1e-6)."""
    torch.manual_seed(2)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracer = Tracer(model, opt, engine="fused")
    exact, torch_norms = [], []
    for batch in batches(3):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        tracer.after_backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        exact.append(float(torch.cat([g.double().reshape(-1) for g in grads]).norm()))
        torch_norms.append(torch.nn.utils.get_total_norm(grads).item())
        assert tracer.grad_norm_global == pytest.approx(exact[-1], rel=1e-12)
        opt.step()
        tracer.after_step()
    np.testing.assert_allclose(tracer.dataset().grad_norm_global.values, exact, rtol=1e-12)
    np.testing.assert_allclose(torch_norms, exact, rtol=1e-6)


def test_gradient_cosine_with_itself_is_one():
    torch.manual_seed(3)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    tracer = Tracer(model, opt)
    batch = batches(1)[0]
    train(model, opt, tracer, [batch, batch])
    ds = tracer.dataset()
    used = [layer for layer in ds.layer.values if layer != "unused"]
    np.testing.assert_allclose(ds.grad_cos.sel(step=1, layer=used), 1.0, atol=1e-6)
    np.testing.assert_allclose(ds.grad_cos_global[1], 1.0, atol=1e-6)
    # lr = 0: no update, so the ratio is log10(0) and the update cosine undefined
    assert (ds.update_norm == 0).all() and np.isneginf(ds.update_ratio).all()
    assert np.isnan(ds.update_cos).all()


@pytest.mark.parametrize("engine", ["fused", "numpy", "torch"])
def test_clip_factors_recorded_and_reset_across_blocks(engine):
    torch.manual_seed(4)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracer = Tracer(model, opt, block_size=2, engine=engine)
    layers = tracer.layer_parameters()
    expected_global, expected_layer = [], []

    def clip(tr):
        step = len(expected_global)
        if step % 2 == 0:  # global clipping on even steps, as a device tensor
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
            factor = torch.clamp(0.05 / (total + 1e-6), max=1.0)
            tr.record_clip(global_factor=factor)
            expected_global.append(factor.item())
            expected_layer.append({})
        elif step == 1:  # per-layer clipping given as a mapping
            factors = {}
            for name, ps in layers.items():
                ps = [p for p in ps if p.grad is not None]
                if ps:
                    total = torch.nn.utils.clip_grad_norm_(ps, max_norm=0.01)
                    factors[name] = min(1.0, 0.01 / (total.item() + 1e-6))
            tr.record_clip(layer_factors=factors)
            expected_global.append(1.0)
            expected_layer.append(factors)
        else:  # a sequence in layer order
            seq = [0.5 + 0.1 * i for i in range(len(tr.layers))]
            tr.record_clip(layer_factors=seq)
            expected_global.append(1.0)
            expected_layer.append(dict(zip(tr.layers, seq)))

    train(model, opt, tracer, batches(5), clip=clip)
    ds = tracer.dataset()
    np.testing.assert_allclose(ds.clip_factor_global, expected_global, rtol=1e-6)
    assert min(expected_global) < 1  # clipping really happened
    for t, factors in enumerate(expected_layer):
        for layer in ds.layer.values:
            np.testing.assert_allclose(ds.clip_factor.sel(step=t, layer=layer),
                                       factors.get(layer, 1.0), rtol=1e-6)
    # gradients are recorded before clipping: the global norm exceeds the clip threshold
    assert (ds.grad_norm_global[::2] > 0.05).all()
    with pytest.raises(ValueError, match="unknown layers"):
        opt.zero_grad()
        loss_fn(model, batches(1)[0]).backward()
        tracer.after_backward()
        tracer.record_clip(layer_factors={"nope": 0.5})


def test_probes_do_not_change_the_training_trajectory():
    """Probes fork the RNG (dropout), restore BatchNorm buffers and leave .grad alone."""
    def run(probe_every):
        torch.manual_seed(5)
        model = Tiny(bn=True, dropout=0.5)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        tracer = Tracer(model, opt, probe_every=probe_every, sharpness_iters=3,
                        noise_microbatches=2)
        train(model, opt, tracer, batches(5), probe=True)
        return tracer.dataset(), model.state_dict()

    ds0, state0 = run(0)
    ds1, state1 = run(2)
    np.testing.assert_array_equal(ds0.loss, ds1.loss)
    for k in state0:
        assert torch.equal(state0[k], state1[k]), k
    assert list(ds1.probe_step.values) == [2, 4]
    assert ds0.sizes["probe_step"] == 0
    for k in ("sharpness", "hessian_trace", "grad_noise", "sharpness_global"):
        assert np.isfinite(ds1[k]).all(), k


def test_dataset_schema_and_netcdf_round_trip(tmp_path):
    torch.manual_seed(6)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracer = Tracer(model, opt, probe_every=1, sharpness_iters=2)
    train(model, opt, tracer, batches(2), probe=True)
    ds = tracer.dataset()
    step_layer = {"grad_norm", "param_norm", "update_norm", "update_ratio", "grad_abs_min",
                  "grad_abs_mean", "grad_abs_max", "grad_cos", "update_cos", "clip_factor"}
    per_step = {"loss", "lr", "grad_norm_global", "grad_cos_global", "update_cos_global",
                "clip_factor_global"}
    per_probe = {"sharpness", "hessian_trace", "grad_noise"}
    for k in step_layer:
        assert ds[k].dims == ("step", "layer"), k
    for k in per_step:
        assert ds[k].dims == ("step",), k
    for k in per_probe:
        assert ds[k].dims == ("probe_step", "layer"), k
    assert ds.sharpness_global.dims == ("probe_step",)
    assert ds.n_params.dims == ("layer",)
    assert ds.step.dtype.kind == "i" and ds.probe_step.dtype.kind == "i"
    assert ds.attrs["tracer_seconds"] > 0 and ds.attrs["probe_seconds"] > 0
    atomic_write_dataset(tmp_path / "trace.nc", ds)
    import xarray as xr
    back = xr.load_dataset(tmp_path / "trace.nc", engine="scipy")
    np.testing.assert_array_equal(back.grad_norm, ds.grad_norm)
    assert list(back.layer.values) == list(ds.layer.values)


def test_bad_arguments_and_call_order():
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for kw, match in [(dict(block_size=0), "block_size=0"), (dict(probe_every=-1), "probe_every"),
                      (dict(probe_mode="x"), "probe_mode"), (dict(engine="jax"), "engine"),
                      (dict(noise_microbatches=1), "noise_microbatches=1")]:
        with pytest.raises(ValueError, match=match):
            Tracer(model, opt, **kw)
    tracer = Tracer(model, opt)
    with pytest.raises(RuntimeError, match="without after_backward"):
        tracer.after_step()
    with pytest.raises(ValueError, match="length"):
        loss_fn(model, batches(1)[0]).backward()
        tracer.after_backward()
        tracer.record_clip(layer_factors=[1.0])
