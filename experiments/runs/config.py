r"""What determines a run: :class:`RunConfig` (validated on construction) and its id.

A config is frozen and hashable; every field is checked when it is built, and a bad value
raises a ValueError naming the field, the value and the valid range (the CLI prints it as
one line, exit status 2).

The run id (:func:`run_id`) is ``sha256(RESULT_FORMAT, canonical JSON of the full
config)[:16]``: all fields with defaults filled in, keys sorted, ints in float fields made
floats, ``-0.0`` made ``0.0``, and inside ``data_args``/``model_args`` an integral float made
the int it equals, so ``[1, 2]`` and ``[1.0, 2.0]`` give one id (:func:`canonical_config`). So the same run is computed once,
across sweeps too; bump :data:`RESULT_FORMAT` when what a run writes changes meaning, and
every run is recomputed under new ids. Fields added after runs were stored
(:data:`LATE_DEFAULTS`) are left out of the hash while they hold their default, so adding a
field does not orphan the store; ``config.json`` still lists every field.

Example::

    >>> run_id(RunConfig(lr=1, steps=10)) == run_id(RunConfig(lr=1.0, steps=10))
    True
    >>> RunConfig(lr=-1.0)
    Traceback (most recent call last):
    ...
    ValueError: lr=-1.0 is outside the valid range (0, inf)
"""

import dataclasses
import functools
import hashlib
import json
import math
import numbers
import re
import typing
from dataclasses import dataclass, field

import numpy as np
import torch

from experiments.runs.data import DATASETS, KINDS
from experiments.runs.models import MODELS, check_fit, check_model_args
from experiments.runs.optim import CLIPS, OPTIMIZERS, SCHEDULES

DTYPES = ("float32", "float64")
RESULT_FORMAT = 1


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run. ``data_args`` / ``model_args`` are keyword
    arguments for the dataset loader / model builder (stored as sorted tuples of pairs, so
    the config is hashable; ``to_dict`` gives dicts). ``batch_size=0`` means full batch.
    For "gd" the momentum is normalised to 0.0 (it is unused, and equal runs must have
    equal configs); for "adam" it is β₁. Schedule parameters: see
    :func:`experiments.runs.optim.lr_factors`. Clipping threshold ``clip_value`` is the max
    norm (global, layer) or the max |entry| (value). Line search: see
    :func:`experiments.runs.optim.line_search_step` (``line_search_evals`` evaluations over the
    multiplier bracket [0, ``line_search_max``]). ``eval_every`` > 0 adds test loss and
    accuracy every that many steps (coordinate ``eval_step``). ``dtype`` of the model and
    the float inputs: "float32" or "float64" (for tight theory checks, e.g. on linreg).
    Probe (every ``probe_every`` steps, :mod:`experiments.trace.probes`): ``probe_batch_size``
    examples drawn for it from the training set by its own generator (0: the step's training
    batch), ``hutchinson_samples`` vectors for the trace, ``noise_microbatches`` for the
    gradient noise and signal (0 off, else >= 2); ``probe_curvature`` adds the curvature along
    the gradient and the momentum buffer and the batch sharpness
    (:func:`experiments.trace.probes.microbatch_curvature`; needs >= 3 micro-batches).
    Checkpoints (:mod:`experiments.runs.checkpoint`): every ``checkpoint_every`` steps (0:
    none). ``fork_from = "RUN_ID@STEP"`` starts the run from run RUN_ID's checkpoint after
    STEP steps (same store root) with this config's lr, schedule, momentum, method, clipping
    (:data:`experiments.runs.checkpoint.FORKABLE`); its id hashes the whole config, the
    parent's id included. ``fork_data_seed`` (forks only; 0: the parent's data order) redraws
    the fork's mini-batch order from step STEP on with a generator seeded by it (a fresh epoch),
    everything else restored: a replicate of the fork that differs only in its data order.
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
    probe_curvature: bool = False
    eval_every: int = 0
    per_tensor: bool = False
    threads: int = 0
    dtype: str = "float32"
    checkpoint_every: int = 0
    fork_from: str = ""
    fork_data_seed: int = 0
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
        check_model_args(self.model, *KINDS[self.data], self.model_args)  # sizes >= 1, model builds
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
        if self.probe_curvature and self.noise_microbatches < 3:
            raise ValueError(f"noise_microbatches={self.noise_microbatches} is outside the valid range "
                             f"[3, inf) with probe_curvature=True")
        _int_range("eval_every", self.eval_every, 0)
        _int_range("threads", self.threads, 0)
        _int_range("seed", self.seed, 0)
        _int_range("checkpoint_every", self.checkpoint_every, 0)
        _int_range("fork_data_seed", self.fork_data_seed, 0)
        if self.fork_data_seed and not self.fork_from:
            raise ValueError(f"fork_data_seed={self.fork_data_seed} needs fork_from (valid: 0 without a fork)")
        if self.fork_from:
            parent, _, at = self.fork_from.partition("@")
            if not (re.fullmatch(r"[0-9a-f]{16}", parent) and at.isdigit() and 1 <= int(at) < self.steps):
                raise ValueError(f"fork_from={self.fork_from!r} is not RUN_ID@STEP (16 hex digits, "
                                 f"then a step in [1, steps={self.steps}))")
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


