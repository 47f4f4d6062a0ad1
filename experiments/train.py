r"""One training run: a frozen :class:`RunConfig` → a per-layer trace and a summary.

``train(config)`` has no I/O and returns ``(trace, summary)``; ``run(config, out_dir)``
writes the run directory with :func:`experiments.store.write_run` (``DONE`` last).

A step (the :mod:`experiments.trace` contract)::

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

import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from experiments import store
from experiments.data import DATASETS, KINDS, load_data
from experiments.models import MODELS, build_model, check_fit
from experiments.optim import (CLIPS, OPTIMIZERS, SCHEDULES, clip_gradients, line_search_step,
                               get_rng_state, lr_factors, make_optimizer, make_scheduler)

DTYPES = {"float32": torch.float32, "float64": torch.float64}
PROBE_SEED_OFFSET = 7919  # the probe batches' generator: seed + this
POSTFIX_EVERY = 50  # steps between progress-bar postfix updates (each one is a host sync)


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run. ``data_args`` / ``model_args`` are keyword
    arguments for the dataset loader / model builder (stored as sorted tuples of pairs, so
    the config is hashable; ``to_dict`` gives dicts). ``batch_size=0`` means full batch.
    For "gd" the momentum is normalised to 0.0 (it is unused, and equal runs must have
    equal configs); for "adam" it is β₁. Schedule parameters: see
    :func:`experiments.optim.lr_factors`. Clipping threshold ``clip_value`` is the max
    norm (global, layer) or the max |entry| (value). Line search: see
    :func:`experiments.optim.line_search_step` (``line_search_evals`` evaluations over the
    multiplier bracket [0, ``line_search_max``]). ``eval_every`` > 0 adds test loss and
    accuracy every that many steps (coordinate ``eval_step``). ``dtype`` of the model and
    the float inputs: "float32" or "float64" (for tight theory checks, e.g. on linreg).
    Probe (every ``probe_every`` steps, :mod:`experiments.sharpness`): ``probe_batch_size``
    examples drawn for it from the training set by its own generator (0: the step's training
    batch), ``hutchinson_samples`` vectors for the trace, ``noise_microbatches`` for the
    gradient noise and signal (0 off, else >= 2).
    """

    model: str = "mlp"
    data: str = "digits"
    opt: str = "hb"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    step_every: int = 0
    step_gamma: float = 0.1
    final_lr_factor: float = 0.0
    steps: int = 1000
    batch_size: int = 32
    clip: str = "none"
    clip_value: float = 1.0
    line_search: bool = False
    line_search_evals: int = 10
    line_search_max: float = 4.0
    seed: int = 0
    device: str = "cpu"
    probe_every: int = 0
    probe_batch_size: int = 0
    hutchinson_samples: int = 1
    noise_microbatches: int = 4
    eval_every: int = 0
    per_tensor: bool = False
    threads: int = 0
    dtype: str = "float32"
    data_args: dict = field(default_factory=dict)
    model_args: dict = field(default_factory=dict)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = _check_type(f.name, getattr(self, f.name), f.type)
            object.__setattr__(self, f.name, value)
        _choice("model", self.model, MODELS)
        _choice("data", self.data, DATASETS)
        _choice("opt", self.opt, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("clip", self.clip, CLIPS)
        _choice("dtype", self.dtype, DTYPES)
        check_fit(self.model, self.data, *KINDS[self.data])
        _check_keywords("data_args", self.data_args, DATASETS[self.data], {"n_train"}, {"data_dir"})
        _check_keywords("model_args", self.model_args, MODELS[self.model], set(), {"info"})
        _float_range("lr", self.lr, 0, math.inf, "(0, inf)")
        _float_range("momentum", self.momentum, 0, 1, "[0, 1)", low_ok=True)
        if self.opt == "gd":
            object.__setattr__(self, "momentum", 0.0)
        _float_range("weight_decay", self.weight_decay, 0, math.inf, "[0, inf)", low_ok=True)
        _float_range("clip_value", self.clip_value, 0, math.inf, "(0, inf)")
        _float_range("line_search_max", self.line_search_max, 0, math.inf, "(0, inf)")
        _float_range("step_gamma", self.step_gamma, 0, 1, "(0, 1]", high_ok=True)
        _float_range("final_lr_factor", self.final_lr_factor, 0, 1, "[0, 1]", low_ok=True, high_ok=True)
        _int_range("steps", self.steps, 1)
        _int_range("batch_size", self.batch_size, 0)
        _int_range("warmup_steps", self.warmup_steps, 0)
        _int_range("step_every", self.step_every, 1 if self.schedule == "step" else 0,
                   note=" (schedule='step' needs step_every >= 1)" if self.schedule == "step" else "")
        _int_range("line_search_evals", self.line_search_evals, 2)
        _int_range("probe_every", self.probe_every, 0)
        _int_range("probe_batch_size", self.probe_batch_size, 0)
        _int_range("hutchinson_samples", self.hutchinson_samples, 0)
        if self.noise_microbatches == 1:
            raise ValueError("noise_microbatches=1 is outside the valid range: 0 (off) or >= 2")
        _int_range("noise_microbatches", self.noise_microbatches, 0)
        _int_range("eval_every", self.eval_every, 0)
        _int_range("threads", self.threads, 0)
        _int_range("seed", self.seed, 0)
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"device={self.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None

    @property
    def data_kwargs(self):
        return _thaw(self.data_args)

    @property
    def model_kwargs(self):
        return _thaw(self.model_args)

    def to_dict(self):
        """Plain JSON-ready dict of every field (``from_dict(to_dict())`` round-trips)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["data_args"], d["model_args"] = self.data_kwargs, self.model_kwargs
        return d

    @classmethod
    def from_dict(cls, d):
        """Build from a dict; unknown keys or wrong types raise ValueError naming the key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown RunConfig key(s) {', '.join(map(repr, unknown))}; "
                             f"valid: {', '.join(sorted(known))}")
        return cls(**d)


