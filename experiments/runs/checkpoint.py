r"""Checkpoints of a run, resuming after an interruption, and forks (docs/design.md, data flow 1).

A checkpoint after k steps (``RUN_DIR/checkpoints/step-0000000k.pt``, written atomically by
:func:`experiments.store.atomic_write_bytes`) holds everything step k onwards depends on:

* the model's and the optimizer's state (momentum buffers), the lr scheduler's position;
* the random streams: the global CPU (and CUDA) generator (dropout, line search), the
  data-order generator with the position in the current epoch, the probe-batch generator
  and the probes' own generator and warm-start vectors;
* the tracer's rows so far and its double buffers (g(t−1) and Δθ(t−1), which the next
  step's ``grad_cos`` / ``update_cos`` need), the loop's per-step records;
* the config it was made under (a dict).

Resuming from it (same config) reproduces the uninterrupted run bit for bit on the CPU
(tested by killing a run with SIGKILL, ``tests/test_checkpoint.py``).

A fork (``RunConfig.fork_from = "RUN_ID@k"``) restores run RUN_ID's checkpoint after k steps
and continues with its own config, which may differ from the parent's only in
:data:`FORKABLE` fields (lr, schedule, momentum, method among gd/hb/nag, clipping, length,
...). The optimizer's hyperparameters and the lr schedule are then the fork's: step t ≥ k
uses ``lr · f_t`` with the fork's factors f (:func:`experiments.runs.optim.lr_factors`).
Its trace holds the parent's steps 0..k−1 followed by its own.
"""

import copy
import io
import re
from pathlib import Path

import numpy as np
import torch

from experiments import store
from experiments.runs.optim import get_rng_state, make_optimizer, set_rng_state

CHECKPOINTS = "checkpoints"
FORKABLE = ("opt", "lr", "momentum", "weight_decay", "schedule", "warmup_steps", "step_every", "step_gamma",
            "final_lr_factor", "steps", "clip", "clip_value", "line_search", "line_search_evals",
            "line_search_max", "eval_every", "checkpoint_every", "threads", "device", "fork_from", "fork_data_seed")
SGD_METHODS = ("gd", "hb", "nag")


# --------------------------------------------------------------------------- files
def path(run_dir, step):
    return Path(run_dir) / CHECKPOINTS / f"step-{int(step):08d}.pt"


def save(run_dir, state):
    """Write ``state`` (from :func:`capture`) atomically as the checkpoint of its step."""
    buf = io.BytesIO()
    torch.save(state, buf)
    store.atomic_write_bytes(path(run_dir, state["step"]), buf.getvalue())


def load(file):
    return torch.load(file, map_location="cpu", weights_only=False)  # our own files


def steps(run_dir):
    """The steps that have a checkpoint in ``run_dir``, ascending."""
    folder = Path(run_dir) / CHECKPOINTS
    found = [re.fullmatch(r"step-(\d+)\.pt", p.name) for p in folder.glob("step-*.pt")] if folder.is_dir() else []
    return sorted(int(m.group(1)) for m in found if m)


def latest(run_dir):
    """The last checkpoint of ``run_dir`` (a dict), or None."""
    found = steps(run_dir)
    return load(path(run_dir, found[-1])) if found else None


def parent_checkpoint(root, fork_from):
    """The checkpoint a fork starts from: ``ROOT/RUN_ID/checkpoints/step-k.pt``."""
    parent, _, at = fork_from.partition("@")
    file = path(Path(root) / parent, int(at))
    if not file.exists():
        have = steps(Path(root) / parent)
        raise ValueError(f"fork_from={fork_from!r}: no checkpoint {file} (run {parent} has checkpoints at "
                         f"steps {have or 'none'}; run it with checkpoint_every dividing {at})")
    return load(file)


def check_fork(parent: dict, config):
    """ValueError unless ``config`` differs from the ``parent`` config dict only in
    :data:`FORKABLE` fields and both use SGD-type methods (their optimizer states match)."""
    mine = config.to_dict()
    fixed = sorted(k for k in mine if k not in FORKABLE and parent.get(k) != mine[k])
    if fixed:
        k = fixed[0]
        raise ValueError(f"fork_from={config.fork_from!r}: {k}={mine[k]!r} differs from the parent's "
                         f"{parent.get(k)!r}; a fork may change only {', '.join(FORKABLE)}")
    if (parent["opt"] == "adam") != (config.opt == "adam"):
        raise ValueError(f"opt={config.opt!r}: a fork of a {parent['opt']!r} run may use "
                         f"{'adam' if parent['opt'] == 'adam' else ', '.join(SGD_METHODS)} only")


