"""Per-layer training traces at every step, kept on the device (DESIGN.md; THEORY.md §5-6).

A :class:`Tracer` watches one model and one optimizer (any ``torch.optim`` optimizer). In a
training step::

    loss.backward(); tracer.after_backward(loss)
    [clip; tracer.record_clip(global_factor=..., layer_factors=...)]
    optimizer.step(); tracer.after_step()
    if tracer.should_probe(): tracer.probe(loss_fn, batch)   # loss_fn(model, batch) -> mean loss

and ``tracer.dataset()`` returns the trace as an ``xarray.Dataset``.

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

Per step: ``loss``, ``lr`` (``optimizer.param_groups[0]["lr"]`` when ``after_backward`` ran),
``grad_norm_global`` (computed exactly as ``torch.nn.utils.get_total_norm``),
``grad_cos_global``, ``update_cos_global``, ``clip_factor_global``.

Cost. Each step issues a fixed handful of ``torch._foreach_*`` calls over the parameter list
(norms of order 2, 1, ∞, −∞), two flat copies and one dot product per tensor; the results are
written into a preallocated device block of ``block_size`` steps, which is copied to the host
only when full or at :meth:`dataset` — no host synchronisation per step. Previous gradient and
previous update are kept as flat buffers (double-buffered: the θ snapshot becomes −Δθ in place,
so no extra copy). The tracer times itself: ``attrs["tracer_seconds"]`` (CUDA events on a GPU,
``perf_counter`` on CPU; probes excluded) and ``attrs["probe_seconds"]``.

Probes (every ``probe_every`` steps, run by the training loop through :meth:`probe`): per-layer
``sharpness`` (top eigenvalue of the layer's diagonal Hessian block), ``sharpness_global``,
``hessian_trace`` (Hutchinson) and ``grad_noise`` (tr Cov of the mini-batch gradient from
micro-batches); see :mod:`experiments.sharpness` for the estimators and the treatment of
dropout and BatchNorm.
"""

import math
import time

import numpy as np
import torch
import xarray as xr

from experiments import sharpness

