r"""One training run: a frozen :class:`RunConfig` → a per-layer trace and a summary.

``train(config)`` has no I/O and returns ``(trace, summary)``; ``run(config, out_dir)``
writes the run directory with :func:`experiments.store.write_run` (``DONE`` last).

A step (the :mod:`experiments.trace.tracer` contract)::

    [every probe_every steps: tracer.probe(loss_fn, batch)]      # at θ_k, on step k's batch
                                                                  # (or probe_batch_size drawn)
    loss = loss_fn(model, batch); loss.backward(); tracer.after_backward(loss)
    [clip; tracer.record_clip(global_factor=…, layer_factors=…)]  # factors = ‖g_clipped‖/‖g‖
    optimizer.step()  (or the line search); tracer.after_step(); scheduler.step()

Losses: cross-entropy (``classify``, and per position for ``lm``), MSE/2 =
mean((ŷ − y)²)/2 for ``regress`` (so the ``linreg`` Hessian is the input covariance).

Determinism: the seed drives the initialisation, dropout and the data order (a
``torch.Generator``); the global RNG states are restored after the run, and
on an accelerator ``torch.use_deterministic_algorithms(True, warn_only=True)`` is on
during it (best effort: cuBLAS also needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` set before
start). The same config gives a bit-identical trace on CPU with the same number of
threads: ``threads`` sets it for the run (0 leaves the caller's setting).

Divergence: a non-finite loss or global gradient norm at step s ends the run; the trace
keeps steps 0..s (step s holds the non-finite values), the summary says
``diverged: true, diverged_step: s`` and its loss and accuracy entries are None. The host
checks every step on CPU and every 50 steps on other devices (no per-step sync there).
"""

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from experiments import store
from experiments.runs import checkpoint
from experiments.runs.config import RunConfig, same_config
from experiments.runs.data import load_data
from experiments.runs.models import build_model
from experiments.runs.optim import (clip_gradients, get_rng_state, line_search_step, lr_factors, make_optimizer,
                                   make_scheduler)

DTYPES = {"float32": torch.float32, "float64": torch.float64}
PROBE_SEED_OFFSET = 7919  # the probe batches' generator: seed + this
POSTFIX_EVERY = 50  # steps between progress-bar postfix updates (each one is a host sync)


# --------------------------------------------------------------------------- losses
def make_loss_fn(task):
    """``loss_fn(model, (x, y))`` → scalar mean loss for the task."""
    if task == "classify":
        return lambda model, batch: F.cross_entropy(model(batch[0]), batch[1])
    if task == "lm":
        return lambda model, batch: F.cross_entropy(model(batch[0]).flatten(0, 1), batch[1].flatten())
    if task == "regress":
        return lambda model, batch: 0.5 * F.mse_loss(model(batch[0]), batch[1])
    raise ValueError(f"task={task!r} is unknown")


@torch.no_grad()
def evaluate(model, loss_fn, task, x, y, batch_size=1000):
    """(mean loss, accuracy or None) over (x, y), in eval mode, in chunks."""
    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0.0, 0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        total += loss_fn(model, (xb, yb)).item() * len(yb)
        if task != "regress":
            correct += (model(xb).argmax(-1) == yb).float().mean().item() * len(yb)
        count += len(yb)
    model.train(was_training)
    return total / count, (None if task == "regress" else correct / count)