def _check_type(name, value, kind):
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if kind is dict:
        if isinstance(value, dict):
            return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
        if isinstance(value, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
            return value
    elif isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise ValueError(f"{name}={value!r} has type {type(value).__name__}; expected {kind.__name__}")


def _freeze(v):
    return tuple(_freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


def _thaw(pairs):
    unfreeze = lambda v: [unfreeze(x) for x in v] if isinstance(v, tuple) else v
    return {k: unfreeze(v) for k, v in pairs}


def _check_keywords(name, pairs, function, extra, hidden):
    if not pairs:  # the common case; inspect.signature costs ~30 us a call
        return
    import inspect

    valid = (set(inspect.signature(function).parameters) | extra) - hidden
    unknown = sorted(k for k, _ in pairs if k not in valid)
    if unknown:
        raise ValueError(f"{name} has unknown key(s) {', '.join(map(repr, unknown))} for "
                         f"{function.__name__}; valid: {', '.join(sorted(valid)) or 'none'}")


def _choice(name, value, valid):
    if value not in valid:
        raise ValueError(f"{name}={value!r} is unknown; valid: {', '.join(valid)}")


def _float_range(name, value, low, high, shown, low_ok=False, high_ok=False):
    ok = (low <= value if low_ok else low < value) and (value <= high if high_ok else value < high)
    if not ok:  # NaN fails too
        raise ValueError(f"{name}={value!r} is outside the valid range {shown}")


def _int_range(name, value, low, note=""):
    if value < low:
        raise ValueError(f"{name}={value!r} is outside the valid range [{low}, inf){note}")


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


def batches(n, batch_size, generator, device):
    """Index tensors of mini-batches: reshuffled every epoch with ``generator``, the
    incomplete last batch dropped (constant batch size); ``batch_size=0``: all of 0..n-1."""
    if batch_size == 0:
        idx = torch.arange(n, device=device)
        while True:
            yield idx
    while True:
        perm = torch.randperm(n, generator=generator).to(device)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]


# --------------------------------------------------------------------------- the run
def probe_batch(x, y, size, generator):
    """``size`` training examples drawn without replacement (all of them if fewer)."""
    idx = torch.randperm(len(y), generator=generator)[:size].to(y.device)
    return x[idx], y[idx]


def train(config: RunConfig, *, data_dir=None, progress=False):
    """Train as ``config`` says; return ``(trace, summary)`` (no I/O besides reading data).

    ``trace``: the tracer's Dataset (contract in experiments/trace.py), cut at the
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
    ``tracer_seconds``, ``wall_seconds``.

    The model is built right after ``torch.manual_seed(config.seed)`` (so its
    initialisation can be reproduced outside), then the optimizer and the tracer.
    """
    start = time.perf_counter()
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={config.device!r} is not available on this machine")
    data = load_data(config.data, data_dir=data_dir, **config.data_kwargs)
    if config.batch_size > data.n_train:
        raise ValueError(f"batch_size={config.batch_size} is outside the valid range [0, {data.n_train}] "
                         f"(n_train of data={config.data!r})")
    with _run_context(config, device):
        trace, summary = _train(config, data, device, progress)
    summary["wall_seconds"] = time.perf_counter() - start
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


def _train(config, data, device, progress):
    from tqdm.auto import tqdm

    from experiments.trace import Tracer, layer_name

    task = data.info.task
    dtype = DTYPES[config.dtype]
    model = build_model(config.model, data.info, **config.model_kwargs).to(device, dtype)
    as_input = lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device)  # noqa: E731
    optimizer = make_optimizer(model.parameters(), config.opt, config.lr, config.momentum, config.weight_decay)
    scheduler = make_scheduler(optimizer, lr_factors(
        config.schedule, config.steps, warmup_steps=config.warmup_steps, step_every=config.step_every,
        step_gamma=config.step_gamma, final_lr_factor=config.final_lr_factor))
    loss_fn = make_loss_fn(task)
    tracer = Tracer(model, optimizer, per_tensor=config.per_tensor, probe_every=config.probe_every,
                    hutchinson_samples=config.hutchinson_samples, noise_microbatches=config.noise_microbatches)
    groups = {}  # clipping layers: owning modules, whatever the tracer's per_tensor
    for name, p in model.named_parameters():
        groups.setdefault(layer_name(name), []).append(p)
    to_tracer = {layer_name(n, config.per_tensor): layer_name(n) for n, _ in model.named_parameters()}
    x, y = as_input(data.x_train), as_input(data.y_train)
    x_test, y_test = as_input(data.x_test), as_input(data.y_test)
    order = batches(len(y), config.batch_size, torch.Generator().manual_seed(config.seed), device)
    probe_rng = torch.Generator().manual_seed(config.seed + PROBE_SEED_OFFSET)  # not the data order's stream

    steps, sync_every = config.steps, (1 if device.type == "cpu" else POSTFIX_EVERY)
    losses = torch.full((steps,), math.nan, device=device)
    grad_norms = torch.full((steps,), math.nan, device=device)
    applied_lr, multipliers = np.full(steps, np.nan), np.full(steps, np.nan)
    eval_steps, test_losses, test_accs = [], [], []
    diverged_step, checked = None, 0
    bar = tqdm(total=steps, disable=not progress, desc=f"{config.model}/{config.data}/{config.opt}",
               dynamic_ncols=True)
    model.train()
    try:
        for step in range(steps):
            idx = next(order)
            batch = (x[idx], y[idx])
            if tracer.should_probe():  # at θ_step, on this step's batch or its own draw
                if config.probe_batch_size:  # grad_noise stays that of the training batch
                    tracer.probe(loss_fn, probe_batch(x, y, config.probe_batch_size, probe_rng),
                                 noise_batch_size=len(idx))
                else:
                    tracer.probe(loss_fn, batch)
            optimizer.zero_grad(set_to_none=True)
            rng = get_rng_state() if config.line_search else None
            loss = loss_fn(model, batch)
            loss.backward()
            tracer.after_backward(loss)
            losses[step] = loss.detach()
            grad_norms[step] = tracer.grad_norm_global  # == get_total_norm of the raw grads
            if config.clip != "none":
                global_factor, layer_factors = clip_gradients(groups, config.clip, config.clip_value)
                tracer.record_clip(global_factor=global_factor, layer_factors={
                    t: layer_factors[m] for t, m in to_tracer.items() if m in layer_factors})
            lr = optimizer.param_groups[0]["lr"]
            if config.line_search:
                multipliers[step] = line_search_step(model, optimizer, loss_fn, batch, evals=config.line_search_evals,
                                                     max_multiplier=config.line_search_max, rng_state=rng)
                applied_lr[step] = lr * multipliers[step]
            else:
                optimizer.step()
                applied_lr[step] = lr
            tracer.after_step()
            scheduler.step()
            bar.update()
            if (step + 1) % sync_every == 0 or step == steps - 1:
                block = slice(checked, step + 1)
                ok = (torch.isfinite(losses[block]) & torch.isfinite(grad_norms[block])).cpu().numpy()
                if not ok.all():
                    diverged_step = checked + int(np.argmin(ok))
                    break
                checked = step + 1
            if (step + 1) % POSTFIX_EVERY == 0:
                bar.set_postfix(loss=f"{losses[step].item():.4g}", grad_norm=f"{grad_norms[step].item():.4g}")
            if config.eval_every and (step + 1) % config.eval_every == 0:
                test_loss, test_acc = evaluate(model, loss_fn, task, x_test, y_test)
                eval_steps.append(step + 1), test_losses.append(test_loss), test_accs.append(test_acc)
    finally:
        bar.close()

    done = steps if diverged_step is None else diverged_step + 1
    trace = tracer.dataset().isel(step=slice(0, done))
    if "probe_step" in trace.dims:
        trace = trace.isel(probe_step=np.flatnonzero(trace.probe_step.values < done))
    trace["lr"] = ("step", applied_lr[:done])
    if config.line_search:
        trace["line_search_multiplier"] = ("step", multipliers[:done])
    if eval_steps:
        keep = [i for i, s in enumerate(eval_steps) if s <= done]
        trace = trace.assign_coords(eval_step=np.asarray(eval_steps, dtype=np.int64)[keep])
        trace["test_loss"] = ("eval_step", np.asarray(test_losses)[keep])
        if task != "regress":
            trace["test_accuracy"] = ("eval_step", np.asarray(test_accs, dtype=float)[keep])
    summary = {
        "diverged": diverged_step is not None, "diverged_step": diverged_step, "steps_done": done,
        "final_batch_loss": _finite(losses[done - 1].item()),
        "final_loss": None, "train_accuracy": None, "test_loss": None, "test_accuracy": None,
        "n_params": sum(p.numel() for p in model.parameters()), "device": str(device),
        "n_train": len(y), "n_test": len(data.y_test),
        "tracer_seconds": float(trace.attrs.get("tracer_seconds", math.nan)),
    }
    if diverged_step is None:
        summary["final_loss"], summary["train_accuracy"] = evaluate(model, loss_fn, task, x, y)
        summary["test_loss"], summary["test_accuracy"] = evaluate(model, loss_fn, task, x_test, y_test)
    return trace, summary