# --------------------------------------------------------------------------- state
def capture(config, s, rec, step, checked):
    """Everything needed to continue after ``step`` steps (``s``: the loop's setup, ``rec``:
    its per-step record, ``checked``: steps checked for divergence); copies, not views of
    the live tensors."""
    return copy.deepcopy({
        "step": step, "checked": checked, "config": config.to_dict(),
        "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
        "rng": get_rng_state(), "order": s.order.state_dict(), "probe_rng": s.probe_rng.get_state(),
        "tracer": tracer_state(s.tracer),
        "record": {"losses": rec.losses[:step].cpu(), "grad_norms": rec.grad_norms[:step].cpu(),
                   "applied_lr": rec.applied_lr[:step].copy(), "multipliers": rec.multipliers[:step].copy(),
                   "eval": (list(rec.eval_steps), list(rec.test_losses), list(rec.test_accs))},
    })


def restore(config, s, rec, state, factors):
    """Put ``state`` into the freshly built setup ``s`` and record ``rec``; apply ``config``'s
    optimizer hyperparameters and lr schedule (``factors``) from the checkpoint's step on.
    Returns (first step, steps checked)."""
    step = state["step"]
    s.model.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    fresh = make_optimizer([torch.zeros(1, requires_grad=True)], config.opt, config.lr, config.momentum,
                           config.weight_decay).defaults
    lr = config.lr * float(factors[min(step, len(factors) - 1)])
    for group in s.optimizer.param_groups:
        group.update(fresh, lr=lr, initial_lr=config.lr)
    s.scheduler.base_lrs = [config.lr] * len(s.optimizer.param_groups)
    s.scheduler.last_epoch = step
    s.scheduler._last_lr = [lr] * len(s.optimizer.param_groups)
    s.order.load_state_dict(state["order"])
    if config.fork_data_seed and state["config"].get("fork_data_seed", 0) != config.fork_data_seed:
        s.order.generator.manual_seed(config.fork_data_seed)  # a fork's start (not its own resume):
        s.order.perm, s.order.epoch_state = None, None  # a fresh epoch from this seed at step k
    s.probe_rng.set_state(state["probe_rng"])
    load_tracer_state(s.tracer, state["tracer"])
    r = state["record"]
    rec.losses[:step] = r["losses"].to(rec.losses.device)
    rec.grad_norms[:step] = r["grad_norms"].to(rec.grad_norms.device)
    rec.applied_lr[:step], rec.multipliers[:step] = r["applied_lr"], r["multipliers"]
    rec.eval_steps, rec.test_losses, rec.test_accs = (list(x) for x in r["eval"])
    set_rng_state(state["rng"])
    return step, state["checked"]


def tracer_state(t):
    """The tracer's rows so far (flushed), its double buffers, lrs, probes and probe RNG."""
    t._flush()
    width, L = t._engine.width, len(t.layers)
    probe = t._probe_state
    return {
        "step": t.step, "lrs": [float(x) for x in t._lrs],
        "rows": np.concatenate(t._host_rows) if t._host_rows else np.zeros((0, width)),
        "clip": np.concatenate(t._host_clip) if t._host_clip else np.zeros((0, L + 1)),
        "G": t._engine.G.detach().cpu().clone(), "D": t._engine.D.detach().cpu().clone(),
        "probe_steps": list(t._probe_steps), "probe_rows": list(t._probe_rows),
        "probe_vectors": {k: v.detach().cpu().clone() for k, v in probe.vectors.items()},
        "probe_generators": {k: g.get_state() for k, g in probe._generators.items()},
        "probe_seconds": t.probe_seconds, "host_seconds": t._watch.host,
    }


def load_tracer_state(t, st):
    """Inverse of :func:`tracer_state` on a fresh tracer of the same model (buffers copied in
    place: the numpy engine's views alias them)."""
    t._engine.G.copy_(st["G"])
    t._engine.D.copy_(st["D"])
    t.step, t._row, t._phase = st["step"], 0, "idle"
    t._lrs = list(st["lrs"])
    t._host_rows, t._host_clip = [st["rows"]], [st["clip"]]
    t._probe_steps, t._probe_rows = list(st["probe_steps"]), list(st["probe_rows"])
    device = t.device
    t._probe_state.vectors = {k: v.to(device) for k, v in st["probe_vectors"].items()}
    for key, gen_state in st["probe_generators"].items():
        t._probe_state.generator(torch.device(key)).set_state(gen_state)
    t.probe_seconds, t._watch.host = st["probe_seconds"], st["host_seconds"]
