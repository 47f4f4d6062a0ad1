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

Cost. Per step the gradients and θ_before are copied once (``torch._foreach_copy_``) into
flat buffers in which every layer is one contiguous segment, double-buffered so that the
previous gradient and update stay available for the cosines (G = [g(t), g(t−1)];
D = [θ_before → −Δθ(t), −Δθ(t−1), θ_after]: the snapshot becomes −Δθ in place). The work is
a fixed handful of calls plus a few per layer, never a Python loop of small ops per element
group. Two engines compute the same numbers (both tested against the references):

* ``"numpy"`` (CPU default): numpy views of the buffers, ``ufunc.reduceat`` for the
  per-layer max/min of |g|, BLAS ``dot``/``asum`` per layer for squared norms, dot products
  and Σ|·| (one pass, no temporaries), results written straight into a host block
  (on a CPU the host *is* the device). numpy/BLAS calls cost a fraction of a torch op's
  dispatch overhead, which dominates for small models.
* ``"torch"`` (other devices): (chunks, 256) views of the buffers (layers zero-padded to
  whole chunks), row reductions plus tiny matmuls over chunks and per-layer Gram matrices
  X Xᵀ, results written into a preallocated device block of ``block_size`` steps, copied to
  the host only when full or at :meth:`dataset` — no host synchronisation per step.

The per-tensor gradient norms use ``torch._foreach_norm`` so that the global norm is
bit-identical to ``torch.nn.utils.get_total_norm``. The tracer times itself:
``attrs["tracer_seconds"]`` (CUDA events on a GPU, ``perf_counter`` on CPU; probes excluded)
and ``attrs["probe_seconds"]``. Measured cost: benchmarks/bench_trace.py.