class batches:  # noqa: N801 (lower case: it replaced a generator function of that name)
    """Index tensors of mini-batches: reshuffled every epoch with ``generator``, the
    incomplete last batch dropped (constant batch size); ``batch_size=0``: all of 0..n-1.
    An iterator whose position (the generator's state at the epoch's start and the batches
    taken in it) is :meth:`state_dict`, for checkpoints."""

    def __init__(self, n, batch_size, generator, device):
        self.n, self.batch_size, self.generator, self.device = n, batch_size, generator, device
        self.perm, self.pos, self.epoch_state = None, 0, None

    def __iter__(self):
        return self

    def __next__(self):
        if self.batch_size == 0:
            return torch.arange(self.n, device=self.device)
        if self.perm is None or (self.pos + 1) * self.batch_size > self.n:
            self.epoch_state = self.generator.get_state()
            self.perm, self.pos = torch.randperm(self.n, generator=self.generator).to(self.device), 0
        self.pos += 1
        return self.perm[(self.pos - 1) * self.batch_size:self.pos * self.batch_size]

    def state_dict(self):
        return {"epoch_state": self.epoch_state, "pos": self.pos, "state": self.generator.get_state()}

    def load_state_dict(self, state):
        if state["epoch_state"] is not None:  # redraw the epoch's permutation
            self.generator.set_state(state["epoch_state"])
            self.epoch_state = state["epoch_state"]
            self.perm = torch.randperm(self.n, generator=self.generator).to(self.device)
        self.pos = state["pos"]
        self.generator.set_state(state["state"])


# --------------------------------------------------------------------------- the run
def probe_batch(x, y, size, generator):
    """``size`` training examples drawn without replacement (all of them if fewer)."""
    idx = torch.randperm(len(y), generator=generator)[:size].to(y.device)
    return x[idx], y[idx]


def prepare(config: RunConfig, *, data_dir=None):
    """``(device, data)`` for a run, after every check that needs no training: the device
    exists here, the data loads (local files present, ``n_train`` in range), the batch fits
    the training set. ``run`` calls it before it creates the run directory."""
    device = check_device(config.device)
    data = load_data(config.data, data_dir=data_dir, **config.data_kwargs)
    if config.batch_size > data.n_train:
        raise ValueError(f"batch_size={config.batch_size} is outside the valid range [0, {data.n_train}] "
                         f"(n_train of data={config.data!r})")
    return device, data


