r"""Optimisers, learning-rate schedules, gradient clipping and the golden-section line
search used by :mod:`experiments.runs.loop`.

GD / HB / NAG are ``torch.optim.SGD`` with the keyword arguments from
:meth:`dynamics.methods.Method.torch_kwargs` (the package's one convention, docs/theory.md §1);
"adam" is ``torch.optim.Adam`` with betas (momentum, 0.999).
"""

import math

import numpy as np
import torch

from dynamics.methods import get_method
from dynamics.schedules import lr_schedule

OPTIMIZERS = ("gd", "hb", "nag", "adam")
SCHEDULES = ("constant", "step", "cosine", "linear")
CLIPS = ("none", "global", "layer", "value")


def make_optimizer(params, opt, lr, momentum=0.0, weight_decay=0.0):
    """``torch.optim.SGD`` for gd/hb/nag (weight decay coupled, as SGD does it) or
    ``torch.optim.Adam(betas=(momentum, 0.999))``."""
    if opt == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)
    return torch.optim.SGD(params, weight_decay=weight_decay, **get_method(opt).torch_kwargs(lr, momentum))


def lr_factors(schedule, steps, *, warmup_steps=0, step_every=0, step_gamma=0.1, final_lr_factor=0.0):
    r"""The learning-rate multiplier at each step k = 0..steps-1 (step k uses lr·f_k).

    With p = (k − w)/(steps − w) clipped to [0, 1] (w = ``warmup_steps``) and
    f = ``final_lr_factor``:

    - constant: 1
    - step: γ^⌊k / step_every⌋ (γ = ``step_gamma``)
    - cosine: f + (1 − f)(1 + cos πp)/2
    - linear: 1 − (1 − f) p

    then, for k < w, times the linear warm-up (k + 1)/(w + 1). The formulas are PyTorch's
    schedulers', from :func:`dynamics.nqm.schedule.lr_schedule` (the one source the NQM's
    schedule prediction uses too).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is unknown; valid: {', '.join(SCHEDULES)}")
    if schedule == "step":  # counted from step 0, through the warm-up
        f = lr_schedule("step", 1.0, steps, step_size=step_every, gamma=step_gamma)
    else:  # the decay starts after the warm-up: PyTorch's formulas over the remaining steps
        after = {"constant": {}, "cosine": {"eta_min": final_lr_factor},
                 "linear": {"end_factor": final_lr_factor}}[schedule]
        rest = lr_schedule(schedule, 1.0, max(steps - warmup_steps, 1), **after)
        f = np.concatenate([np.ones(warmup_steps), rest])[:steps]
    k = np.arange(steps, dtype=float)
    return f * np.minimum(1.0, (k + 1) / (warmup_steps + 1))


def make_scheduler(optimizer, factors):
    """``LambdaLR`` over a precomputed factor array (the last factor after the end)."""
    factors = [float(f) for f in factors]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: factors[min(k, len(factors) - 1)])


def clip_gradients(groups, mode, value):
    r"""Clip the gradients in place; return (global_factor, {layer: factor}) as tensors.

    ``groups``: {layer: [parameters]}.
    A factor is ‖g_clipped‖/‖g_raw‖ (1 when the raw norm is 0):

    - "global": all gradients times min(1, c/(‖g‖ + 1e-6)) (``clip_grad_norm_``): every
      layer's factor equals the global one.
    - "layer": each layer's gradient times its own min(1, c/(‖g_l‖ + 1e-6)); the global
      factor is the resulting change of the global norm.
    - "value": every entry clamped to [−c, c] (``clip_grad_value_``); factors measured.
    """
    params = {name: [p for p in ps if p.grad is not None] for name, ps in groups.items()}
    params = {name: ps for name, ps in params.items() if ps}
    norm = lambda ps: torch.nn.utils.get_total_norm([p.grad for p in ps])  # noqa: E731
    raw = {name: norm(ps) for name, ps in params.items()}
    raw_global = torch.nn.utils.get_total_norm(list(raw.values()))
    if mode == "global":
        factor = torch.clamp(value / (raw_global + 1e-6), max=1.0)
        torch.nn.utils.clip_grads_with_norm_([p for ps in params.values() for p in ps], value, raw_global)
        return factor, {name: factor for name in params}
    if mode == "layer":
        factors = {}
        for name, ps in params.items():
            factors[name] = torch.clamp(value / (raw[name] + 1e-6), max=1.0)
            torch.nn.utils.clip_grads_with_norm_(ps, value, raw[name])
    elif mode == "value":
        torch.nn.utils.clip_grad_value_([p for ps in params.values() for p in ps], value)
        factors = {name: _ratio(norm(ps), raw[name]) for name, ps in params.items()}
    else:
        raise ValueError(f"clip={mode!r} is unknown here; valid: global, layer, value")
    new_global = torch.nn.utils.get_total_norm([factors[n] * raw[n] for n in params])
    return _ratio(new_global, raw_global), factors


def _ratio(new, old):
    return torch.where(old > 0, new / torch.where(old > 0, old, 1.0), torch.ones_like(old))


GOLDEN = (math.sqrt(5) - 1) / 2  # 1/φ ≈ 0.618


def golden_section(phi, lo, hi, evals):
    r"""Minimise a scalar function on [lo, hi] with exactly ``evals`` (≥ 2) evaluations.

    Classic golden-section search (Kiefer 1953): interior points c = hi − τ(hi − lo),
    d = lo + τ(hi − lo), τ = 1/φ; keep the sub-bracket around the smaller value; each
    further evaluation shrinks the bracket by τ, so after n evaluations it is
    τ^(n−1)(hi − lo) wide. Returns the best evaluated point and its value (the end
    points are never evaluated; a non-finite value counts as +inf). Written out rather
    than scipy's ``minimize_scalar(method="golden")`` because that one expands its bracket
    with extra evaluations: here the cost is fixed and the bracket bounded.
    """
    value = lambda m: (v if math.isfinite(v := float(phi(m))) else math.inf)
    c, d = hi - GOLDEN * (hi - lo), lo + GOLDEN * (hi - lo)
    fc, fd = value(c), value(d)
    best = min((fc, c), (fd, d))
    for _ in range(evals - 2):
        if fc <= fd:
            hi, d, fd = d, c, fc
            c = hi - GOLDEN * (hi - lo)
            fc = value(c)
            best = min(best, (fc, c))
        else:
            lo, c, fc = c, d, fd
            d = lo + GOLDEN * (hi - lo)
            fd = value(d)
            best = min(best, (fd, d))
    return best[1], best[0]


@torch.no_grad()
def line_search_step(model, optimizer, loss_fn, batch, *, evals, max_multiplier, rng_state):
    r"""Take the optimiser's step, then rescale it by the multiplier m* ∈ (0, max_multiplier)
    that minimises the mini-batch loss along it: θ ← θ + m*·Δ, Δ = the optimiser's proposed
    update (so the applied learning rate is m*·lr; momentum buffers and Adam moments are
    the optimiser's own, unchanged).

    m* by :func:`golden_section` with ``evals`` loss evaluations of φ(m) = L_batch(θ + mΔ),
    each with the random state ``rng_state`` (the one the gradient's forward pass saw, so
    dropout masks match) and the model in its current mode; BatchNorm running statistics
    are restored afterwards. Each evaluation reads its loss on the host (a sync).
    Returns m*.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer.step()
    delta = torch._foreach_sub([p.detach() for p in params], before)
    buffers = [b.clone() for b in model.buffers()]
    after_rng = get_rng_state()

    def phi(m):
        for p, b, d in zip(params, before, delta):
            p.copy_(b + m * d)
        set_rng_state(rng_state)
        return loss_fn(model, batch).item()

    m_star, _ = golden_section(phi, 0.0, max_multiplier, evals)
    for p, b, d in zip(params, before, delta):
        p.copy_(b + m_star * d)
    for b, saved in zip(model.buffers(), buffers):
        b.copy_(saved)
    set_rng_state(after_rng)
    return m_star


def get_rng_state():
    """The CPU and (initialised) CUDA random states."""
    n_cuda = torch.cuda.device_count() if torch.cuda.is_initialized() else 0
    cuda = [torch.cuda.get_rng_state(i) for i in range(n_cuda)]
    return torch.get_rng_state(), cuda


def set_rng_state(state):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for i, s in enumerate(cuda):
        torch.cuda.set_rng_state(s, i)
