"""The torch engine's step (the engine of CUDA parameters) never makes the host wait for the
device, and launches a fixed number of kernels whatever the number of layers.

Checked without a GPU on the ``meta`` device (shapes only, no data): every op the tracer
dispatches during a step is recorded by a ``TorchDispatchMode``. A host read of a device value
(``.item()``, ``float(t)``, ``bool(t)``, a Python branch on a tensor) dispatches
``aten._local_scalar_dense``; a copy to or from the host (``.cpu()``, ``.numpy()`` via a copy,
``torch.as_tensor(array, device=...)``) is an op whose tensors sit on two devices. On a GPU
each of these synchronises the step; here each is recorded (or raises: a meta tensor has no
data), and the test fails. tests/test_gpu.py checks the same on CUDA with
``torch.cuda.set_sync_debug_mode("error")``. The opt-in graph engine's staged path (what its
CUDA graphs replay) is checked here against the torch engine, run eagerly."""

import collections

import numpy as np

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from experiments.trace.tracer import Tracer


class OpLog(TorchDispatchMode):
    """Counts the non-view ops dispatched on the device (each one a kernel launch on a GPU)
    and records the ones that would synchronise a GPU."""

    def __init__(self):
        super().__init__()
        self.kernels = collections.Counter()
        self.host = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket)
        tensors = [x for x in torch.utils._pytree.tree_leaves((args, kwargs, out))
                   if isinstance(x, torch.Tensor)]
        devices = {x.device.type for x in tensors if x.dim() > 0}  # 0-d CPU: a kernel argument
        read = name == "aten._local_scalar_dense" and args[0].device.type != "cpu"
        if read or len(devices) > 1:
            self.host.append(f"{name} on {sorted(devices)}")
        if not func.is_view and any(x.device.type != "cpu" for x in tensors):  # not host-only
            self.kernels[name] += 1
        return out


def mlp(depth):
    torch.manual_seed(0)
    with torch.device("meta"):
        return nn.Sequential(*[nn.Linear(8, 8) for _ in range(depth)])


def traced_steps(depth, mode, steps=3):
    """Ops of the tracer per step, for each of ``steps`` steps (meta device, no flush).
    ``mode``: "manual" (the four calls, only the tracer's calls logged), "attached",
    "attached+clip" and "attached+float-loss" (the loss recorded as a Python float) (the
    whole step logged, minus the same step without a tracer)."""
    model = mlp(depth)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tracer = Tracer(model, opt, engine="torch", block_size=steps + 1)
    assert tracer.engine == "torch" and tracer.device.type == "meta"
    x = torch.zeros(4, 8, device="meta")
    clip = mode == "attached+clip"

    def step(log=None, traced=True):
        opt.zero_grad(set_to_none=True)
        with (log if log is not None and mode != "manual" else _null()):
            loss = model(x).square().mean()
            loss.backward()
            if mode == "manual":
                with log:
                    tracer.after_backward(loss)
            elif traced:
                tracer.record_loss(0.5 if mode == "attached+float-loss" else loss)
            if clip:
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if mode == "manual":
                with log:
                    tracer.after_step()
        return log

    if mode != "manual":
        step(traced=False)  # the optimizer's first step (it creates its momentum buffers)
    if mode == "manual":
        logs = [step(OpLog()) for _ in range(steps)]
    else:
        plain = [step(OpLog(), traced=False) for _ in range(steps)]
        tracer.attach()
        logs = [step(OpLog()) for _ in range(steps)]
        tracer.detach()
        for log, base in zip(logs, plain):
            assert not base.host
            log.kernels.subtract(base.kernels)
    assert tracer.step == steps and tracer._row == steps  # recorded, not yet flushed
    return logs


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("mode", ["manual", "attached", "attached+clip", "attached+float-loss"])
def test_torch_engine_step_never_reads_the_device_and_its_kernels_do_not_grow_with_layers(mode):
    counts = {}
    for depth in (2, 12):
        logs = traced_steps(depth, mode)
        for log in logs:
            assert log.host == [], f"host-device traffic in a traced step: {log.host}"
        counts[depth] = [sum(log.kernels.values()) for log in logs]
        assert len(set(counts[depth])) == 1, counts  # every step alike
    # the same kernels for 2 and for 12 layers (the engine used to run per-layer matmuls)
    assert counts[2] == counts[12], counts
    # the per-step budget: 5 ops to capture (copies, norms), 12 for the gradient statistics,
    # 7 for the update statistics; 14 more for the clip factors of a clipped step (hooks.py);
    # a new op here must be justified
    budget = {"manual": 24, "attached": 24, "attached+clip": 24 + 14, "attached+float-loss": 25}[mode]
    assert counts[2][0] <= budget, counts


def test_the_flush_is_where_the_host_reads_the_block():
    """On the meta device the flush's copy to the host fails (no data): proof that the steps
    before it did not read the block."""
    model = mlp(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracer = Tracer(model, opt, engine="torch", block_size=2)
    x = torch.zeros(4, 8, device="meta")
    opt.zero_grad()
    model(x).sum().backward()
    tracer.after_backward()
    opt.step()
    tracer.after_step()  # row 1 of 2: no flush
    opt.zero_grad()
    model(x).sum().backward()
    tracer.after_backward()
    opt.step()
    with pytest.raises((NotImplementedError, RuntimeError)):
        tracer.after_step()  # row 2 of 2: the flush copies the block to the host


class _Partly(nn.Module):
    """Two layers; the second is skipped on every third step (its gradient is then None)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        x = torch.tanh(self.a(x))
        return x if self.calls % 3 == 0 else self.b(x)


@pytest.mark.parametrize("attached", [False, True])
def test_graph_engine_runs_the_torch_engines_ops_through_its_staging_buffers(attached):
    """Off CUDA the graph engine runs its staged path (fixed buffers, rows copied into the
    block) eagerly: the trace must equal the torch engine's bit for bit, across blocks, with
    clipping and with steps where a layer has no gradient (the eager fallback)."""
    traces = {}
    for engine in ("torch", "torch-graph"):
        torch.manual_seed(0)
        model = _Partly()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        tracer = Tracer(model, opt, engine=engine, block_size=4)
        if attached:
            tracer.attach()
        g = torch.Generator().manual_seed(1)
        for k in range(11):
            opt.zero_grad(set_to_none=True)
            loss = model(torch.randn(5, 6, generator=g)).square().mean()
            loss.backward()
            if attached:
                tracer.record_loss(loss)
            else:
                tracer.after_backward(loss)
            if k % 4 == 1:
                total = nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                if not attached:
                    tracer.record_clip(global_factor=torch.clamp(0.05 / (total + 1e-6), max=1.0))
            opt.step()
            if not attached:
                tracer.after_step()
        traces[engine] = tracer.detach().dataset()
    assert traces["torch-graph"].sizes["step"] == 11
    assert traces["torch"].grad_norm.sel(layer="b").values[2] == 0  # the fallback was taken
    for name, var in traces["torch"].data_vars.items():
        np.testing.assert_array_equal(traces["torch-graph"][name].values, var.values, err_msg=name)