def check_device(name, label="device"):
    """``torch.device(name)`` if this machine has it, else a ValueError naming ``label``."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{label}={name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= n:
            raise ValueError(f"{label}={name!r} is not available on this machine ({n} CUDA device(s))")
    elif device.type != "cpu" and not _backend_available(device.type):
        raise ValueError(f"{label}={name!r} is not available on this machine")
    return device


def _backend_available(kind):
    module = getattr(torch, kind, None) or getattr(torch.backends, kind, None)
    is_available = getattr(module, "is_available", None)
    return bool(is_available and is_available())


def versions():
    """Versions of the packages a result depends on (recorded in every summary)."""
    import importlib.metadata
    import platform

    try:
        optdyn = importlib.metadata.version("optdyn")
    except importlib.metadata.PackageNotFoundError:
        optdyn = "unknown"
    return {"optdyn": optdyn, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def train(config: RunConfig, *, data_dir=None, progress=False, on_probe=None, data=None, resume_from=None,
          on_checkpoint=None, loss_fn=None):
    """Train as ``config`` says; return ``(trace, summary)`` (no I/O besides reading data).

    ``trace``: the tracer's Dataset (contract in experiments/trace/tracer.py), cut at the
    divergence step, with ``lr`` (step) the applied learning rate (schedule × line-search
    multiplier), ``line_search_multiplier`` (step) when the line search is on, and
    ``test_loss``/``test_accuracy`` over ``eval_step`` (parameters after that many
    updates) when ``eval_every`` > 0. ``progress``: a tqdm bar with the loss and the
    global gradient norm (postfix refreshed every 50 steps).

    ``summary``: ``diverged``, ``diverged_step`` (int or None), ``steps_done``,
    ``final_loss`` and ``train_accuracy`` (whole training set, eval mode, at the end),
    ``test_loss``, ``test_accuracy`` (accuracy: per example, per byte for ``lm``, None for
    ``regress``; all four None after a divergence), ``final_batch_loss`` (the last
    mini-batch loss), ``n_params``, ``n_train``, ``n_test``, ``device``,
    ``tracer_seconds``, ``wall_seconds``, ``threads`` (the torch intra-op threads the run
    used), ``cpu_capability`` (the instruction set torch's CPU kernels dispatched to:
    ``AVX512``, ``AVX2``, ``DEFAULT``; the environment variable ``ATEN_CPU_CAPABILITY`` lowers it),
    ``versions`` (:func:`versions`), ``data_fingerprint`` (``Data.fingerprint``).

    The environment is recorded here, not in the config: the run id names the experiment,
    and the same config on another machine is the same experiment. Thread counts and the
    kernels' instruction set change results at round-off level, and a long run at a large lr
    amplifies that to a different trajectory: a run is bit-identical only on the same
    ``threads``, ``cpu_capability`` and ``versions`` (docs/findings/faults.md).
    ``data``: the loaded data (from :func:`prepare`), else loaded here. ``loss_fn(model, batch)``:
    a loss in place of the task's (:func:`make_loss_fn`), for an analysis (the run id does not know it).

    ``on_probe(tracer)``, if given, is called right after each probe (at the same
    parameters, before the step): the place for an analysis to measure more at the probes.

    The model is built right after ``torch.manual_seed(config.seed)`` (so its
    initialisation can be reproduced outside), then the optimizer and the tracer.

    ``resume_from``: a checkpoint (:mod:`experiments.runs.checkpoint`) to continue from, of this
    config (resume) or of the parent named by ``config.fork_from`` (fork);
    ``on_checkpoint(state)`` receives a checkpoint every ``config.checkpoint_every`` steps.
    """
    start = time.perf_counter()
    if data is None:
        device, data = prepare(config, data_dir=data_dir)
    else:
        device = torch.device(config.device)
    with _run_context(config, device):
        trace, summary = _train(config, data, device, progress, on_probe, resume_from, on_checkpoint, loss_fn)
        summary["threads"] = torch.get_num_threads()
    summary["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    summary.update(versions=versions(), data_fingerprint=data.fingerprint,
                   wall_seconds=time.perf_counter() - start)
    return trace, summary


class _run_context:
    """Seeded, forked RNG; deterministic algorithms; ``threads``; all restored on exit."""

    def __init__(self, config, device):
        self.config = config
        self.accelerator = device.type != "cpu"
        devices = [device.index or 0] if device.type == "cuda" else []
        self.fork = torch.random.fork_rng(devices=devices)

    def __enter__(self):
        self.saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                      torch.is_deterministic_algorithms_warn_only_enabled())
        self.fork.__enter__()
        torch.manual_seed(self.config.seed)
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        if self.accelerator:  # CPU kernels are deterministic already; the switch imports inductor (s)
            torch.use_deterministic_algorithms(True, warn_only=True)

    def __exit__(self, *exc):
        threads, det, warn_only = self.saved
        torch.set_num_threads(threads)
        if self.accelerator:
            torch.use_deterministic_algorithms(det, warn_only=warn_only)
        return self.fork.__exit__(*exc)


@dataclass
class _Setup:
    """What a run trains with, built once from the config (:func:`_setup`)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss_fn: object
    tracer: object
    clip_groups: dict  # clipping layer (owning module) -> its parameters
    to_tracer: dict  # tracer layer -> clipping layer
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    order: object  # the mini-batch index stream
    probe_rng: torch.Generator


@dataclass
class _Record:
    """Per-step values the loop keeps beside the tracer (on the device where possible)."""

    losses: torch.Tensor
    grad_norms: torch.Tensor
    applied_lr: np.ndarray
    multipliers: np.ndarray
    eval_steps: list = field(default_factory=list)
    test_losses: list = field(default_factory=list)
    test_accs: list = field(default_factory=list)

    @classmethod
    def empty(cls, steps, device):
        nan_t = lambda: torch.full((steps,), math.nan, device=device)  # noqa: E731
        return cls(nan_t(), nan_t(), np.full(steps, np.nan), np.full(steps, np.nan))


