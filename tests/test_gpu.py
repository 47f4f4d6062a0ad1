"""CUDA paths, run only where a GPU is present (marked ``gpu``; skipped elsewhere, and CI has
none). The same float64 run on the GPU and on the CPU must give the same trace up to
floating-point reordering: this exercises the tracer's torch engine with device blocks,
the CUDA timing events and the probes on the device; the traced steps must not synchronise
the device (tests/test_trace_sync.py checks the same on the meta device, without a GPU)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from experiments.runs import RunConfig, train
from experiments.trace.tracer import Tracer

pytestmark = pytest.mark.gpu

STATS = ["grad_norm", "param_norm", "update_norm", "grad_cos", "update_cos", "grad_abs_max"]


def test_cuda_run_matches_cpu_run():
    base = dict(model="mlp", data="digits", model_args={"hidden": [32]}, steps=40, batch_size=32,
                opt="nag", lr=0.05, momentum=0.9, probe_every=10, dtype="float64", threads=1)
    cpu, _ = train(RunConfig(**base))
    gpu, summary = train(RunConfig(**base, device="cuda"))
    assert not summary["diverged"]
    for name in STATS + ["loss", "grad_norm_global"]:
        # float64: only summation order differs between the devices
        np.testing.assert_allclose(gpu[name].values, cpu[name].values, rtol=1e-8, atol=1e-12,
                                   err_msg=name)
    # Lanczos from the same start on the same batch: same top eigenvalue to its tolerance
    np.testing.assert_allclose(gpu.sharpness.values, cpu.sharpness.values, rtol=1e-3)
    assert gpu.attrs["tracer_seconds"] > 0


def _mlp(device, dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))
    return model.to(device=device, dtype=dtype)


def _batches(n, device, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 20, generator=g, dtype=dtype).to(device),
             torch.randn(32, 3, generator=g, dtype=dtype).to(device)) for _ in range(n)]


def _train_step(model, opt, tracer, attached, x, y, clip, tell_clip=True):
    """One traced SGD step on (x, y): the tracer attached, or its manual calls; with ``clip`` the
    gradient clipped to norm 0.5 (``clip_grad_norm_``; with ``tell_clip`` the manual calls are
    given the factor as a device tensor, the attached tracer measures it)."""
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    if attached:
        tracer.record_loss(loss)
    else:
        tracer.after_backward(loss)
    if clip:
        total = nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        if tell_clip and not attached:
            tracer.record_clip(global_factor=torch.clamp(0.5 / (total + 1e-6), max=1.0))
    opt.step()
    if not attached:
        tracer.after_step()


def _traced_run(device, attached, batches, block_size=4, clip_every=3, engine="auto"):
    """The MLP trained on ``batches`` with momentum, the gradient clipped every ``clip_every``
    steps (by ``clip_grad_norm_``: the attached tracer measures the factor, the manual calls
    are given it as a device tensor)."""
    model = _mlp(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracer = Tracer(model, opt, block_size=block_size, engine=engine)
    if attached:
        tracer.attach()
    for k, (x, y) in enumerate(batches):
        _train_step(model, opt, tracer, attached, x, y, clip=k % clip_every == 1)
    ds = tracer.detach().dataset()
    ds.attrs["graphs"] = len(getattr(tracer._engine, "graphs", {}))
    return ds


def test_cuda_attached_and_manual_traces_match_the_cpu_trace():
    """The torch engine on CUDA (blocks of 4 across 10 steps, clipping every third step),
    attached and with the manual calls, against the CPU's numpy engine, all float64."""
    cpu = _traced_run("cpu", False, _batches(10, "cpu"))
    for attached in (False, True):
        gpu = _traced_run("cuda", attached, _batches(10, "cuda"))
        assert gpu.attrs["tracer_seconds"] > 0
        for name in STATS + ["loss", "grad_norm_global", "grad_abs_min", "update_ratio",
                             "grad_cos_global", "update_cos_global"]:
            np.testing.assert_allclose(gpu[name].values, cpu[name].values, rtol=1e-8, atol=1e-12,
                                       err_msg=f"{name}, attached={attached}")
        # the global clip factor: given (manual) or measured as ‖g clipped‖/‖g raw‖ (attached)
        np.testing.assert_allclose(gpu.clip_factor_global.values, cpu.clip_factor_global.values,
                                   rtol=1e-6)
        if attached:  # global clipping scales every layer by the same factor
            np.testing.assert_allclose(gpu.clip_factor.values,
                                       np.repeat(cpu.clip_factor_global.values[:, None], 3, 1), rtol=1e-6)


@pytest.mark.parametrize("attached", [False, True])
def test_cuda_traced_steps_never_synchronise_between_flushes(attached):
    _no_sync_between_flushes(attached, "torch")


def _no_sync_between_flushes(attached, engine):
    """torch.cuda.set_sync_debug_mode("error") raises at any synchronising call (``.item()``,
    a blocking copy between host and device, a stream synchronisation) in the traced steps;
    the flush (every block_size steps) is the one place the host reads the device."""
    model = _mlp("cuda", torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracer = Tracer(model, opt, block_size=16, engine="auto" if engine == "torch" else engine)
    assert tracer.engine == engine  # auto: the torch engine on CUDA
    if attached:
        tracer.attach()
    batches = _batches(16, "cuda", torch.float32)

    def step(k):
        _train_step(model, opt, tracer, attached, *batches[k], clip=k % 3 == 1, tell_clip=False)
    for k in range(8):  # the first steps (momentum buffers, library handles, graph captures) unguarded
        step(k)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(8, 15):  # rows 9..15 of the 16-row block: no flush
            step(k)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert tracer._row == 15
    step(15)  # the flush
    assert tracer._row == 0
    ds = tracer.detach().dataset()
    assert ds.sizes["step"] == 16 and np.isfinite(ds.grad_norm.values).all()


def test_device_benchmark_runs_on_cuda(tmp_path):
    """benchmarks/bench_trace_device.py's CUDA path end to end, briefly (the transformer at the
    spec's batch, a few seconds)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_trace_device.py"
    spec = importlib.util.spec_from_file_location("bench_trace_device", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--device", "cuda", "--models", "transformer", "--large-factor", "0", "--budget-s", "5",
                "--warmup", "1", "--min-rounds", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    (r,) = result["settings"]
    assert result["complete"] and r["engine"] == "torch" and r["trace_finite"]
    assert r["trace_steps_recorded"] == r["traced_steps"] > 0
    assert r["ratio_manual"] > 0 and r["ratio_attached"] > 0


# the opt-in graph engine last (a failed capture must not disturb the tests above)
@pytest.mark.parametrize("attached", [False, True])
def test_cuda_graph_engine_equals_the_torch_engine(attached):
    """The graph engine (captures in steps 4-5, replays after) against the eager torch engine
    on CUDA, float64, 20 steps in blocks of 8, clipping every third step: the same kernels,
    so equal to rounding (rtol 1e-10)."""
    batches = _batches(20, "cuda")
    eager = _traced_run("cuda", attached, batches, block_size=8, engine="torch")
    graph = _traced_run("cuda", attached, batches, block_size=8, engine="torch-graph")
    assert graph.attrs["graphs"] == 4  # gradient and update statistics x 2 parities
    for name, var in eager.data_vars.items():
        np.testing.assert_allclose(graph[name].values, var.values, rtol=1e-10, atol=1e-14,
                                   err_msg=f"{name}, attached={attached}")


@pytest.mark.parametrize("attached", [False, True])
def test_cuda_graph_engine_steps_never_synchronise_between_flushes(attached):
    _no_sync_between_flushes(attached, "torch-graph")