def _finite(value):
    return value if math.isfinite(value) else None


def run(config: RunConfig, out_dir, *, data_dir=None, progress=False):
    """Train and write the run directory (``config.json``, ``trace.nc``, ``summary.json``,
    ``DONE`` last, each atomically); return the summary.

    A directory that already has ``DONE`` for the same config is not rerun (its summary
    is returned); one with ``DONE`` for another config is a ValueError. A run that raises
    leaves ``config.json`` and ``FAILED`` (the traceback) and re-raises; no trace or
    summary is written before training has finished.
    """
    import traceback
    from pathlib import Path

    out_dir = Path(out_dir)
    if store.is_done(out_dir):
        stored = store.read_json(out_dir / store.CONFIG)
        if stored != config.to_dict():
            raise ValueError(f"out_dir={str(out_dir)!r} holds a finished run of another config")
        return store.read_json(out_dir / store.SUMMARY)
    try:
        trace, summary = train(config, data_dir=data_dir, progress=progress)
    except Exception:
        store.write_failure(out_dir, config.to_dict(), traceback.format_exc())
        raise
    store.write_run(out_dir, config.to_dict(), trace, summary)
    return summary


# --------------------------------------------------------------------------- CLI
FIELD_HELP = {
    "model": f"one of {', '.join(MODELS)}", "data": f"one of {', '.join(DATASETS)}",
    "opt": f"one of {', '.join(OPTIMIZERS)} (PyTorch SGD convention; adam: momentum is beta1)",
    "lr": "learning rate > 0", "momentum": "in [0, 1)", "schedule": f"one of {', '.join(SCHEDULES)}",
    "step_every": "steps between decays (schedule step)", "step_gamma": "decay factor (schedule step)",
    "final_lr_factor": "final lr / lr (cosine, linear)", "batch_size": "0 = full batch",
    "clip": f"one of {', '.join(CLIPS)}", "clip_value": "max norm (global, layer) or max |g| (value)",
    "line_search": "golden-section search of the step-size multiplier in [0, line-search-max]",
    "probe_every": "sharpness/noise probe every k steps (0 = off)",
    "probe_batch_size": "examples the probe draws (0 = the step's training batch)",
    "hutchinson_samples": "Rademacher vectors per probe (trace)", "noise_microbatches": "0 (off) or >= 2",
    "eval_every": "test eval every k steps",
    "per_tensor": "trace per parameter tensor instead of per module", "threads": "torch threads (0 = leave)",
    "device": "cpu, cuda, cuda:N", "dtype": f"one of {', '.join(DTYPES)}",
}


