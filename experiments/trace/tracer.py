"""Per-layer training traces at every step, kept on the device (docs/design.md; docs/theory.md §5-6).

A :class:`Tracer` watches one model and one optimizer (any ``torch.optim`` optimizer).
Either attach it, one line before any training loop (:meth:`Tracer.attach`; hooks on the
optimizer's step and the gradients, :mod:`experiments.trace.hooks`), or make four calls
in the loop's step::

    if tracer.should_probe(): tracer.probe(loss_fn, batch)   # at θ_k, before the step
    loss = loss_fn(model, batch); loss.backward(); tracer.after_backward(loss)
    [clip; tracer.record_clip(global_factor=..., layer_factors=...)]
    optimizer.step(); tracer.after_step()

(``loss_fn(model, batch)`` -> mean loss); ``tracer.dataset()`` returns the trace as an
``xarray.Dataset``.

Layers. A parameter belongs to its owning module's qualified name (``features.0.weight`` ->
``features.0``; parameters of the root module -> ``"(root)"``). With ``per_tensor=True`` every
parameter tensor is its own "layer" (coordinate = parameter name). Parameters with
``requires_grad=False`` at construction are not traced; a traced parameter whose ``.grad`` is
``None`` at a step (unused this step) counts as a zero gradient.

Per step and layer l with elements i (g = raw gradient before clipping, θ = parameters
*after* the optimizer step, Δθ = θ_after − θ_before the update actually applied):

* ``grad_norm`` ‖g_l‖₂, ``param_norm`` ‖θ_l‖₂, ``update_norm`` ‖Δθ_l‖₂;
* ``update_ratio`` = log10(mean_i|Δθ_i| / mean_i|θ_i|), DL4J's update:parameter ratio with the
  means over all of the layer's elements (per tensor, exactly DL4J, with ``per_tensor=True``);
  −inf for a zero update;
* ``grad_abs_min/mean/max``: min, mean, max of |g_i| over the layer;
* ``grad_cos`` = ⟨g_l(t), g_l(t−1)⟩ / (‖g_l(t)‖ ‖g_l(t−1)‖), ``update_cos`` the same for Δθ;
  NaN at step 0 (and wherever a norm is 0);
* ``clip_factor``: what clipping multiplied the layer's gradient by (1 without clipping).

Per step: ``loss``, ``lr`` (``optimizer.param_groups[0]["lr"]`` when ``after_backward`` ran;
with several param groups also ``lr_layer`` (step, layer), the lr of the layer's group),
``grad_norm_global`` (the 2-norm of all raw gradients, as ``torch.nn.utils.get_total_norm``),
``grad_cos_global``, ``update_cos_global``, ``clip_factor_global``.

Cost. Per step the gradients and θ_before are copied once into flat buffers in which every
layer is one contiguous segment; the work is a fixed handful of calls plus a few per layer,
never a Python loop of small ops per element group. Three engines compute the same numbers,
each tested against float64 references: ``"fused"`` (the CPU default,
:mod:`experiments.trace.fused`: one compiled loop per phase that copies and reduces at once,
sums in float64), ``"numpy"`` (CPU, :mod:`experiments.trace.engines`: ``torch._foreach_copy_``
and ``_foreach_norm``, then numpy/BLAS on views of the buffers; its global norm is
bit-identical to ``get_total_norm``, the fused engine's is within float64 rounding of the
exact norm) and ``"torch"`` (other devices; results stay in a device block copied to the host
only when full or at :meth:`dataset` — no host synchronisation per step). This module is the
bookkeeping: layers, step phases, the lr, clip factors, probes and the Dataset.

The tracer times itself:
``attrs["tracer_seconds"]`` (CUDA events on a GPU, ``perf_counter`` on CPU; probes excluded)
and ``attrs["probe_seconds"]``. Measured cost: benchmarks/bench_trace.py (docs/findings/tracer_cost.md).
The trace's attrs also name the optimizer (:func:`optimizer_attrs`: ``optimizer``, ``opt``,
``momentum``, ``nesterov``, ``dampening``, ``weight_decay``, ``lr0``), which is what
``optdyn link`` needs of a trace saved from one's own loop.

Probes (every ``probe_every`` steps, run by the training loop through :meth:`probe`): per-layer
``sharpness`` (top eigenvalue of the layer's diagonal Hessian block), ``sharpness_global``,
``hessian_trace`` (Hutchinson), ``grad_signal`` (‖E g‖², unbiased) and ``grad_noise`` (tr Cov of the mini-batch gradient from
micro-batches); see :mod:`experiments.trace.probes` for the estimators and the treatment of
dropout and BatchNorm.
"""