Probes (every ``probe_every`` steps, run by the training loop through :meth:`probe`): per-layer
``sharpness`` (top eigenvalue of the layer's diagonal Hessian block), ``sharpness_global``,
``hessian_trace`` (Hutchinson), ``grad_signal`` (‖E g‖², unbiased) and ``grad_noise`` (tr Cov of the mini-batch gradient from
micro-batches); see :mod:`experiments.sharpness` for the estimators and the treatment of
dropout and BatchNorm.
"""

import math
import time

import numpy as np
import scipy.linalg.blas
import torch
import xarray as xr

from experiments import sharpness

ROOT_LAYER = "(root)"
CHUNK = 256  # elements per row of the flat buffers' (chunks, CHUNK) view
# per-layer statistics in a block row, after the n per-tensor gradient norms; the first group
# is written by after_backward (with loss and global norm), the second by after_step
_BACKWARD_STATS = ("g_abs", "g_max", "g_min", "g_dot")
_STEP_STATS = ("d_sq", "d_abs", "d_dot", "p_sq", "p_abs")


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
    engine : "auto" (numpy for float32/float64 parameters on the CPU, else torch), "numpy"
        or "torch".
    """

    def __init__(self, model, optimizer, *, per_tensor=False, probe_every=0, block_size=256,
                 sharpness_iters=20, sharpness_tol=1e-3, hutchinson_samples=1,
                 noise_microbatches=4,
                 probe_mode="train", seed=0, engine="auto"):
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
        self.seed = seed

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no parameters with requires_grad=True to trace")
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        # detached aliases (same storage; in-place optimizer updates are seen): per-step ops
        # on them record no autograd history. Create the Tracer after moving the model.
        self._data = [p.detach() for p in self.params]
        self._no_grad = torch.no_grad()  # one reusable context (saves its construction)
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(f"parameters on several devices {sorted(map(str, devices))}; "
                             "the tracer needs them on one device")
        self.device = self.params[0].device
        dtypes = {p.dtype for p in self.params}
        self.dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        numpy_ok = self.device.type == "cpu" and self.dtype in (torch.float32, torch.float64)
        if engine not in ("auto", "numpy", "torch") or (engine == "numpy" and not numpy_ok):
            raise ValueError(f"engine={engine!r} is not valid here; valid: auto, torch"
                             + (", numpy" if numpy_ok else " (numpy needs float32/float64 "
                                                          "parameters on the CPU)"))
        self.engine = ("numpy" if numpy_ok else "torch") if engine == "auto" else engine

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
        self._layout(n, L, CHUNK if self.engine == "torch" else 1)

        # one row per step: n tensor gradient norms, then L columns per per-layer statistic,
        # then loss and global gradient norm; clipping factors in their own block (init 1)
        self._w_back = n + L * len(_BACKWARD_STATS) + 2
        width = self._w_back + L * len(_STEP_STATS)
        if self.engine == "numpy":
            self._block = np.zeros((self.block_size, width))
            self._clip = np.ones((self.block_size, L + 1))
        else:
            opts = dict(dtype=torch.promote_types(self.dtype, torch.float32), device=self.device)
            self._block = torch.zeros(self.block_size, width, **opts)
            self._clip = torch.ones(self.block_size, L + 1, **opts)
        self._lrs = []
        self._row = 0
        self.step = 0
        self._phase = "idle"  # idle -> backward (after_backward) -> idle (after_step)
        self._host_rows, self._host_clip = [], []

        self._watch = _Stopwatch(self.device)
        self.probe_seconds = 0.0
        self._probe_steps, self._probe_rows = [], []
        self._probe_state = sharpness.ProbeState(seed)

    def _layout(self, n, L, chunk):
        """Flat buffers with each layer's tensors contiguous, the layer zero-padded to whole
        chunks of ``chunk`` elements (torch engine: then every per-layer statistic is a row
        reduction of the (chunks, chunk) view plus a tiny reduction over chunks)."""
        order = sorted(range(n), key=lambda i: self.tensor_layer[i])  # stable
        chunks = [-(-int(s) // chunk) for s in self.layer_sizes]  # ceil
        seg_start = np.concatenate([[0], np.cumsum(chunks)[:-1]]).astype(np.int64) * chunk
        offsets, pad = np.zeros(n, dtype=np.int64), []
        for l in range(L):
            pos = int(seg_start[l])
            for i in order:
                if self.tensor_layer[i] == l:
                    offsets[i] = pos
                    pos += self.sizes[i]
            pad.extend(range(pos, int(seg_start[l]) + chunks[l] * chunk))
        total = int(sum(chunks)) * chunk
        opts = dict(dtype=self.dtype, device=self.device)
        self._G = torch.zeros(2, total, **opts)
        self._D = torch.zeros(3, total, **opts)
        self._a = torch.zeros(total, **opts)  # |·| scratch
        tensors = lambda f: [f.narrow(0, int(o), s).view(p.shape)  # noqa: E731
                             for o, s, p in zip(offsets, self.sizes, self.params)]
        self._g_t = [tensors(f) for f in self._G]
        self._d_t = [tensors(f) for f in self._D]
        self._seg = [(int(seg_start[l]), chunks[l] * chunk) for l in range(L)]
        self._chunk = chunk
        if self.engine == "numpy":
            self._Gn, self._Dn, self._an = self._G.numpy(), self._D.numpy(), self._a.numpy()
            self._starts = seg_start
            contiguous = all(x.is_contiguous() for x in self._data)
            self._theta_np = ([x.numpy().reshape(-1) for x in self._data]  # views, no copies
                              if contiguous else None)
            self._asum, self._dot = scipy.linalg.blas.get_blas_funcs(("asum", "dot"),
                                                                     (self._an,))
        else:
            self._pad = torch.tensor(pad, dtype=torch.long, device=self.device)
            # chunk -> layer membership, for per-layer sums (matmul) and extrema (masked)
            member = torch.repeat_interleave(torch.arange(L), torch.tensor(chunks))
            self._member = (torch.arange(L)[:, None] == member[None, :]).to(self.device)
            self._member_f = self._member.to(self.dtype)

    def layer_parameters(self):
        """{layer: [parameters]} in trace order (for per-layer clipping consistent with it)."""
        out = {layer: [] for layer in self.layers}
        for p, li in zip(self.params, self.tensor_layer):
            out[self.layers[li]].append(p)
        return out

    # ---------------------------------------------------------------- per step
    def after_backward(self, loss=None):
        """Record the raw gradients (call after ``loss.backward()``, before clipping/step).

        Leaves this step's global gradient norm in ``self.grad_norm_global`` (a 0-d tensor
        on the device) for the training loop's divergence check and progress bar."""
        if self._phase != "idle":
            raise RuntimeError("after_backward called twice without after_step")
        self._watch.start()
        with self._no_grad:
            cur = self.step % 2
            g_t = self._g_t[cur]
            grads = [p.grad for p in self.params]
            all_present = all(x is not None for x in grads)
            if all_present:
                torch._foreach_copy_(g_t, grads)
            else:  # unused this step: a zero gradient
                for v, x in zip(g_t, grads):
                    v.zero_() if x is None else v.copy_(x)
            norm_list = torch._foreach_norm(g_t, 2)
            norms = torch.stack(norm_list)
            # global norm exactly as torch.nn.utils.get_total_norm: the 2-norm of the
            # per-tensor norms of the tensors that have a gradient, in parameter order
            present = norms if all_present else torch.stack(
                [nrm for nrm, x in zip(norm_list, grads) if x is not None] or [norms[:0].sum()])
            g_global = torch.linalg.vector_norm(present, 2)
            self.grad_norm_global = g_global  # 0-d, on the device: read it without a sync
            torch._foreach_copy_(self._d_t[cur], self._data)  # θ_before
            if self.engine == "numpy":
                self._backward_numpy(cur, norms, g_global, loss)
            else:
                self._backward_torch(cur, norms, g_global, loss)
            lr = self.optimizer.param_groups[0].get("lr", math.nan)
            self._lrs.append(lr.detach().clone() if torch.is_tensor(lr) else float(lr))
        self._phase = "backward"
        self._watch.stop()

    def _backward_numpy(self, cur, norms, g_global, loss):
        G, a, st, n = self._Gn, self._an, self._starts, len(self.params)
        row = self._block[self._row]
        np.abs(G[cur], out=a)
        row[:n] = norms.numpy()
        L = len(self.layers)
        row[n:n + L] = [self._asum(G[cur, s:s + m]) for s, m in self._seg]  # BLAS Σ|g|
        row[n + L:n + 2 * L] = np.maximum.reduceat(a, st)
        row[n + 2 * L:n + 3 * L] = np.minimum.reduceat(a, st)
        row[n + 3 * L:n + 4 * L] = [self._dot(G[0, s:s + m], G[1, s:s + m])
                                    for s, m in self._seg]
        row[n + 4 * L] = math.nan if loss is None else float(loss)
        row[n + 4 * L + 1] = float(g_global)

    def _backward_torch(self, cur, norms, g_global, loss):
        g, a = self._G[cur], self._a
        dots = self._grams(self._G)[:, 0, 1]
        rows = a.view(-1, self._chunk)
        torch.abs(g, out=a)
        abs_sums = (self._member_f @ rows.sum(1, keepdim=True))[:, 0]
        maxes = torch.where(self._member, rows.amax(1), -math.inf).amax(1)
        a.index_fill_(0, self._pad, math.inf)  # padding must not count as min|g| = 0
        mins = torch.where(self._member, rows.amin(1), math.inf).amin(1)
        if torch.is_tensor(loss):
            loss_t = loss.detach().reshape(()).to(self.dtype)
        else:  # a fill kernel, not a host-to-device copy (which would synchronise)
            loss_t = torch.full((), math.nan if loss is None else float(loss),
                                dtype=self.dtype, device=self.device)
        values = torch.cat([norms, abs_sums, maxes, mins, dots,
                            torch.stack([loss_t, g_global])])
        self._block[self._row, :len(values)].copy_(values)

    def _grams(self, X):
        """Per-layer Gram matrices of the rows of X (torch): (L, rows, rows)."""
        return torch.stack([X[:, s:s + m] @ X[:, s:s + m].T for s, m in self._seg])

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
                if self.engine == "numpy":
                    self._clip[row, col] = float(f)
                elif torch.is_tensor(f):
                    self._clip[row, col].copy_(f.reshape(()))  # on the device: no host sync
                else:
                    self._clip[row, col].fill_(float(f))  # a kernel argument, no H2D copy
        self._watch.stop()

    def after_step(self):
        """Record the applied update Δθ and θ (call right after ``optimizer.step()``)."""
        if self._phase != "backward":
            raise RuntimeError("after_step called without after_backward")
        self._watch.start()
        with self._no_grad:
            cur, prev = self.step % 2, (self.step + 1) % 2
            if self.engine == "numpy":
                self._step_numpy(cur, prev)
            else:
                self._step_torch(cur, prev)
        self._row += 1
        self.step += 1
        self._phase = "idle"
        if self._row == self.block_size:
            self._flush()
        self._watch.stop()

    def _step_numpy(self, cur, prev):
        D, L, asum, dot = self._Dn, len(self.layers), self._asum, self._dot
        torch._foreach_sub_(self._d_t[cur], self._data)  # θ_before − θ_after = −Δθ
        row = self._block[self._row, self._w_back:]
        for l, (s, m) in enumerate(self._seg):  # one BLAS pass per statistic, no temporaries
            d = D[cur, s:s + m]
            row[l], row[L + l], row[2 * L + l] = dot(d, d), asum(d), dot(d, D[prev, s:s + m])
        theta = self._theta_np or [x.numpy().reshape(-1) for x in self._data]
        row[3 * L:4 * L] = np.bincount(self.tensor_layer, [dot(x, x) for x in theta], L)
        row[4 * L:5 * L] = np.bincount(self.tensor_layer, [asum(x) for x in theta], L)

    def _step_torch(self, cur, prev):
        D, a = self._D, self._a
        torch._foreach_copy_(self._d_t[2], self._data)  # θ_after
        D[cur].sub_(D[2])  # θ_before − θ_after = −Δθ (the sign cancels in every statistic)
        gram = self._grams(D)
        torch.abs(D[cur], out=a)
        abs_rows = torch.stack([a.view(-1, self._chunk).sum(1),
                                D[2].abs_().view(-1, self._chunk).sum(1)], 1)
        abs_sums = self._member_f @ abs_rows
        # columns: ‖Δθ‖², Σ|Δθ|, ⟨Δθ(t), Δθ(t−1)⟩, ‖θ‖², Σ|θ|
        values = torch.cat([gram[:, cur, cur], abs_sums[:, 0], gram[:, cur, prev],
                            gram[:, 2, 2], abs_sums[:, 1]])
        self._block[self._row, self._w_back:].copy_(values)

    def _flush(self):
        rows = self._row
        if rows == 0:
            return
        if self.engine == "numpy":
            self._host_rows.append(self._block[:rows].copy())
            self._host_clip.append(self._clip[:rows].copy())
        else:
            host = lambda x: x[:rows].to("cpu", copy=True).double().numpy()  # noqa: E731
            self._host_rows.append(host(self._block))
            self._host_clip.append(host(self._clip))
            self._watch.collect()  # the copy above has synchronised anyway
        self._clip[:] = 1.0
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
        res = sharpness.probe(self.model, self.params, blocks, loss_fn, batch,
                              state=self._probe_state, iters=self.sharpness_iters,
                              tol=self.sharpness_tol,
                              hutchinson_samples=self.hutchinson_samples,
                              microbatches=self.noise_microbatches, mode=self.probe_mode,
                              noise_batch_size=noise_batch_size)
        self._probe_steps.append(self.step)
        self._probe_rows.append(res)
        self.probe_seconds += time.perf_counter() - t0
        return res

    # ---------------------------------------------------------------- output
    def dataset(self):
        """The trace so far as an ``xarray.Dataset`` (schema in BRIEF.md / module docstring)."""
        self._flush()
        n, L = len(self.params), len(self.layers)
        width = self._w_back + L * len(_STEP_STATS)
        R = np.concatenate(self._host_rows) if self._host_rows else np.zeros((0, width))
        C = np.concatenate(self._host_clip) if self._host_clip else np.zeros((0, L + 1))
        steps = len(R)
        col = dict(zip(_BACKWARD_STATS, range(n, n + L * len(_BACKWARD_STATS), L)))
        col.update(zip(_STEP_STATS, range(self._w_back, width, L)))
        get = lambda k: R[:, col[k]:col[k] + L]  # noqa: E731
        loss, g_global = R[:, self._w_back - 2], R[:, self._w_back - 1]
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
        ds = ds.merge(self._probe_dataset())
        ds.attrs.update(
            tracer_seconds=self._watch.seconds(), tracer_host_seconds=self._watch.host,
            probe_seconds=self.probe_seconds, per_tensor=int(self.per_tensor),
            block_size=self.block_size, probe_every=self.probe_every,
            sharpness_iters=self.sharpness_iters, sharpness_tol=self.sharpness_tol,
            hutchinson_samples=self.hutchinson_samples,
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
                "grad_signal": (pl, get("grad_signal").reshape(P, L)),
                "grad_signal_top": (pl, get("grad_signal_top").reshape(P, L)),
                "sharpness_global": ("probe_step", get("sharpness_global").reshape(P)),
                "sharpness_steps": (pl, get("sharpness_steps").reshape(P, L)),
                "sharpness_global_steps": ("probe_step",
                                           get("sharpness_global_steps").reshape(P)),
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
