"""Checkpoints, resuming after SIGKILL, forks (experiments/runs/checkpoint.py)."""

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from experiments import store
from experiments.runs import checkpoint
from experiments.runs.config import RunConfig, canonical_config, run_id, same_config
from experiments.runs.loop import run, train

# dropout (global RNG), a probe every 30 steps with its own batch draws (probe RNG, Lanczos
# warm starts), several epochs of digits (data order), a step decay, eval between
BASE = dict(model="seed-cnn", data="digits", model_args={"channels": 4, "hidden": 16}, steps=60, batch_size=64,
            threads=1, seed=2, lr=0.05, momentum=0.9, schedule="step", step_every=35, step_gamma=0.1,
            probe_every=15, probe_batch_size=128, hutchinson_samples=2, noise_microbatches=2, eval_every=20)


def data_only(ds):
    return ds.drop_attrs()


def before(ds, k):
    """The trace of the first k steps (probes at θ_0..θ_{k-1}, evaluations after <= k steps)."""
    return data_only(ds.sel(step=ds.step < k, probe_step=ds.probe_step < k, eval_step=ds.eval_step <= k))


@pytest.mark.slow
def test_checkpointing_leaves_the_trace_unchanged_and_resume_is_bit_identical(tmp_path):
    plain, _ = train(RunConfig(**BASE))
    cfg = RunConfig(**BASE, checkpoint_every=13)
    states = []
    trace, summary = train(cfg, on_checkpoint=states.append)
    xr.testing.assert_identical(data_only(plain), data_only(trace))
    assert [s["step"] for s in states] == [13, 26, 39, 52]
    for state in states[1:3]:  # mid-epoch, after a probe, before and after the decay
        resumed, rs = train(cfg, resume_from=state)
        xr.testing.assert_identical(data_only(trace), data_only(resumed))
        assert rs["final_loss"] == summary["final_loss"] and rs["test_accuracy"] == summary["test_accuracy"]


SCRIPT = """
import sys, time
from experiments.runs import checkpoint
from experiments.runs.config import RunConfig
from experiments.runs.loop import run
save = checkpoint.save
def slow_save(run_dir, state):
    save(run_dir, state)
    time.sleep(0.3)  # leave the killer time to strike between checkpoints
checkpoint.save = slow_save
run(RunConfig.from_dict(eval(sys.argv[1])), sys.argv[2])
"""


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_uninterrupted_trace(tmp_path):
    cfg = RunConfig(**BASE, checkpoint_every=10)
    whole = tmp_path / "whole"
    run(cfg, whole)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, repr(cfg.to_dict()), str(killed)],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    deadline = time.monotonic() + 120
    while len(checkpoint.steps(killed)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not store.is_done(killed) and 2 <= len(checkpoint.steps(killed)) < 6  # really cut mid-run
    run(cfg, killed)
    xr.testing.assert_identical(data_only(store.load_run(whole)), data_only(store.load_run(killed)))


def test_a_fork_without_change_is_its_parent_and_a_changed_fork_follows_its_lr(tmp_path):
    parent = RunConfig(**{**BASE, "probe_every": 0, "eval_every": 0}, checkpoint_every=25)  # fast: no probes
    pid = run_id(parent)
    run(parent, tmp_path / pid)
    same = RunConfig(**{**parent.to_dict(), "checkpoint_every": 0, "fork_from": f"{pid}@25"})
    run(same, tmp_path / run_id(same))
    a, b = store.load_run(tmp_path / pid), store.load_run(tmp_path / run_id(same))
    xr.testing.assert_identical(data_only(a), data_only(b))

    changed = RunConfig(**{**same.to_dict(), "lr": 0.02, "momentum": 0.5, "opt": "nag", "clip": "global",
                           "clip_value": 0.01, "schedule": "constant"})
    assert len({run_id(changed), run_id(same), pid}) == 3
    run(changed, tmp_path / run_id(changed))
    c = store.load_run(tmp_path / run_id(changed))
    xr.testing.assert_identical(data_only(a.isel(step=slice(0, 25))), data_only(c.isel(step=slice(0, 25))))
    np.testing.assert_array_equal(c.lr.values[25:], 0.02)  # constant schedule from the fork on
    assert (c.clip_factor_global.values[25:] < 1).any() and (c.clip_factor_global.values[:25] == 1).all()
    assert not np.array_equal(a.grad_norm.values[26:], c.grad_norm.values[26:])


def test_fork_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"fork_from='abc@3' is not RUN_ID@STEP"):
        RunConfig(**BASE, fork_from="abc@3")
    with pytest.raises(ValueError, match=r"fork_from='0123456789abcdef@60' .*\[1, steps=60\)"):
        RunConfig(**BASE, fork_from="0123456789abcdef@60")
    with pytest.raises(ValueError, match="checkpoint_every=-1 is outside"):
        RunConfig(**BASE, checkpoint_every=-1)
    fork = RunConfig(**BASE, fork_from="0123456789abcdef@50")
    with pytest.raises(ValueError, match="no checkpoint .* checkpoints at steps none"):
        run(fork, tmp_path / run_id(fork))
    parent = RunConfig(**BASE).to_dict()
    with pytest.raises(ValueError, match=r"seed=3 differs from the parent's 2"):
        checkpoint.check_fork(parent, RunConfig(**{**BASE, "seed": 3}, fork_from="0123456789abcdef@50"))
    with pytest.raises(ValueError, match="a fork of a 'hb' run may use gd, hb, nag only"):
        checkpoint.check_fork(parent, RunConfig(**{**BASE, "opt": "adam"}, fork_from="0123456789abcdef@50"))