ROOT_LAYER = "(root)"
# per-tensor statistics kept per step: rows of the device block
_G_NORM, _G_ABS, _G_MAX, _G_MIN, _G_DOT, _D_NORM, _D_ABS, _D_DOT, _P_NORM, _P_ABS = range(10)
_N_TENSOR_STATS = 10
_LOSS, _LR, _G_GLOBAL, _CLIP_GLOBAL = range(4)
_N_STEP_STATS = 4


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
        """Read finished CUDA intervals (synchronises: call only where a sync happens anyway)."""
        for start, end in self._pending:
            end.synchronize()
            self.device_seconds += start.elapsed_time(end) / 1e3
        self._pending.clear()

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
    block_size : steps per device block (host copy once per block).
    sharpness_iters : Lanczos iterations per probe (fixed budget, warm-started).
    hutchinson_samples : Rademacher vectors per probe for the trace estimate.
    noise_microbatches : micro-batches M for the gradient-noise estimate (>= 2; 0 disables).
    probe_mode : "train" (the model's training-mode loss; default) or "eval".
    seed : seed of the probes' own random generator (Lanczos starts, Rademacher vectors).
    """

    def __init__(self, model, optimizer, *, per_tensor=False, probe_every=0, block_size=256,
                 sharpness_iters=20, hutchinson_samples=1, noise_microbatches=4,
                 probe_mode="train", seed=0):
        self.model, self.optimizer = model, optimizer
        self.per_tensor = bool(per_tensor)
        self.probe_every = _check_int("probe_every", probe_every, 0)
        self.block_size = _check_int("block_size", block_size, 1)
        self.sharpness_iters = _check_int("sharpness_iters", sharpness_iters, 0)
        self.hutchinson_samples = _check_int("hutchinson_samples", hutchinson_samples, 0)
        self.noise_microbatches = _check_int("noise_microbatches", noise_microbatches, 0)
        if self.noise_microbatches == 1:
            raise ValueError("noise_microbatches=1 is outside the valid range: 0 (off) or >= 2")
        if probe_mode not in ("train", "eval"):
            raise ValueError(f"probe_mode={probe_mode!r} is unknown; valid: train, eval")
        self.probe_mode = probe_mode
        self.seed = seed

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no parameters with requires_grad=True to trace")
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(f"parameters on several devices {sorted(map(str, devices))}; "
                             "the tracer needs them on one device")
        self.device = self.params[0].device
        dtypes = {p.dtype for p in self.params}
        self.dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        self.stat_dtype = torch.promote_types(self.dtype, torch.float32)

        self.layers = []
        tensor_layer = []
        for n in self.param_names:
            layer = layer_name(n, self.per_tensor)
            if layer not in self.layers:
                self.layers.append(layer)
            tensor_layer.append(self.layers.index(layer))
        self.tensor_layer = np.asarray(tensor_layer)
        self.sizes = [p.numel() for p in self.params]
        self.layer_sizes = np.bincount(self.tensor_layer, weights=self.sizes,
                                       minlength=len(self.layers)).astype(np.int64)
        n, L = len(self.params), len(self.layers)

        # flat double buffers: gradients g(t), g(t-1); θ snapshots that become −Δθ in place
        total = sum(self.sizes)
        self._gflat = [torch.zeros(total, dtype=self.dtype, device=self.device) for _ in range(2)]
        self._dflat = [torch.zeros(total, dtype=self.dtype, device=self.device) for _ in range(2)]
        offsets = np.concatenate([[0], np.cumsum(self.sizes)]).tolist()
        narrow = lambda f: [f.narrow(0, o, s) for o, s in zip(offsets, self.sizes)]  # noqa: E731
        self._gview1 = [narrow(f) for f in self._gflat]
        self._dview1 = [narrow(f) for f in self._dflat]
        shaped = lambda views: [v.view(p.shape) for v, p in zip(views, self.params)]  # noqa: E731
        self._gview = [shaped(v) for v in self._gview1]
        self._dview = [shaped(v) for v in self._dview1]
        if self.device.type != "cpu":  # segment sums by one scatter instead of n small dots
            self._elem_tensor = torch.repeat_interleave(
                torch.arange(n, device=self.device),
                torch.tensor(self.sizes, device=self.device))

        opts = dict(dtype=self.stat_dtype, device=self.device)
        self._tblock = torch.zeros(self.block_size, _N_TENSOR_STATS, n, **opts)
        self._sblock = torch.zeros(self.block_size, _N_STEP_STATS, **opts)
        self._cblock = torch.ones(self.block_size, L, **opts)
        self._sblock[:, _CLIP_GLOBAL] = 1.0  # no clipping unless recorded
        self._row = 0
        self.step = 0
        self._phase = "idle"  # idle -> backward (after_backward) -> idle (after_step)
        self._host_tensor, self._host_step, self._host_clip = [], [], []

        self._watch = _Stopwatch(self.device)
        self.probe_seconds = 0.0
        self._probe_steps, self._probe_rows = [], []
        self._probe_state = sharpness.ProbeState(seed)

    # ---------------------------------------------------------------- per step
    def layer_parameters(self):
        """{layer: [parameters]} in trace order (for per-layer clipping consistent with it)."""
        out = {layer: [] for layer in self.layers}
        for p, li in zip(self.params, self.tensor_layer):
            out[self.layers[li]].append(p)
        return out

    def _segment_dots(self, a, b, a_views, b_views):
        if self.device.type == "cpu":
            return torch.stack([torch.dot(x, y) for x, y in zip(a_views, b_views)])
        out = torch.zeros(len(self.params), dtype=a.dtype, device=a.device)
        return out.index_add_(0, self._elem_tensor, a * b)

    @torch.no_grad()
    def after_backward(self, loss=None):
        """Record the raw gradients (call after ``loss.backward()``, before clipping/step)."""
        if self._phase != "idle":
            raise RuntimeError("after_backward called twice without after_step")
        self._watch.start()
        cur, prev = self.step % 2, (self.step + 1) % 2
        gviews = self._gview[cur]
        grads, views, present = [], [], []
        for i, (p, v) in enumerate(zip(self.params, gviews)):
            if p.grad is None:
                v.zero_()
            else:
                grads.append(p.grad)
                views.append(v)
                present.append(i)
        if grads:
            torch._foreach_copy_(views, grads)
        row = self._row
        norms = torch._foreach_norm(gviews, 2)
        stats = (norms + torch._foreach_norm(gviews, 1) + torch._foreach_norm(gviews, math.inf)
                 + torch._foreach_norm(gviews, -math.inf))
        dots = self._segment_dots(self._gflat[cur], self._gflat[prev],
                                  self._gview1[cur], self._gview1[prev])
        n = len(self.params)
        self._tblock[row, _G_NORM:_G_MIN + 1].copy_(torch.stack(stats).view(4, n))
        self._tblock[row, _G_DOT].copy_(dots)
        # global norm exactly as torch.nn.utils.get_total_norm: norm of the per-tensor norms
        # (over the tensors that have a gradient, as torch does: bit-identical)
        present_norms = norms if len(present) == len(norms) else [norms[i] for i in present]
        self._sblock[row, _G_GLOBAL].copy_(
            torch.linalg.vector_norm(torch.stack(present_norms), 2) if present_norms else 0.0)
        self._sblock[row, _LOSS].copy_(loss.detach() if torch.is_tensor(loss)
                                       else torch.tensor(math.nan if loss is None else loss))
        lr = self.optimizer.param_groups[0].get("lr", math.nan)
        self._sblock[row, _LR].copy_(lr.detach() if torch.is_tensor(lr) else torch.tensor(lr))
        torch._foreach_copy_(self._dview[cur], self.params)  # θ_before
        self._phase = "backward"
        self._watch.stop()

    @torch.no_grad()
    def record_clip(self, global_factor=None, layer_factors=None):
        """Record clipping factors of the current step (between after_backward and step).

        ``global_factor``: float or 0-d tensor. ``layer_factors``: {layer: factor}, or a
        sequence / 1-d tensor in ``self.layers`` order. Unrecorded factors stay 1."""
        if self._phase != "backward":
            raise RuntimeError("record_clip must come between after_backward and after_step")
        self._watch.start()
        row = self._row
        if global_factor is not None:
            self._sblock[row, _CLIP_GLOBAL].copy_(torch.as_tensor(global_factor))
        if layer_factors is not None:
            if isinstance(layer_factors, dict):
                unknown = set(layer_factors) - set(self.layers)
                if unknown:
                    raise ValueError(f"layer_factors has unknown layers {sorted(unknown)}; "
                                     f"valid: {self.layers}")
                for name, f in layer_factors.items():
                    self._cblock[row, self.layers.index(name)].copy_(torch.as_tensor(f))
            else:
                if torch.is_tensor(layer_factors):
                    vals = layer_factors
                elif any(torch.is_tensor(f) for f in layer_factors):
                    vals = torch.stack([torch.as_tensor(f, device=self.device)
                                        for f in layer_factors])
                else:
                    vals = torch.tensor(list(layer_factors))
                if vals.shape != (len(self.layers),):
                    raise ValueError(f"layer_factors has shape {tuple(vals.shape)}; valid: "
                                     f"({len(self.layers)},), one per layer")
                self._cblock[row].copy_(vals)
        self._watch.stop()

    @torch.no_grad()
    def after_step(self):
        """Record the applied update Δθ and θ (call right after ``optimizer.step()``)."""
        if self._phase != "backward":
            raise RuntimeError("after_step called without after_backward")
        self._watch.start()
        cur, prev = self.step % 2, (self.step + 1) % 2
        dviews = self._dview[cur]
        torch._foreach_sub_(dviews, self.params)  # θ_before − θ_after = −Δθ (sign irrelevant)
        stats = (torch._foreach_norm(dviews, 2) + torch._foreach_norm(dviews, 1)
                 + torch._foreach_norm(self.params, 2) + torch._foreach_norm(self.params, 1))
        dots = self._segment_dots(self._dflat[cur], self._dflat[prev],
                                  self._dview1[cur], self._dview1[prev])
        n, row = len(self.params), self._row
        st = torch.stack(stats).view(4, n)
        self._tblock[row, _D_NORM].copy_(st[0])
        self._tblock[row, _D_ABS].copy_(st[1])
        self._tblock[row, _P_NORM].copy_(st[2])
        self._tblock[row, _P_ABS].copy_(st[3])
        self._tblock[row, _D_DOT].copy_(dots)
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
        host = lambda t: t[:rows].to("cpu", torch.float64, copy=True).numpy()  # noqa: E731
        self._host_tensor.append(host(self._tblock))
        self._host_step.append(host(self._sblock))
        self._host_clip.append(host(self._cblock))
        self._sblock[:, _CLIP_GLOBAL].fill_(1.0)
        self._cblock.fill_(1.0)
        self._row = 0

    # ---------------------------------------------------------------- probes
    def should_probe(self):
        """True when the training loop should call :meth:`probe` now (every probe_every steps)."""
        return self.probe_every > 0 and self.step % self.probe_every == 0

    def probe(self, loss_fn, batch):
        """Sharpness, Hutchinson trace and gradient noise per layer at the current parameters.

        Labelled ``probe_step = self.step`` (number of optimizer steps done, i.e. the step
        whose gradient is taken at these parameters). ``loss_fn(model, batch)`` returns the
        scalar mean loss; ``batch`` is a tensor or a (nested) tuple/list/dict of tensors with
        the examples along dim 0. Parameter ``.grad``, the RNG streams and module buffers
        (BatchNorm running statistics) are left as they were. Synchronises once.
        """
        t0 = time.perf_counter()
        blocks = [[i for i, li in enumerate(self.tensor_layer) if li == l]
                  for l in range(len(self.layers))]
        res = sharpness.probe(self.model, self.params, blocks, loss_fn, batch,
                              state=self._probe_state, iters=self.sharpness_iters,
                              hutchinson_samples=self.hutchinson_samples,
                              microbatches=self.noise_microbatches, mode=self.probe_mode)
        self._probe_steps.append(self.step)
        self._probe_rows.append(res)
        self.probe_seconds += time.perf_counter() - t0
        return res

    # ---------------------------------------------------------------- output
    def _per_layer(self, x, reduce):
        """(steps, n_tensors) -> (steps, layers) with a ufunc reduction over each layer."""
        out = np.empty((x.shape[0], len(self.layers)))
        for l in range(len(self.layers)):
            out[:, l] = reduce(x[:, self.tensor_layer == l], axis=1)
        return out

    def dataset(self):
        """The trace so far as an ``xarray.Dataset`` (schema in BRIEF.md / module docstring)."""
        self._flush()
        n, L = len(self.params), len(self.layers)
        cat = lambda parts, shape: (np.concatenate(parts) if parts  # noqa: E731
                                    else np.zeros((0,) + shape))
        T = cat(self._host_tensor, (_N_TENSOR_STATS, n))
        S = cat(self._host_step, (_N_STEP_STATS,))
        C = cat(self._host_clip, (L,))
        lsum = lambda k: self._per_layer(T[:, k], np.sum)  # noqa: E731
        sizes = self.layer_sizes.astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            g_sq, d_sq, p_sq = (self._per_layer(T[:, k] ** 2, np.sum)
                                for k in (_G_NORM, _D_NORM, _P_NORM))
            grad_norm, update_norm = np.sqrt(g_sq), np.sqrt(d_sq)
            grad_cos = _successive_cos(lsum(_G_DOT), grad_norm)
            update_cos = _successive_cos(lsum(_D_DOT), update_norm)
            ratio = np.log10(lsum(_D_ABS) / lsum(_P_ABS))
            g_global = S[:, _G_GLOBAL]
            u_global = np.sqrt(d_sq.sum(axis=1))
            grad_cos_global = _successive_cos(T[:, _G_DOT].sum(axis=1), g_global)
            update_cos_global = _successive_cos(T[:, _D_DOT].sum(axis=1), u_global)
        sl = ("step", "layer")
        ds = xr.Dataset(
            {
                "grad_norm": (sl, grad_norm),
                "param_norm": (sl, np.sqrt(p_sq)),
                "update_norm": (sl, update_norm),
                "update_ratio": (sl, ratio),
                "grad_abs_min": (sl, self._per_layer(T[:, _G_MIN], np.min)),
                "grad_abs_mean": (sl, lsum(_G_ABS) / sizes),
                "grad_abs_max": (sl, self._per_layer(T[:, _G_MAX], np.max)),
                "grad_cos": (sl, grad_cos),
                "update_cos": (sl, update_cos),
                "clip_factor": (sl, C),
                "loss": ("step", S[:, _LOSS]),
                "lr": ("step", S[:, _LR]),
                "grad_norm_global": ("step", g_global),
                "grad_cos_global": ("step", grad_cos_global),
                "update_cos_global": ("step", update_cos_global),
                "clip_factor_global": ("step", S[:, _CLIP_GLOBAL]),
                "n_params": ("layer", self.layer_sizes),
            },
            coords={"step": np.arange(T.shape[0]), "layer": list(self.layers)},
        )
        ds = ds.merge(self._probe_dataset())
        ds.attrs.update(
            tracer_seconds=self._watch.seconds(), tracer_host_seconds=self._watch.host,
            probe_seconds=self.probe_seconds, per_tensor=int(self.per_tensor),
            block_size=self.block_size, probe_every=self.probe_every,
            sharpness_iters=self.sharpness_iters, hutchinson_samples=self.hutchinson_samples,
            noise_microbatches=self.noise_microbatches, probe_mode=self.probe_mode,
            update_ratio_definition="log10(mean|theta_after - theta_before| / mean|theta_after|)",
        )
        return ds

    def _probe_dataset(self):
        L, P = len(self.layers), len(self._probe_steps)
        get = lambda key: (np.array([r[key] for r in self._probe_rows], dtype=float)  # noqa: E731
                           if P else np.zeros((0, L)))
        pl = ("probe_step", "layer")
        return xr.Dataset(
            {
                "sharpness": (pl, get("sharpness").reshape(P, L)),
                "hessian_trace": (pl, get("hessian_trace").reshape(P, L)),
                "grad_noise": (pl, get("grad_noise").reshape(P, L)),
                "sharpness_global": ("probe_step", get("sharpness_global").reshape(P)),
            },
            coords={"probe_step": np.asarray(self._probe_steps, dtype=np.int64),
                    "layer": list(self.layers)},
        )


def _successive_cos(dots, norms):
    """cos(x_t, x_{t−1}) = dot_t / (‖x_t‖ ‖x_{t−1}‖) along axis 0; NaN at t = 0."""
    out = np.full(np.shape(dots), np.nan)
    if len(out) > 1:
        out[1:] = dots[1:] / (norms[1:] * norms[:-1])
    return out
