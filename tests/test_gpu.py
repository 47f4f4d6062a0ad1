"""CUDA paths, run only where a GPU is present (marked ``gpu``; skipped elsewhere, and CI has
none). The same float64 run on the GPU and on the CPU must give the same trace up to
floating-point reordering: this exercises the tracer's torch engine with device blocks,
the CUDA timing events and the probes on the device."""

import numpy as np
import pytest

from experiments.runs import RunConfig, train

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