@functools.lru_cache(maxsize=None)
def _field_kinds(cls):
    """Fields annotated float, and fields of any type but str/int/bool/float (containers,
    unions): the only ones whose values canonicalisation may change."""
    floats, others = [], []
    for key, hint in typing.get_type_hints(cls).items():
        kinds = typing.get_args(hint) or (hint,)
        if float in kinds and int not in kinds:
            floats.append(key)
        elif not set(kinds) <= {str, int, bool, type(None)}:
            others.append(key)
    return tuple(floats), tuple(others)


def canonical_config(config) -> dict:
    """``config.to_dict()`` normalised so equal runs give equal JSON (see module docstring)."""
    floats, others = _field_kinds(type(config))
    out = config.to_dict()
    for key in floats:
        value = out[key]
        if isinstance(value, numbers.Real) and not isinstance(value, bool):  # stays a float
            value = float(value)
            out[key] = value + 0.0 if math.isfinite(value) else repr(value)  # -0.0 + 0.0 == 0.0
        elif value is not None:
            out[key] = canonical_value(value)
    for key in others:
        out[key] = canonical_value(out[key])
    for key, default in LATE_DEFAULTS.items():  # fields added later: absent at their default, so
        if key in out and out[key] == default:  # the ids of existing runs stay what they were
            del out[key]
    return out


LATE_DEFAULTS = {"probe_curvature": False, "checkpoint_every": 0, "fork_from": "", "fork_data_seed": 0}


def same_config(stored, config) -> bool:
    """Whether the config dict ``stored`` (a config.json, a checkpoint's) is ``config``, a field
    of :data:`LATE_DEFAULTS` absent from ``stored`` counting as its default (it was written
    before the field existed)."""
    return {**LATE_DEFAULTS, **stored} == {**LATE_DEFAULTS, **config.to_dict()}


def canonical_value(value):
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):  # equal numbers, equal forms: 2.0 -> 2, -0.0 -> 0 (exact)
        value = float(value)
        return repr(value) if not math.isfinite(value) else int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {str(k): canonical_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical_value(v) for v in value]
    raise TypeError(f"config value {value!r} of type {type(value).__name__} has no canonical JSON form")


def canonical_key(value) -> str:
    """Canonical JSON of one config value: equal values give equal keys (``[1, 2]`` and
    ``[1.0, 2.0]`` too: an integral float is written as the int it equals)."""
    return json.dumps(canonical_value(value), sort_keys=True)


def run_id(config) -> str:
    """16 hex digits of sha256 over the result format version and the canonical config."""
    text = json.dumps(canonical_config(config), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(f"optdyn-result-format-{RESULT_FORMAT}\n{text}".encode()).hexdigest()[:16]
