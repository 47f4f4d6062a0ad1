r"""Learning-rate schedules as pure functions of the step: PyTorch's scheduler formulas
(StepLR, MultiStepLR, CosineAnnealingLR, LinearLR), stepped once per optimizer step. The
NQM's schedule recursion (:mod:`dynamics.nqm.schedule`) and the training loop
(:func:`experiments.runs.optim.lr_factors`) both read them from here."""

import numpy as np

from dynamics._checks import check_positive

_SCHEDULE_PARAMS = {
    "constant": {},
    "step": {"gamma": 0.1, "step_size": None, "milestones": None},
    "cosine": {"eta_min": 0.0, "t_max": None},
    "linear": {"start_factor": 1.0, "end_factor": 0.0, "total_iters": None},
}


def lr_schedule(kind, lr0, steps, **params):
    r"""Per-step learning rates :math:`\alpha_t`, t = 0..steps-1 (the lr used by step t),
    with PyTorch's scheduler formulas stepped once per optimizer step:

    - ``constant``: :math:`\alpha_0`
    - ``step``: :math:`\alpha_0\gamma^{\#\{m \le t\}}` over ``milestones`` (MultiStepLR), or
      :math:`\alpha_0\gamma^{\lfloor t/\mathrm{step\_size}\rfloor}` (StepLR); ``gamma`` = 0.1
    - ``cosine``: :math:`\eta_{min} + (\alpha_0-\eta_{min})(1+\cos(\pi t/T_{max}))/2`,
      ``t_max`` = steps (CosineAnnealingLR)
    - ``linear``: :math:`\alpha_0 (s + (e-s)\min(t, T)/T)`, ``start_factor`` s = 1,
      ``end_factor`` e = 0, ``total_iters`` T = steps (LinearLR)

    >>> lr_schedule("step", 1.0, 5, milestones=[2, 4]).tolist()
    [1.0, 1.0, 0.1, 0.1, 0.01]
    """
    if kind not in _SCHEDULE_PARAMS:
        raise ValueError(f"kind={kind!r} is unknown; valid: {', '.join(_SCHEDULE_PARAMS)}")
    unknown = set(params) - set(_SCHEDULE_PARAMS[kind])
    if unknown:
        raise ValueError(f"{sorted(unknown)} are not parameters of the {kind!r} schedule; "
                         f"valid: {sorted(_SCHEDULE_PARAMS[kind]) or 'none'}")
    p = {**_SCHEDULE_PARAMS[kind], **params}
    lr0 = float(check_positive("lr0", lr0))
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps={steps!r} is outside the valid range: integers >= 1")
    t = np.arange(int(steps), dtype=float)
    if kind == "constant":
        return np.full(t.shape, lr0)
    if kind == "step":
        if (p["milestones"] is None) == (p["step_size"] is None):
            raise ValueError("the 'step' schedule needs exactly one of milestones, step_size")
        if p["milestones"] is not None:
            drops = np.searchsorted(np.sort(np.asarray(p["milestones"])), t, side="right")
        else:
            drops = np.floor(t / check_positive("step_size", p["step_size"]))
        return lr0 * float(p["gamma"]) ** drops
    if kind == "cosine":
        t_max = float(check_positive("t_max", p["t_max"] or steps))
        return p["eta_min"] + (lr0 - p["eta_min"]) * (1 + np.cos(np.pi * t / t_max)) / 2
    total = float(check_positive("total_iters", p["total_iters"] or steps))
    s, e = float(p["start_factor"]), float(p["end_factor"])
    return lr0 * (s + (e - s) * np.minimum(t, total) / total)