def _setup(config, data, device, loss_fn=None):
    """Model (built right after seeding), optimizer, lr scheduler, loss, tracer, clipping
    groups, the data on the device and the two random streams (data order, probe batches)."""
    from experiments.trace.tracer import Tracer, layer_name

    dtype = DTYPES[config.dtype]
    model = build_model(config.model, data.info, **config.model_kwargs).to(device, dtype)
    as_input = lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device)  # noqa: E731
    optimizer = make_optimizer(model.parameters(), config.opt, config.lr, config.momentum, config.weight_decay)
    scheduler = make_scheduler(optimizer, lr_factors(
        config.schedule, config.steps, warmup_steps=config.warmup_steps, step_every=config.step_every,
        step_gamma=config.step_gamma, final_lr_factor=config.final_lr_factor))
    tracer = Tracer(model, optimizer, per_tensor=config.per_tensor, probe_every=config.probe_every,
                    hutchinson_samples=config.hutchinson_samples, noise_microbatches=config.noise_microbatches,
                    probe_curvature=config.probe_curvature)
    groups = {}  # clipping layers: owning modules, whatever the tracer's per_tensor
    for name, p in model.named_parameters():
        groups.setdefault(layer_name(name), []).append(p)
    to_tracer = {layer_name(n, config.per_tensor): layer_name(n) for n, _ in model.named_parameters()}
    x, y = as_input(data.x_train), as_input(data.y_train)
    loss_fn = loss_fn or make_loss_fn(data.info.task)
    return _Setup(model, optimizer, scheduler, loss_fn, tracer, groups, to_tracer, x, y,
                  as_input(data.x_test), as_input(data.y_test),
                  order=batches(len(y), config.batch_size, torch.Generator().manual_seed(config.seed), device),
                  probe_rng=torch.Generator().manual_seed(config.seed + PROBE_SEED_OFFSET))


def _probe(config, s, batch, batch_size, on_probe):
    """The probe at θ_step, before the step: on this step's batch, or on its own draw of
    ``probe_batch_size`` examples (``grad_noise`` stays that of the training batch)."""
    if config.probe_batch_size:
        s.tracer.probe(s.loss_fn, probe_batch(s.x, s.y, config.probe_batch_size, s.probe_rng),
                       noise_batch_size=batch_size)
    else:
        s.tracer.probe(s.loss_fn, batch)
    if on_probe is not None:
        on_probe(s.tracer)


def _step(config, s, rec, step, batch):
    """One optimizer step: backward, trace, clip, step (or line search), lr schedule."""
    s.optimizer.zero_grad(set_to_none=True)
    rng = get_rng_state() if config.line_search else None
    loss = s.loss_fn(s.model, batch)
    loss.backward()
    s.tracer.after_backward(loss)
    rec.losses[step] = loss.detach()
    rec.grad_norms[step] = s.tracer.grad_norm_global  # == get_total_norm of the raw grads
    if config.clip != "none":
        global_factor, layer_factors = clip_gradients(s.clip_groups, config.clip, config.clip_value)
        s.tracer.record_clip(global_factor=global_factor, layer_factors={
            t: layer_factors[m] for t, m in s.to_tracer.items() if m in layer_factors})
    lr = s.optimizer.param_groups[0]["lr"]
    if config.line_search:
        rec.multipliers[step] = line_search_step(s.model, s.optimizer, s.loss_fn, batch,
                                                 evals=config.line_search_evals,
                                                 max_multiplier=config.line_search_max, rng_state=rng)
        rec.applied_lr[step] = lr * rec.multipliers[step]
    else:
        s.optimizer.step()
        rec.applied_lr[step] = lr
    s.tracer.after_step()
    s.scheduler.step()


def _resume(config, s, rec, state):
    """Continue from a checkpoint: this config's own (resume) or its parent's (fork)."""
    if config.fork_from and not same_config(state["config"], config):
        checkpoint.check_fork(state["config"], config)
    elif not same_config(state["config"], config):
        raise ValueError("resume_from is a checkpoint of another config (and config.fork_from is not set)")
    factors = lr_factors(config.schedule, config.steps, warmup_steps=config.warmup_steps,
                         step_every=config.step_every, step_gamma=config.step_gamma,
                         final_lr_factor=config.final_lr_factor)
    return checkpoint.restore(config, s, rec, state, factors)