import contextlib
import importlib.util
import math
import time

import numpy as np
import torch
import xarray as xr

from experiments.trace import probes
from experiments.trace.engines import (BACKWARD_STATS, STEP_STATS, GraphTorchEngine, NumpyEngine,
                                       TorchEngine, fused_supported)

ROOT_LAYER = "(root)"


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} is outside the valid range: integers >= {low}")
    return value


def layer_name(param_name, per_tensor=False):
    """The layer a parameter belongs to: its owning module's qualified name."""
    if per_tensor:
        return param_name
    owner, _, _ = param_name.rpartition(".")
    return owner or ROOT_LAYER


class _Stopwatch:
    """Accumulates elapsed time without synchronising a GPU: CUDA events are recorded and
    only read out at :meth:`seconds` (called at block flushes and ``dataset()``)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.host = 0.0
        self.device_seconds = 0.0
        self._pending = []
        self._t0 = None

    def start(self):
        self._t0 = time.perf_counter()
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._pending.append([ev, None])

    def stop(self):
        self.host += time.perf_counter() - self._t0
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._pending[-1][1] = ev

    def collect(self):
        """Read completed CUDA intervals (synchronises: call only where a sync happens
        anyway, e.g. at a block flush); an interval still open stays pending."""
        done = [pair for pair in self._pending if pair[1] is not None]
        self._pending = [pair for pair in self._pending if pair[1] is None]
        for start, end in done:
            end.synchronize()
            self.device_seconds += start.elapsed_time(end) / 1e3

    def seconds(self):
        self.collect()
        return self.device_seconds if self.cuda else self.host


class Tracer:
    """Per-layer trace of a training run; see the module docstring for the quantities.

    Parameters
    ----------
    model, optimizer : the ``nn.Module`` and any ``torch.optim.Optimizer`` stepping it.
    per_tensor : one "layer" per parameter tensor instead of per owning module.
    probe_every : the training loop calls :meth:`probe` when :meth:`should_probe` (0: never).
    block_size : steps per block (device → host copy once per block).
    sharpness_iters : Lanczos steps per block and probe at most (warm-started).
    sharpness_tol : a block's Lanczos stops early once its Ritz residual is below
        ``sharpness_tol``·|λ| (0: always the full budget).
    hutchinson_samples : Rademacher vectors per probe for the trace estimate.
    noise_microbatches : micro-batches M for the gradient-noise estimate (>= 2; 0 disables).
    probe_mode : "train" (the model's training-mode loss; default) or "eval".
    seed : seed of the probes' own random generator (Lanczos starts, Rademacher vectors).
    probe_curvature : also probe the curvature along the gradient and along the momentum
        buffer, and the batch sharpness (:func:`experiments.trace.probes.microbatch_curvature`).
    engine : "auto" (fused for contiguous float32/float64 CPU parameters of one dtype, numpy
        for other float32/float64 CPU parameters or without numba, else torch), "fused",
        "numpy", "torch" or "torch-graph" (the torch engine's kernels replayed from CUDA graphs:
        :class:`~experiments.trace.engines.GraphTorchEngine`; opt-in).

    Examples
    --------
    One line before an unchanged loop (here with clipping and Nesterov momentum); the probe
    runs every ``probe_every`` steps before the step, on ``probe_batch``:

    >>> import torch
    >>> from torch import nn
    >>> from experiments import Tracer
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    >>> x, y = torch.randn(256, 4), torch.randn(256, 1)
    >>> def loss_fn(model, batch):
    ...     return nn.functional.mse_loss(model(batch[0]), batch[1])
    >>> tracer = Tracer(model, opt, probe_every=10).attach(loss_fn=loss_fn, probe_batch=(x, y))
    >>> for step in range(30):
    ...     batch = x[step % 8 * 32:][:32], y[step % 8 * 32:][:32]
    ...     opt.zero_grad()
    ...     loss = loss_fn(model, batch)
    ...     loss.backward()
    ...     tracer.record_loss(loss)  # optional: else the trace's loss is NaN
    ...     _ = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    ...     opt.step()
    >>> ds = tracer.detach().dataset()
    >>> dict(ds.sizes), ds.probe_step.values.tolist(), ds.layer.values.tolist()
    ({'step': 30, 'layer': 2, 'probe_step': 3}, [0, 10, 20], ['0', '2'])
    >>> ds.attrs["opt"], ds.attrs["momentum"], bool((ds.clip_factor_global <= 1).all())
    ('nag', 0.9, True)

    The same with the four manual calls (the probe first: at θ_k, before step k):

    >>> tracer = Tracer(model, opt, probe_every=10)
    >>> for step in range(30):
    ...     batch = x[step % 8 * 32:][:32], y[step % 8 * 32:][:32]
    ...     if tracer.should_probe():
    ...         _ = tracer.probe(loss_fn, (x, y))
    ...     opt.zero_grad()
    ...     loss = loss_fn(model, batch)
    ...     loss.backward()
    ...     tracer.after_backward(loss)
    ...     norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    ...     tracer.record_clip(global_factor=min(1.0, 1.0 / (float(norm) + 1e-6)))
    ...     opt.step()
    ...     tracer.after_step()
    >>> tracer.dataset().probe_step.values.tolist()
    [0, 10, 20]
    """

    def __init__(self, model, optimizer, *, per_tensor=False, probe_every=0, block_size=256,
                 sharpness_iters=20, sharpness_tol=1e-3, hutchinson_samples=1,
                 noise_microbatches=4,
                 probe_mode="train", seed=0, engine="auto", probe_curvature=False):
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model={type(model).__name__} is not a torch.nn.Module")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer={optimizer!r} is not a torch.optim.Optimizer; valid: the optimizer "
                             "stepping the model's parameters")
        self.model, self.optimizer = model, optimizer
        self.per_tensor = bool(per_tensor)
        self.probe_every = _check_int("probe_every", probe_every, 0)
        self.block_size = _check_int("block_size", block_size, 1)
        self.sharpness_iters = _check_int("sharpness_iters", sharpness_iters, 0)
        if not (isinstance(sharpness_tol, (int, float)) and 0 <= sharpness_tol < 1):
            raise ValueError(f"sharpness_tol={sharpness_tol!r} is outside the valid range [0, 1)")
        self.sharpness_tol = float(sharpness_tol)
        self.hutchinson_samples = _check_int("hutchinson_samples", hutchinson_samples, 0)
        self.noise_microbatches = _check_int("noise_microbatches", noise_microbatches, 0)
        if self.noise_microbatches == 1:
            raise ValueError("noise_microbatches=1 is outside the valid range: 0 (off) or >= 2")
        if probe_mode not in ("train", "eval"):
            raise ValueError(f"probe_mode={probe_mode!r} is unknown; valid: train, eval")
        self.probe_mode = probe_mode
        self.probe_curvature = bool(probe_curvature)
        self.seed = seed

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no parameters with requires_grad=True to trace")
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self._no_grad = torch.no_grad()  # one reusable context (saves its construction)
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(f"parameters on several devices {sorted(map(str, devices))}; "
                             "the tracer needs them on one device")
        self.device = self.params[0].device
        dtypes = {p.dtype for p in self.params}
        self.dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        numpy_ok = self.device.type == "cpu" and self.dtype in (torch.float32, torch.float64)
        fused_ok = (numpy_ok and fused_supported(self.params)
                    and importlib.util.find_spec("numba") is not None)
        if (engine not in ("auto", "fused", "numpy", "torch", "torch-graph") or (engine == "numpy" and not numpy_ok)
                or (engine == "fused" and not fused_ok)):
            raise ValueError(f"engine={engine!r} is not valid here; valid: auto, torch, torch-graph"
                             + (", numpy" if numpy_ok else " (numpy needs float32/float64 "
                                                          "parameters on the CPU)")
                             + (", fused" if fused_ok else " (fused needs numba and contiguous "
                                                          "float32/float64 CPU parameters of one dtype)"))
        auto = "fused" if fused_ok else ("numpy" if numpy_ok else "torch")
        self.engine = auto if engine == "auto" else engine

        self.layers = []
        tensor_layer = []
        for n in self.param_names:
            layer = layer_name(n, self.per_tensor)
            if layer not in self.layers:
                self.layers.append(layer)
            tensor_layer.append(self.layers.index(layer))
        self.tensor_layer = np.asarray(tensor_layer)
        # the buffers and kernels (experiments.trace.engines); create the Tracer after moving
        # the model: the engine aliases the parameters' storage
        if self.engine == "fused":
            from experiments.trace.fused import FusedEngine as engine_cls  # imports numba
        else:
            engine_cls = {"numpy": NumpyEngine, "torch": TorchEngine, "torch-graph": GraphTorchEngine}[self.engine]
        self._engine = engine_cls(self.params, self.tensor_layer, self.block_size)
        if self.engine == "fused":  # no torch op per step: skip the grad-mode switch
            self._no_grad = contextlib.nullcontext()
        self.layer_sizes = self._engine.layer_sizes
        group_of = {id(p): k for k, g in enumerate(optimizer.param_groups) for p in g["params"]}
        first = [self.tensor_layer.tolist().index(l) for l in range(len(self.layers))]
        self.layer_group = np.array([group_of.get(id(self.params[i]), -1) for i in first])
        self._lrs, self._group_lrs = [], []
        self._hooks = None  # experiments.trace.hooks.Hooks while attached
        self._row = 0
        self.step = 0
        self._phase = "idle"  # idle -> backward (after_backward) -> idle (after_step)
        self._host_rows, self._host_clip = [], []

        self._watch = _Stopwatch(self.device)
        self.probe_seconds = 0.0
        self._probe_steps, self._probe_rows = [], []
        self._probe_state = probes.ProbeState(seed)

    def layer_parameters(self):
        """{layer: [parameters]} in trace order (for per-layer clipping consistent with it)."""
        out = {layer: [] for layer in self.layers}
        for p, li in zip(self.params, self.tensor_layer):
            out[self.layers[li]].append(p)
        return out

    # ---------------------------------------------------------------- hooked
    def attach(self, *, loss_fn=None, probe_batch=None, scaler=None):
        """Hook the tracer into the optimizer's step; returns ``self`` (see
        :mod:`experiments.trace.hooks`). The training loop stays as it is.

        ``loss_fn(model, batch)`` and ``probe_batch`` (a batch, a callable returning one, or
        an iterable of batches, cycled): the probe runs every ``probe_every`` steps before
        the step, at θ_k. ``scaler``: the ``torch.amp.GradScaler`` of the loop, if any (the
        raw gradient is taken after its ``unscale_``; steps it skips are not recorded)."""
        from experiments.trace.hooks import Hooks

        if self._hooks is not None:
            raise RuntimeError("the tracer is attached already")
        if self._phase != "idle":
            raise RuntimeError("attach between steps (after_step was not called)")
        self._hooks = Hooks(self, loss_fn=loss_fn, probe_batch=probe_batch, scaler=scaler)
        return self

    def detach(self):
        """Remove every hook :meth:`attach` added (the model, optimizer and scaler are as
        before); the trace so far stays. Returns ``self``."""
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()

    def record_loss(self, loss):
        """The step's loss for an attached tracer (summed over the calls before the step)."""
        if self._hooks is None:
            raise RuntimeError("record_loss is for an attached tracer; pass the loss to "
                               "after_backward otherwise")
        self._hooks.record_loss(loss)

    # ---------------------------------------------------------------- per step
    def after_backward(self, loss=None):
        """Record the raw gradients (call after ``loss.backward()``, before clipping/step).

        Leaves this step's global gradient norm in ``self.grad_norm_global`` (a 0-d tensor
        on the device; a float with the fused engine) for the training loop's divergence
        check and progress bar."""
        if self._hooks is not None:
            raise RuntimeError("the tracer is attached: its hooks record the steps "
                               "(call detach() before the manual calls)")
        if self._phase != "idle":
            raise RuntimeError("after_backward called twice without after_step")
        self._watch.start()
        with self._no_grad:
            self._capture_raw()
            self._backward_stats_raw(loss)
        self._watch.stop()

    def _capture(self):
        """Copy the gradients and θ into the step's buffers (may repeat before a step)."""
        self._watch.start()
        with self._no_grad:
            self._capture_raw()
        self._watch.stop()

    def _capture_raw(self):
        self._captured = self._engine.capture_gradients(self.step % 2)
        self.grad_norm_global = self._captured[1]  # 0-d, on the device: read it without a sync

    def _backward_stats(self, loss):
        """The gradient statistics of the captured gradients, and the lrs in force."""
        self._watch.start()
        with self._no_grad:
            self._backward_stats_raw(loss)
        self._watch.stop()

    def _backward_stats_raw(self, loss):
        norms, g_global = self._captured
        self._engine.backward_stats(self._row, self.step % 2, norms, g_global, loss)
        groups = self.optimizer.param_groups
        lrs = [g.get("lr", math.nan) for g in groups] if len(groups) > 1 else [groups[0].get("lr", math.nan)]
        lrs = [lr.detach().clone() if torch.is_tensor(lr) else float(lr) for lr in lrs]
        if self._phase == "backward":  # again before a step (the last one raised): replace
            self._lrs.pop(), self._group_lrs.pop()
        self._lrs.append(lrs[0])
        self._group_lrs.append(lrs)
        self._phase = "backward"

    def record_clip(self, global_factor=None, layer_factors=None):
        """Record clipping factors of the current step (between after_backward and step).

        ``global_factor``: float or 0-d tensor. ``layer_factors``: {layer: factor}, or a
        sequence / 1-d tensor in ``self.layers`` order. Unrecorded factors stay 1."""
        if self._phase != "backward":
            raise RuntimeError("record_clip must come between after_backward and after_step")
        self._watch.start()
        row, L = self._row, len(self.layers)
        if layer_factors is None:
            factors = {}
        elif isinstance(layer_factors, dict):
            unknown = set(layer_factors) - set(self.layers)
            if unknown:
                raise ValueError(f"layer_factors has unknown layers {sorted(unknown)}; "
                                 f"valid: {self.layers}")
            factors = {self.layers.index(k): f for k, f in layer_factors.items()}
        else:
            seq = list(layer_factors)
            if len(seq) != L:
                raise ValueError(f"layer_factors has length {len(seq)}; valid: {L}, one per "
                                 f"layer in Tracer.layers order")
            factors = dict(enumerate(seq))
        if global_factor is not None:
            factors[L] = global_factor
        with self._no_grad:
            for col, f in factors.items():
                self._engine.set_clip(row, col, f)
        self._watch.stop()

    def after_step(self):
        """Record the applied update Δθ and θ (call right after ``optimizer.step()``)."""
        if self._hooks is not None:
            raise RuntimeError("the tracer is attached: its hooks record the steps "
                               "(call detach() before the manual calls)")
        self._after_step()

    def _after_step(self):
        if self._phase != "backward":
            raise RuntimeError("after_step called without after_backward")
        self._watch.start()
        with self._no_grad:
            self._engine.step_stats(self._row, self.step % 2, (self.step + 1) % 2)
        self._row += 1
        self.step += 1
        self._phase = "idle"
        if self._row == self.block_size:
            self._flush()
        self._watch.stop()

    def _flush(self):
        rows = self._row
        if rows == 0:
            return
        block, clip = self._engine.flush(rows)
        self._host_rows.append(block)
        self._host_clip.append(clip)
        if self.engine in ("torch", "torch-graph"):
            self._watch.collect()  # the copy has synchronised anyway
        self._row = 0

    # ---------------------------------------------------------------- probes
    def should_probe(self):
        """True when the training loop should call :meth:`probe` now (every probe_every steps)."""
        return self.probe_every > 0 and self.step % self.probe_every == 0

    def probe(self, loss_fn, batch, noise_batch_size=None):
        """Sharpness, Hutchinson trace and gradient noise per layer at the current parameters.

        Labelled ``probe_step = self.step`` (number of optimizer steps done, i.e. the step
        whose gradient is taken at these parameters). ``loss_fn(model, batch)`` returns the
        scalar mean loss; ``batch`` is a tensor or a (nested) tuple/list/dict of tensors with
        the examples along dim 0. Parameter ``.grad``, the RNG streams and module buffers
        (BatchNorm running statistics) are left as they were. Synchronises once.
        ``noise_batch_size``: report ``grad_noise`` for a mean over that many examples (the
        training batch size when ``batch`` is a larger probe batch); default: ``batch``'s size.
        """
        t0 = time.perf_counter()
        blocks = [[i for i, li in enumerate(self.tensor_layer) if li == l]
                  for l in range(len(self.layers))]
        res = probes.probe(self.model, self.params, blocks, loss_fn, batch,
                              state=self._probe_state, iters=self.sharpness_iters,
                              tol=self.sharpness_tol,
                              hutchinson_samples=self.hutchinson_samples,
                              microbatches=self.noise_microbatches, mode=self.probe_mode,
                              noise_batch_size=noise_batch_size, curvature=self.probe_curvature,
                              buffer=self._momentum_buffer() if self.probe_curvature else None)
        self._probe_steps.append(self.step)
        self._probe_rows.append(res)
        self.probe_seconds += time.perf_counter() - t0
        return res

    @property
    def global_top_vector(self):
        """The network's unit top Ritz vector from the last probe (flat, over :attr:`params`
        in order), or None before the first probe."""
        return self._probe_state.vectors.get(("global",))

    def _momentum_buffer(self):
        """The optimizer's momentum buffers (PyTorch SGD's ``momentum_buffer``: b_{t-1} before
        step t) flat in parameter order, zeros where there is none yet; None without any."""
        bufs = [self.optimizer.state.get(p, {}).get("momentum_buffer") for p in self.params]
        if all(b is None for b in bufs):
            return None
        return torch.cat([(torch.zeros_like(p) if b is None else b.detach()).reshape(-1)
                          for p, b in zip(self.params, bufs)])

    # ---------------------------------------------------------------- output
    def dataset(self):
        """The trace so far as an ``xarray.Dataset`` (schema in the module docstring)."""
        self._flush()
        n, L, w_back = len(self.params), len(self.layers), self._engine.w_back
        width = self._engine.width
        R = np.concatenate(self._host_rows) if self._host_rows else np.zeros((0, width))
        C = np.concatenate(self._host_clip) if self._host_clip else np.zeros((0, L + 1))
        steps = len(R)
        col = dict(zip(BACKWARD_STATS, range(n, n + L * len(BACKWARD_STATS), L)))
        col.update(zip(STEP_STATS, range(w_back, width, L)))
        get = lambda k: R[:, col[k]:col[k] + L]  # noqa: E731
        loss, g_global = R[:, w_back - 2], R[:, w_back - 1]
        lr = np.array([float(x) for x in self._lrs[:steps]], dtype=float)
        def layer_sum(x):  # (steps, n) per-tensor values -> (steps, L) per-layer sums
            out = np.zeros((steps, L))
            np.add.at(out.T, self.tensor_layer, x.T)
            return out

        g_sq = layer_sum(R[:, :n] ** 2)
        sizes = self.layer_sizes.astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            grad_norm, update_norm = np.sqrt(g_sq), np.sqrt(get("d_sq"))
            ratio = np.log10(get("d_abs") / get("p_abs"))
            u_global = np.sqrt((update_norm ** 2).sum(axis=1))
            grad_cos = _successive_cos(get("g_dot"), grad_norm)
            update_cos = _successive_cos(get("d_dot"), update_norm)
            grad_cos_global = _successive_cos(get("g_dot").sum(axis=1), g_global)
            update_cos_global = _successive_cos(get("d_dot").sum(axis=1), u_global)
        sl = ("step", "layer")
        ds = xr.Dataset(
            {
                "grad_norm": (sl, grad_norm),
                "param_norm": (sl, np.sqrt(get("p_sq"))),
                "update_norm": (sl, update_norm),
                "update_ratio": (sl, ratio),
                "grad_abs_min": (sl, get("g_min")),
                "grad_abs_mean": (sl, get("g_abs") / sizes),
                "grad_abs_max": (sl, get("g_max")),
                "grad_cos": (sl, grad_cos),
                "update_cos": (sl, update_cos),
                "clip_factor": (sl, C[:, :L]),
                "loss": ("step", loss),
                "lr": ("step", lr),
                "grad_norm_global": ("step", g_global),
                "grad_cos_global": ("step", grad_cos_global),
                "update_cos_global": ("step", update_cos_global),
                "clip_factor_global": ("step", C[:, L]),
                "n_params": ("layer", self.layer_sizes),
            },
            coords={"step": np.arange(steps), "layer": list(self.layers)},
        )
        if len(self.optimizer.param_groups) > 1:
            G = len(self.optimizer.param_groups)  # groups added later: NaN before they exist
            group_lrs = np.array([[float(x) for x in lrs] + [np.nan] * (G - len(lrs))
                                  for lrs in self._group_lrs[:steps]], dtype=float).reshape(steps, G)
            group_lrs = np.concatenate([group_lrs, np.full((steps, 1), np.nan)], axis=1)
            ds["lr_layer"] = (sl, group_lrs[:, self.layer_group])  # group -1 (not stepped): NaN
        ds = ds.merge(self._probe_dataset())
        ds.attrs.update(optimizer_attrs(self.optimizer, lr[0] if steps else None))
        ds.attrs.update(
            tracer_seconds=self._watch.seconds(), tracer_host_seconds=self._watch.host,
            probe_seconds=self.probe_seconds, per_tensor=int(self.per_tensor),
            block_size=self.block_size, probe_every=self.probe_every,
            sharpness_iters=self.sharpness_iters, sharpness_tol=self.sharpness_tol,
            hutchinson_samples=self.hutchinson_samples,
            noise_microbatches=self.noise_microbatches, probe_mode=self.probe_mode,
            probe_curvature=int(self.probe_curvature),
            update_ratio_definition="log10(mean|theta_after - theta_before| / mean|theta_after|)",
        )
        return ds

    def _probe_dataset(self):
        L, P = len(self.layers), len(self._probe_steps)
        get = lambda key: (np.array([getattr(r, key) for r in self._probe_rows], dtype=float)  # noqa: E731
                           if P else np.zeros((0, L)))
        pl = ("probe_step", "layer")
        return xr.Dataset(
            {
                "sharpness": (pl, get("sharpness").reshape(P, L)),
                "hessian_trace": (pl, get("hessian_trace").reshape(P, L)),
                "grad_noise": (pl, get("grad_noise").reshape(P, L)),
                "grad_signal": (pl, get("grad_signal").reshape(P, L)),
                "grad_signal_top": (pl, get("grad_signal_top").reshape(P, L)),
                "sharpness_global": ("probe_step", get("sharpness_global").reshape(P)),
                "sharpness_steps": (pl, get("sharpness_steps").reshape(P, L)),
                "sharpness_global_steps": ("probe_step",
                                           get("sharpness_global_steps").reshape(P)),
                **({k: (pl, get(k).reshape(P, L)) for k in probes.CURVATURE_KEYS}
                   if self.probe_curvature else {}),
                **({"batch_sharpness_global": ("probe_step", get("batch_sharpness_global").reshape(P))}
                   if self.probe_curvature else {}),
            },
            coords={"probe_step": np.asarray(self._probe_steps, dtype=np.int64),
                    "layer": list(self.layers)},
        )