@pytest.mark.parametrize("engine", ["fused", "numpy", "torch"])
def test_tracer_state_round_trip_continues_the_trace_exactly(engine):
    # the torch engine is the one used on accelerators; here on the CPU, all three engines
    import torch

    from experiments.trace.tracer import Tracer

    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, opt, Tracer(model, opt, engine=engine, probe_every=3, block_size=4, noise_microbatches=2)

    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 5, generator=gen), torch.randn(8, 2, generator=gen)) for _ in range(10)]
    loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731

    def steps(model, opt, tracer, batches):
        for b in batches:
            if tracer.should_probe():
                tracer.probe(loss_fn, b)
            opt.zero_grad()
            loss = loss_fn(model, b)
            loss.backward()
            tracer.after_backward(loss)
            opt.step()
            tracer.after_step()

    model, opt, tracer = setup()
    steps(model, opt, tracer, data[:5])
    saved = checkpoint.tracer_state(tracer)
    model_state, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    steps(model, opt, tracer, data[5:])
    whole = tracer.dataset()
    model2, opt2, tracer2 = setup()
    model2.load_state_dict(model_state)
    opt2.load_state_dict(opt_state)
    checkpoint.load_tracer_state(tracer2, saved)
    steps(model2, opt2, tracer2, data[5:])
    xr.testing.assert_identical(data_only(whole), data_only(tracer2.dataset()))


def test_a_sweep_spec_forks_from_a_parent_run(tmp_path):
    from experiments.sweeps import run_sweep

    parent = {**BASE, "probe_every": 0, "eval_every": 0, "steps": 40, "checkpoint_every": 20}
    pid = run_id(RunConfig(**parent))
    assert run_sweep({"name": "parent", "base": parent}, root=tmp_path, workers=0, progress=False)["finished"] == 1
    forks = {"name": "forks", "base": {**parent, "checkpoint_every": 0, "fork_from": f"{pid}@20"},
             "grid": {"lr": [0.01, 0.1]}}
    counts = run_sweep(forks, root=tmp_path, workers=0, progress=False)
    assert (counts["finished"], counts["failed"]) == (2, 0)
    a = store.load_run(tmp_path / pid)
    for lr in (0.01, 0.1):
        fork = RunConfig(**{**forks["base"], "lr": lr})
        b = store.load_run(tmp_path / run_id(fork))
        np.testing.assert_array_equal(a.loss.values[:20], b.loss.values[:20])
        assert b.attrs["config"]["fork_from"] == f"{pid}@20" and b.lr.values[20] == lr


def test_resuming_another_configs_checkpoint_is_refused():
    cfg = RunConfig(**{**BASE, "probe_every": 0, "eval_every": 0, "steps": 20}, checkpoint_every=10)
    states = []
    train(cfg, on_checkpoint=states.append)
    with pytest.raises(ValueError, match="resume_from is a checkpoint of another config"):
        train(RunConfig(**{**cfg.to_dict(), "lr": 0.01}), resume_from=states[0])


@pytest.mark.slow
def test_a_data_seed_fork_differs_only_in_its_data_order_and_resumes_itself(tmp_path):
    """fork_data_seed redraws the mini-batch order from the fork's step on: the trace before it
    is the parent's, the lr is the parent's, the gradients after it differ; the same seed gives
    the same fork; a fork resumed from its own checkpoint is not redrawn a second time."""
    parent = RunConfig(**{**BASE, "probe_every": 0, "eval_every": 0}, checkpoint_every=25)
    pid = run_id(parent)
    run(parent, tmp_path / pid)
    fork = RunConfig(**{**parent.to_dict(), "checkpoint_every": 0, "fork_from": f"{pid}@25", "fork_data_seed": 5})
    run(fork, tmp_path / run_id(fork))
    a, b = store.load_run(tmp_path / pid), store.load_run(tmp_path / run_id(fork))
    xr.testing.assert_identical(data_only(a.isel(step=slice(0, 25))), data_only(b.isel(step=slice(0, 25))))
    np.testing.assert_array_equal(a.lr.values, b.lr.values)
    assert not np.array_equal(a.grad_norm.values[25], b.grad_norm.values[25])  # another batch at step 25
    again, _ = train(fork, resume_from=checkpoint.load(checkpoint.path(tmp_path / pid, 25)))
    np.testing.assert_array_equal(again.grad_norm.values, b.grad_norm.values)
    states = []  # the fork's own checkpoint at 40, resumed: the uninterrupted fork
    own = RunConfig(**{**fork.to_dict(), "checkpoint_every": 40})
    whole, _ = train(own, resume_from=checkpoint.load(checkpoint.path(tmp_path / pid, 25)),
                     on_checkpoint=states.append)
    resumed, _ = train(own, resume_from=states[0])
    np.testing.assert_array_equal(resumed.grad_norm.values, whole.grad_norm.values)
    np.testing.assert_array_equal(whole.grad_norm.values, b.grad_norm.values)


def test_fork_data_seed_is_left_out_of_old_ids_and_needs_a_fork(tmp_path):
    cfg = RunConfig(**BASE)
    assert "fork_data_seed" not in canonical_config(cfg)
    assert run_id(cfg) == run_id(RunConfig(**BASE, fork_data_seed=0))
    with pytest.raises(ValueError, match=r"fork_data_seed=3 needs fork_from"):
        RunConfig(**BASE, fork_data_seed=3)
    with pytest.raises(ValueError, match=r"fork_data_seed=-1 is outside the valid range \[0, inf\)"):
        RunConfig(**BASE, fork_data_seed=-1, fork_from="0123456789abcdef@50")
    old = {k: v for k, v in cfg.to_dict().items() if k != "fork_data_seed"}  # a config.json of before
    assert same_config(old, cfg) and not same_config({**old, "lr": 0.5}, cfg)