def _first_nonfinite(rec, start, stop):
    """The first step in [start, stop) whose loss or global gradient norm is not finite, or
    None (one host sync)."""
    block = slice(start, stop)
    ok = (torch.isfinite(rec.losses[block]) & torch.isfinite(rec.grad_norms[block])).cpu().numpy()
    return None if ok.all() else start + int(np.argmin(ok))


def _train(config, data, device, progress, on_probe=None, resume_from=None, on_checkpoint=None, loss_fn=None):
    from tqdm.auto import tqdm

    s = _setup(config, data, device, loss_fn)
    task = data.info.task
    steps, sync_every = config.steps, (1 if device.type == "cpu" else POSTFIX_EVERY)
    rec = _Record.empty(steps, device)
    diverged_step, checked, first = None, 0, 0
    if resume_from is not None:
        first, checked = _resume(config, s, rec, resume_from)
    bar = tqdm(total=steps, initial=first, disable=not progress,
               desc=f"{config.model}/{config.data}/{config.opt}", dynamic_ncols=True)
    s.model.train()
    try:
        for step in range(first, steps):
            idx = next(s.order)
            batch = (s.x[idx], s.y[idx])
            if s.tracer.should_probe():
                _probe(config, s, batch, len(idx), on_probe)
            _step(config, s, rec, step, batch)
            bar.update()
            if (step + 1) % sync_every == 0 or step == steps - 1:
                diverged_step = _first_nonfinite(rec, checked, step + 1)
                if diverged_step is not None:
                    break
                checked = step + 1
            if (step + 1) % POSTFIX_EVERY == 0:
                bar.set_postfix(loss=f"{rec.losses[step].item():.4g}", grad_norm=f"{rec.grad_norms[step].item():.4g}")
            if config.eval_every and (step + 1) % config.eval_every == 0:
                test_loss, test_acc = evaluate(s.model, s.loss_fn, task, s.x_test, s.y_test)
                rec.eval_steps.append(step + 1), rec.test_losses.append(test_loss), rec.test_accs.append(test_acc)
            if on_checkpoint and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
                diverged_step = _first_nonfinite(rec, checked, step + 1)  # never checkpoint a divergence
                if diverged_step is not None:
                    break
                checked = step + 1
                on_checkpoint(checkpoint.capture(config, s, rec, step + 1, checked))
    finally:
        bar.close()
    return _finish(config, s, rec, task, diverged_step, steps, device)


def _finish(config, s, rec, task, diverged_step, steps, device):
    """The trace cut at the divergence step (with the applied lr and test evaluations) and
    the summary (final evaluations only when the run did not diverge)."""
    done = steps if diverged_step is None else diverged_step + 1
    trace = s.tracer.dataset().isel(step=slice(0, done))
    if "probe_step" in trace.dims:
        trace = trace.isel(probe_step=np.flatnonzero(trace.probe_step.values < done))
    trace["lr"] = ("step", rec.applied_lr[:done])
    if config.line_search:
        trace["line_search_multiplier"] = ("step", rec.multipliers[:done])
    if rec.eval_steps:
        keep = [i for i, st in enumerate(rec.eval_steps) if st <= done]
        trace = trace.assign_coords(eval_step=np.asarray(rec.eval_steps, dtype=np.int64)[keep])
        trace["test_loss"] = ("eval_step", np.asarray(rec.test_losses)[keep])
        if task != "regress":
            trace["test_accuracy"] = ("eval_step", np.asarray(rec.test_accs, dtype=float)[keep])
    summary = {
        "diverged": diverged_step is not None, "diverged_step": diverged_step, "steps_done": done,
        "final_batch_loss": _finite(rec.losses[done - 1].item()),
        "final_loss": None, "train_accuracy": None, "test_loss": None, "test_accuracy": None,
        "n_params": sum(p.numel() for p in s.model.parameters()), "device": str(device),
        "n_train": len(s.y), "n_test": len(s.y_test),
        "tracer_seconds": float(trace.attrs.get("tracer_seconds", math.nan)),
    }
    if diverged_step is None:
        summary["final_loss"], summary["train_accuracy"] = evaluate(s.model, s.loss_fn, task, s.x, s.y)
        summary["test_loss"], summary["test_accuracy"] = evaluate(s.model, s.loss_fn, task, s.x_test, s.y_test)
    return trace, summary