def add_command(subparsers):
    """``optdyn train``: flags for every RunConfig field (override ``--config FILE.toml``)."""
    import argparse

    p = subparsers.add_parser("train", help="train one network and write its run directory",
                              description="Train one network with a per-layer trace. Flags override "
                                          "the TOML file given by --config (top-level RunConfig keys).")
    p.add_argument("--config", metavar="FILE.toml", help="RunConfig keys in a TOML file")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--data-dir", help=f"directory with local dataset files (default ${'OPTDYN_DATA'})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else "{}"
        doc = f"{FIELD_HELP.get(f.name, '')} (default {default})".lstrip()
        if f.type is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=doc)
        elif f.type is dict:
            p.add_argument(flag.removesuffix("s"), dest=f.name, action="append", metavar="KEY=VALUE",
                           help=f"one entry of {f.name} (VALUE parsed as TOML, else a string); repeatable")
        else:
            p.add_argument(flag, dest=f.name, type=f.type, default=None, help=doc)
    p.set_defaults(func=_main)


def _toml_value(text):
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def config_from_args(args):
    """RunConfig from the TOML file (if any) updated by the flags that were given."""
    import tomllib

    d = {}
    if args.config:
        try:
            with open(args.config, "rb") as f:
                d = tomllib.load(f)
        except OSError as err:
            raise ValueError(f"config={args.config!r} cannot be read: {err.strerror}") from None
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config={args.config!r} is not valid TOML: {err}") from None
    for f in dataclasses.fields(RunConfig):
        value = getattr(args, f.name)
        if value is None:
            continue
        if f.type is dict:
            entries = dict(d.get(f.name, {}))
            for item in value:
                key, sep, text = item.partition("=")
                if not sep or not key:
                    raise ValueError(f"{f.name} entry {item!r} is not KEY=VALUE")
                entries[key] = _toml_value(text)
            value = entries
        d[f.name] = value
    return RunConfig.from_dict(d)


def _main(args):
    import json

    config = config_from_args(args)
    summary = run(config, args.out, data_dir=args.data_dir, progress=not args.no_progress)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0