def optimizer_attrs(optimizer, lr0=None):
    """What the link needs of the optimizer, for the trace's attrs: ``optimizer`` (class name),
    ``opt`` (the RunConfig name: gd/hb/nag for SGD without dampening, adam; "" otherwise),
    ``momentum`` (SGD's momentum; Adam's beta1, as in RunConfig), ``nesterov``, ``dampening``,
    ``weight_decay`` of the first param group, and ``lr0`` (the first step's lr; the lr of
    every step is the ``lr`` variable)."""
    g = optimizer.param_groups[0]
    m = float(g.get("momentum", g.get("betas", (0.0,))[0]))
    nesterov, dampening = bool(g.get("nesterov", False)), float(g.get("dampening", 0.0))
    if type(optimizer) is torch.optim.SGD:
        opt = "" if dampening else ("gd" if m == 0 else ("nag" if nesterov else "hb"))
    else:
        opt = "adam" if type(optimizer) is torch.optim.Adam else ""
    lr = g.get("lr", math.nan) if lr0 is None else lr0
    return dict(optimizer=type(optimizer).__name__, opt=opt, momentum=m, nesterov=int(nesterov),
                dampening=dampening, weight_decay=float(g.get("weight_decay", 0.0)), lr0=float(lr))


def _successive_cos(dots, norms):
    """cos(x_t, x_{t−1}) = dot_t / (‖x_t‖ ‖x_{t−1}‖) along axis 0; NaN at t = 0."""
    out = np.full(np.shape(dots), np.nan)
    if len(out) > 1:
        out[1:] = dots[1:] / (norms[1:] * norms[:-1])
    return out
