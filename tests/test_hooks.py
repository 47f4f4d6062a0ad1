"""The attached tracer (experiments.trace.hooks) against the four manual calls: the same
model, data and seed give the same trace bit for bit (clip factors: to float rounding, since
the hooks measure them as a ratio of norms while the manual loop is told them)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn

from experiments import Tracer

STEPS = 12


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 3, 3)
        self.fc = nn.Sequential(nn.Linear(18, 6), nn.Tanh(), nn.Linear(6, 2))
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def data(n, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 8, generator=g), torch.randint(0, 2, (size,), generator=g))
            for _ in range(n)]


def setup(groups=False, opt="sgd"):
    torch.manual_seed(0)
    model = Net()
    if groups:
        params = [{"params": model.conv.parameters(), "lr": 0.05},
                  {"params": list(model.fc.parameters()) + list(model.unused.parameters())}]
    else:
        params = model.parameters()
    optimizer = (torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True) if opt == "sgd"
                 else torch.optim.Adam(params, lr=0.01))
    return model, optimizer


def clip(model, max_norm):
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def manual(accum=1, max_norm=None, probe_every=0, groups=False, opt="sgd", skip=(), engine="auto"):
    model, optimizer = setup(groups, opt)
    tracer = Tracer(model, optimizer, probe_every=probe_every, block_size=5, engine=engine)
    batches = data(STEPS * accum)
    for step in range(STEPS):
        if step in skip:
            continue
        if tracer.should_probe():
            tracer.probe(loss_fn, batches[0])
        optimizer.zero_grad()
        total = 0.0
        for k in range(accum):
            loss = loss_fn(model, batches[step * accum + k]) / accum
            loss.backward()
            total = loss.detach() if k == 0 else total + loss.detach()
        tracer.after_backward(total)
        if max_norm is not None:
            norm = clip(model, max_norm)
            c = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # unused: no gradient, factor 1
            tracer.record_clip(global_factor=c, layer_factors={l: c for l in tracer.layers if l != "unused"})
        optimizer.step()
        tracer.after_step()
    return tracer.dataset()


def hooked(accum=1, max_norm=None, probe_every=0, groups=False, opt="sgd", engine="auto"):
    model, optimizer = setup(groups, opt)
    batches = data(STEPS * accum)
    tracer = Tracer(model, optimizer, probe_every=probe_every, block_size=5, engine=engine).attach(
        loss_fn=loss_fn, probe_batch=batches[0])
    for step in range(STEPS):  # the user's loop, plus record_loss
        optimizer.zero_grad()
        for k in range(accum):
            loss = loss_fn(model, batches[step * accum + k]) / accum
            loss.backward()
            tracer.record_loss(loss)
        if max_norm is not None:
            clip(model, max_norm)
        optimizer.step()
    tracer.detach()
    return tracer.dataset()


def assert_same(a, b, clip_rtol=0.0):
    assert set(a.data_vars) == set(b.data_vars)
    for k in a.data_vars:
        if k.startswith("clip_factor"):
            np.testing.assert_allclose(a[k].values, b[k].values, rtol=clip_rtol, err_msg=k)
        else:
            np.testing.assert_array_equal(a[k].values, b[k].values, err_msg=k)
    np.testing.assert_array_equal(a.probe_step.values, b.probe_step.values)


@pytest.mark.parametrize("engine", ["fused", "numpy"])
@pytest.mark.parametrize("kw", [{}, {"probe_every": 4}, {"accum": 3}, {"groups": True},
                                {"opt": "adam"}])
def test_hooked_trace_equals_manual_trace_bit_for_bit(kw, engine):
    a, b = manual(**kw, engine=engine), hooked(**kw, engine=engine)
    assert a.sizes["step"] == STEPS
    assert_same(a, b)
    assert np.all(b.clip_factor.values == 1.0)  # nothing changed the gradients: no factor


@pytest.mark.parametrize("engine", ["fused", "numpy", "torch"])
def test_user_clipping_records_raw_gradient_and_factor(engine):
    """The trace holds the raw gradient (before clipping) and clip factors equal to the ones
    clip_grad_norm_ applied, up to float32 rounding of ‖c·g‖/‖g‖ (a few ulp: rtol 1e-6).
    The torch engine (the GPU's) keeps the factors on the device."""
    a, b = manual(max_norm=0.05, engine=engine), hooked(max_norm=0.05, engine=engine)
    assert_same(a, b, clip_rtol=1e-6)
    assert (b.clip_factor_global.values < 1).sum() >= STEPS // 2  # the clipping was active
    unclipped = hooked(engine=engine)
    assert b.grad_norm.values[0].tolist() == unclipped.grad_norm.values[0].tolist()


@pytest.mark.parametrize("engine", ["fused", "numpy", "torch"])
def test_clipping_that_does_not_clip_records_factor_one_exactly(engine):
    """clip_grad_norm_ multiplies by 1.0 in place below the threshold (the gradient's version
    moves): the hooks measure ‖g now‖/‖g raw‖ with one method for both, so exactly 1."""
    ds = hooked(max_norm=1e9, engine=engine)
    assert np.all(ds.clip_factor.values == 1.0) and np.all(ds.clip_factor_global.values == 1.0)


def test_per_layer_lr_of_param_groups():
    ds = hooked(groups=True)
    lr = ds.lr_layer.sel(step=0).to_series()
    assert lr["conv"] == 0.05 and lr["fc.0"] == lr["unused"] == 0.1
    assert "lr_layer" not in hooked()  # one group: the lr variable says it all


def test_gradient_accumulation_gives_one_record_per_optimizer_step():
    ds = hooked(accum=3)
    assert ds.sizes["step"] == STEPS
    # the recorded gradient is the accumulated one: its norm differs from the last micro-batch's
    assert_same(ds, manual(accum=3))


def test_probes_land_before_the_step_inside_the_trace():
    ds = hooked(probe_every=4)
    assert ds.probe_step.values.tolist() == [0, 4, 8]
    assert np.all(np.isfinite(ds.sharpness.values))


@pytest.mark.parametrize("explicit_unscale", [True, False])
def test_grad_scaler_skipped_steps_are_not_recorded(explicit_unscale):
    """A non-finite gradient at step 3 makes GradScaler skip the step: 11 records, equal to a
    manual loop over the other steps (which sees the same parameters throughout). Without
    the user's unscale_ (and clipping), scaler.step unscales: the hook sees that too."""
    device_type = "cpu"
    model, optimizer = setup()
    scaler = torch.amp.GradScaler(device_type, init_scale=2.0 ** 4)
    batches = data(STEPS)
    tracer = Tracer(model, optimizer, block_size=5).attach(scaler=scaler)
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = loss_fn(model, batches[step])
        scaler.scale(loss).backward()
        tracer.record_loss(loss)
        if step == 3:
            model.conv.weight.grad[0, 0, 0] = math.inf
        if explicit_unscale:
            scaler.unscale_(optimizer)
            clip(model, 0.05)
        scaler.step(optimizer)
        scaler.update()
    tracer.detach()
    ds = tracer.dataset()
    assert ds.sizes["step"] == STEPS - 1
    assert_same(manual(max_norm=0.05 if explicit_unscale else None, skip=(3,)), ds, clip_rtol=1e-6)
    assert scaler.unscale_.__func__ is torch.amp.GradScaler.unscale_  # restored


def test_detach_restores_the_optimizer_and_parameters():
    model, optimizer = setup()
    pre, post = dict(optimizer._optimizer_step_pre_hooks), dict(optimizer._optimizer_step_post_hooks)
    hooks = [dict(p._post_accumulate_grad_hooks or {}) for p in model.parameters()]
    with Tracer(model, optimizer).attach() as tracer:
        loss_fn(model, data(1)[0]).backward()
        optimizer.step()
        with pytest.raises(RuntimeError, match="attached"):
            tracer.after_backward()
    assert dict(optimizer._optimizer_step_pre_hooks) == pre
    assert dict(optimizer._optimizer_step_post_hooks) == post
    assert [dict(p._post_accumulate_grad_hooks or {}) for p in model.parameters()] == hooks
    optimizer.step()  # no longer recorded
    assert tracer.dataset().sizes["step"] == 1


def test_bad_arguments():
    model, optimizer = setup()
    with pytest.raises(ValueError, match="optimizer=None"):
        Tracer(model, None)
    with pytest.raises(ValueError, match="loss_fn and probe_batch"):
        Tracer(model, optimizer).attach(loss_fn=loss_fn)
    with pytest.raises(ValueError, match="probe_batch=int"):
        Tracer(model, optimizer).attach(loss_fn=loss_fn, probe_batch=3)


def test_optimizer_attrs_name_the_method():
    ds = hooked()
    assert (ds.attrs["opt"], ds.attrs["momentum"], ds.attrs["nesterov"], ds.attrs["lr0"]) == ("nag", 0.9, 1, 0.1)
    assert hooked(opt="adam").attrs["opt"] == "adam"
    assert isinstance(ds, xr.Dataset)


def test_closure_steps_trace_the_first_evaluation():
    """optimizer.step(closure) (Lightning, L-BFGS): forward and backward run inside the step;
    the trace equals the manual one and the loss comes from the closure."""
    model, optimizer = setup()
    batches = data(STEPS)
    tracer = Tracer(model, optimizer, probe_every=4, block_size=5).attach(
        loss_fn=loss_fn, probe_batch=batches[0])
    for step in range(STEPS):
        def closure():
            optimizer.zero_grad()
            loss = loss_fn(model, batches[step])
            loss.backward()
            clip(model, 0.05)
            return loss
        optimizer.step(closure)
    assert_same(manual(max_norm=0.05, probe_every=4), tracer.detach().dataset(), clip_rtol=1e-6)


def test_lbfgs_records_the_gradient_at_theta_k_once_per_step():
    """L-BFGS evaluates the closure up to max_iter times per step: one record per step, with
    the raw gradient of the first evaluation (at θ_k) and the update of the whole step."""
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    batch = data(1)[0]
    tracer = Tracer(model, optimizer).attach()
    calls, expected, before = [], [], []
    for step in range(3):
        before.append([p.detach().clone() for p in tracer.params])
        model.zero_grad()
        loss_fn(model, batch).backward()  # the reference gradient at θ_k (a backward outside a step)
        expected.append(float(torch.cat([p.grad.flatten() for p in model.fc[2].parameters()]).norm()))

        def closure():
            calls.append(step)
            optimizer.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            return loss
        optimizer.step(closure)
    ds = tracer.detach().dataset()
    assert len(calls) > 3 * 2 and ds.sizes["step"] == 3  # several evaluations per step
    np.testing.assert_allclose(ds.grad_norm.sel(layer="fc.2").values, expected, rtol=1e-6)
    applied = [float(torch.cat([(a - b).flatten() for a, b, l in zip(after, bef, tracer.tensor_layer)
                                if tracer.layers[l] == "fc.2"]).norm())
               for bef, after in zip(before, before[1:] + [[p.detach() for p in tracer.params]])]
    np.testing.assert_allclose(ds.update_norm.sel(layer="fc.2").values, applied, rtol=1e-5)


def test_a_step_that_raised_is_recorded_once_when_retried():
    model, optimizer = setup()
    tracer = Tracer(model, optimizer).attach()
    fail = [True]

    def boom(opt, args, kwargs):  # registered after the tracer's pre-hook: runs after it
        if fail and fail.pop():
            raise RuntimeError("boom")
    optimizer.register_step_pre_hook(boom)
    loss_fn(model, data(1)[0]).backward()
    with pytest.raises(RuntimeError, match="boom"):
        optimizer.step()
    optimizer.param_groups[0]["lr"] = 0.2
    optimizer.step()  # the retry: recorded once, with the lr it used
    optimizer.param_groups[0]["lr"] = 0.3
    loss_fn(model, data(1)[0]).backward()
    optimizer.step()
    ds = tracer.detach().dataset()
    assert ds.sizes["step"] == 2 and ds.lr.values.tolist() == [0.2, 0.3]