def _finite(value):
    return value if math.isfinite(value) else None


def run(config: RunConfig, out_dir, *, data_dir=None, progress=False):
    """Train and write the run directory (``config.json``, ``trace.nc``, ``summary.json``,
    ``DONE`` last, each atomically); return the summary.

    Before anything is created: ``out_dir`` is checked writable and :func:`prepare` runs
    (device, data files, batch size), so bad input leaves no directory behind. A directory
    that already has ``DONE`` for the same config and data fingerprint is not rerun (its
    summary is returned); one with ``DONE`` for another config or other data is a
    ValueError. Training holds the directory's claim (:func:`experiments.store.claim`): a
    directory another live process is training raises :class:`experiments.store.RunHeld`.
    A run that raises leaves ``config.json`` and ``FAILED`` (the traceback) and re-raises;
    no trace or summary is written before training has finished.

    With ``checkpoint_every`` > 0 the directory gets ``config.json`` first and a checkpoint
    every that many steps (:mod:`experiments.runs.checkpoint`); a run interrupted (even by
    SIGKILL) continues from its last checkpoint when run again. A fork (``fork_from``)
    starts from its parent's checkpoint in ``out_dir``'s parent directory (the store root).
    """
    import shutil
    import traceback
    from pathlib import Path

    out_dir = Path(out_dir)
    store.check_writable(out_dir, "out_dir", directory=True)
    _, data = prepare(config, data_dir=data_dir)
    if store.is_done(out_dir):
        return finished_summary(config, out_dir, data.fingerprint)
    with store.claim(out_dir):
        if store.is_done(out_dir):  # finished by another process while we waited
            return finished_summary(config, out_dir, data.fingerprint)
        start, save = None, None
        if config.checkpoint_every:
            stored = store.read_json(out_dir / store.CONFIG) if (out_dir / store.CONFIG).exists() else None
            if stored is not None and same_config(stored, config):
                start = checkpoint.latest(out_dir)
            else:  # another config's (or no) checkpoints: start afresh
                shutil.rmtree(out_dir / checkpoint.CHECKPOINTS, ignore_errors=True)
                store.atomic_write_json(out_dir / store.CONFIG, config.to_dict())
            save = lambda state: checkpoint.save(out_dir, state)  # noqa: E731
        if start is None and config.fork_from:
            start = checkpoint.parent_checkpoint(out_dir.parent, config.fork_from)
        try:
            trace, summary = train(config, data=data, progress=progress, resume_from=start, on_checkpoint=save)
        except Exception:
            store.write_failure(out_dir, config.to_dict(), traceback.format_exc())
            raise
        store.write_run(out_dir, config.to_dict(), trace, summary)
    return summary


def finished_summary(config: RunConfig, out_dir, fingerprint):
    """The summary of the finished run in ``out_dir``, if it is ``config`` on the data with
    this fingerprint (runs written before fingerprints were recorded are taken as matching);
    else a ValueError."""
    stored = store.read_json(out_dir / store.CONFIG)
    if not same_config(stored, config):
        raise ValueError(f"out_dir={str(out_dir)!r} holds a finished run of another config; "
                         f"write to another directory")
    summary = store.read_json(out_dir / store.SUMMARY)
    recorded = summary.get("data_fingerprint")
    if recorded is not None and recorded != fingerprint:
        raise ValueError(f"out_dir={str(out_dir)!r} holds a finished run on other data (data "
                         f"fingerprint {recorded}, the data read now has {fingerprint}); write to "
                         f"another directory")
    return summary
