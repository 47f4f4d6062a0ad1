"""The tracer's kernels: flat per-layer buffers and the per-step statistics computed on them.

Both engines keep the gradients and parameters of one step in flat buffers in which every
layer is one contiguous segment, double-buffered so that the previous gradient and update stay
available for the cosines (G = [g(t), g(t−1)]; D = [θ_before → −Δθ(t), −Δθ(t−1), θ_after]: the
snapshot becomes −Δθ in place), and write one row of statistics per step into a block:

    row = [‖g_i‖ per tensor (n) | Σ|g|, max|g|, min|g|, ⟨g(t), g(t−1)⟩ per layer (L each) |
           loss, ‖g‖_global | ‖Δθ‖², Σ|Δθ|, ⟨Δθ(t), Δθ(t−1)⟩, ‖θ‖², Σ|θ| per layer (L each)]

plus a clip block (L layer factors, then the global one; 1 where nothing was recorded).

* :class:`NumpyEngine` (CPU): numpy views of the buffers, ``ufunc.reduceat`` for the per-layer
  extrema of |g|, BLAS ``dot``/``asum`` per layer (one pass, no temporaries), results written
  straight into a host block (on a CPU the host *is* the device); numpy/BLAS calls cost a
  fraction of a torch op's dispatch overhead, which dominates for small models.
* :class:`TorchEngine` (other devices): (chunks, 256) views of the buffers (layers zero-padded
  to whole chunks), per-chunk reductions and a batched matmul over all chunks at once, then
  one matmul with the chunk → layer membership: a fixed number of ops per step whatever the
  number of layers; results in a preallocated device block copied to the host only when it is
  flushed — no host synchronisation per step.

The CPU default is the compiled engine of :mod:`experiments.trace.fused`, a
:class:`NumpyEngine` whose three per-step calls are each one numba kernel (same buffers, rows
and flush).
"""

import math

import numpy as np
import scipy.linalg.blas
import torch

CHUNK = 256  # elements per row of the torch engine's (chunks, CHUNK) view
# per-layer statistics in a block row, after the n per-tensor gradient norms; the first group
# is written after the backward pass (with loss and global norm), the second after the step
BACKWARD_STATS = ("g_abs", "g_max", "g_min", "g_dot")
STEP_STATS = ("d_sq", "d_abs", "d_dot", "p_sq", "p_abs")


class _FlatBuffers:
    """Flat buffers with each layer's tensors contiguous, the layer zero-padded to whole chunks
    of ``chunk`` elements, and the block of per-step rows."""

    chunk = 1

    def __init__(self, params, tensor_layer, block_size):
        self.params = params
        self.data = [p.detach() for p in params]  # same storage: in-place updates are seen
        self.tensor_layer = np.asarray(tensor_layer)
        self.sizes = [p.numel() for p in params]
        self.n, self.L = len(params), int(self.tensor_layer.max()) + 1
        self.layer_sizes = np.bincount(self.tensor_layer, weights=self.sizes, minlength=self.L).astype(np.int64)
        self.dtype, self.device = params[0].dtype, params[0].device
        if len({p.dtype for p in params}) > 1:
            self.dtype = torch.float32
        self.block_size = block_size
        self.w_back = self.n + self.L * len(BACKWARD_STATS) + 2
        self.width = self.w_back + self.L * len(STEP_STATS)

        order = sorted(range(self.n), key=lambda i: self.tensor_layer[i])  # stable
        chunk = self.chunk
        chunks = [-(-int(s) // chunk) for s in self.layer_sizes]  # ceil
        seg_start = np.concatenate([[0], np.cumsum(chunks)[:-1]]).astype(np.int64) * chunk
        offsets, pad = np.zeros(self.n, dtype=np.int64), []
        for l in range(self.L):
            pos = int(seg_start[l])
            for i in order:
                if self.tensor_layer[i] == l:
                    offsets[i] = pos
                    pos += self.sizes[i]
            pad.extend(range(pos, int(seg_start[l]) + chunks[l] * chunk))
        total = int(sum(chunks)) * chunk
        opts = dict(dtype=self.dtype, device=self.device)
        self.G = torch.zeros(2, total, **opts)
        self.D = torch.zeros(3, total, **opts)
        self.a = torch.zeros(total, **opts)  # |·| scratch
        tensors = lambda f: [f.narrow(0, int(o), s).view(p.shape)  # noqa: E731
                             for o, s, p in zip(offsets, self.sizes, params)]
        self.g_t = [tensors(f) for f in self.G]
        self.d_t = [tensors(f) for f in self.D]
        self.seg = [(int(seg_start[l]), chunks[l] * chunk) for l in range(self.L)]
        self.seg_start, self.chunks, self.pad = seg_start, chunks, pad

    def capture_gradients(self, cur):
        """Copy the raw gradients into G[cur] and θ into D[cur]; return (per-tensor norms,
        global norm) as device tensors. The global norm is exactly
        ``torch.nn.utils.get_total_norm``'s: the 2-norm of the per-tensor norms of the tensors
        that have a gradient, in parameter order; a missing ``.grad`` counts as zero here."""
        g_t = self.g_t[cur]
        grads = self.grads = [p.grad for p in self.params]  # the tensors copied (for the hooks)
        all_present = all(x is not None for x in grads)
        if all_present:
            torch._foreach_copy_(g_t, grads)
        else:  # unused this step: a zero gradient
            for v, x in zip(g_t, grads):
                v.zero_() if x is None else v.copy_(x)
        norm_list = torch._foreach_norm(g_t, 2)
        norms = torch.stack(norm_list)
        present = norms if all_present else torch.stack(
            [nrm for nrm, x in zip(norm_list, grads) if x is not None] or [norms[:0].sum()])
        g_global = torch.linalg.vector_norm(present, 2)
        torch._foreach_copy_(self.d_t[cur], self.data)  # θ_before
        return norms, g_global

    def clip_norms(self, cur, norms):
        """Per-tensor norms of the raw gradients (``norms``, from the capture into G[cur]) and of
        the parameters' gradients now (a missing one: zero), computed alike, for the clip
        factors now/raw (exactly 1 for an unchanged gradient)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        return norms, torch.stack(torch._foreach_norm(grads, 2)).to(norms.dtype)


class NumpyEngine(_FlatBuffers):
    """Statistics by numpy/BLAS on views of the flat buffers (float32/float64 on the CPU)."""

    def __init__(self, params, tensor_layer, block_size):
        super().__init__(params, tensor_layer, block_size)
        self.block = np.zeros((block_size, self.width))
        self.clip = np.ones((block_size, self.L + 1))
        self.Gn, self.Dn, self.an = self.G.numpy(), self.D.numpy(), self.a.numpy()
        contiguous = all(x.is_contiguous() for x in self.data)
        self.theta_np = [x.numpy().reshape(-1) for x in self.data] if contiguous else None  # views
        self.asum, self.dot = scipy.linalg.blas.get_blas_funcs(("asum", "dot"), (self.an,))
        self.d_np = [[x.numpy().reshape(-1) for x in f] for f in self.d_t]  # views
        self.layer_tensors = [[i for i in range(self.n) if self.tensor_layer[i] == l] for l in range(self.L)]
        self.per_tensor = np.zeros(2 * self.n)  # ‖θ_i‖², Σ|θ_i| per tensor
        self.bins = np.concatenate([self.tensor_layer, self.tensor_layer + self.L])

    def backward_stats(self, row_index, cur, norms, g_global, loss):
        G, a, n, L, asum, dot = self.Gn, self.an, self.n, self.L, self.asum, self.dot
        g = G[cur]
        row = self.block[row_index]
        row[:n] = norms.numpy()
        for l, (s, m) in enumerate(self.seg):  # each segment once from memory, then from cache
            row[n + l] = asum(g[s:s + m])  # BLAS Σ|g|
            row[n + 3 * L + l] = dot(G[0, s:s + m], G[1, s:s + m])
        np.abs(g, out=a)
        row[n + L:n + 2 * L] = np.maximum.reduceat(a, self.seg_start)
        row[n + 2 * L:n + 3 * L] = np.minimum.reduceat(a, self.seg_start)
        row[n + 4 * L] = math.nan if loss is None else float(loss)
        row[n + 4 * L + 1] = float(g_global)

    def set_clip(self, row_index, col, factor):
        self.clip[row_index, col] = float(factor)

    def step_stats(self, row_index, cur, prev):
        if self.theta_np is None:  # non-contiguous parameters: copies of θ
            return self._step_stats_copy(row_index, cur, prev)
        D, L, n, asum, dot, sub = self.Dn, self.L, self.n, self.asum, self.dot, np.subtract
        theta, d_t, per_tensor = self.theta_np, self.d_np[cur], self.per_tensor
        row = self.block[row_index, self.w_back:]
        # layer by layer, so that each segment is still in cache for the next pass over it
        for l, (s, m), tensors in zip(range(L), self.seg, self.layer_tensors):
            for i in tensors:
                x, d = theta[i], d_t[i]
                sub(d, x, out=d)  # θ_before − θ_after = −Δθ (the sign cancels in every statistic)
                per_tensor[i], per_tensor[n + i] = dot(x, x), asum(x)
            d = D[cur, s:s + m]
            row[l], row[L + l], row[2 * L + l] = dot(d, d), asum(d), dot(d, D[prev, s:s + m])
        row[3 * L:5 * L] = np.bincount(self.bins, per_tensor, 2 * L)  # per-layer sums, in order

    def _step_stats_copy(self, row_index, cur, prev):
        D, L, asum, dot = self.Dn, self.L, self.asum, self.dot
        torch._foreach_sub_(self.d_t[cur], self.data)  # θ_before − θ_after = −Δθ
        row = self.block[row_index, self.w_back:]
        for l, (s, m) in enumerate(self.seg):  # one BLAS pass per statistic, no temporaries
            d = D[cur, s:s + m]
            row[l], row[L + l], row[2 * L + l] = dot(d, d), asum(d), dot(d, D[prev, s:s + m])
        theta = [x.numpy().reshape(-1) for x in self.data]
        row[3 * L:4 * L] = np.bincount(self.tensor_layer, [dot(x, x) for x in theta], L)
        row[4 * L:5 * L] = np.bincount(self.tensor_layer, [asum(x) for x in theta], L)

    def flush(self, rows):
        """Host copies of the first ``rows`` rows of the block and the clip block; resets the
        clip block to 1."""
        out = self.block[:rows].copy(), self.clip[:rows].copy()
        self.clip[:] = 1.0
        return out


class TorchEngine(_FlatBuffers):
    """Statistics by torch ops on the device; nothing leaves it until :meth:`flush`.

    A fixed number of ops per step whatever the number of layers (on a GPU each op is a
    kernel launch, and a small model's step is bound by launches): the buffers are viewed as
    (chunks, 256) rows, every per-chunk sum, product or extremum is one op over all chunks
    (``bmm`` for the dot products), a (layers, chunks) 0/1 matrix sums the chunks of each
    layer in one ``matmul``, one masked ``aminmax`` takes the layers' extrema, and each phase
    writes its row of the block with one ``cat``/``index_select`` into it. No value is read by
    the host (no ``.item()``, no branch on a tensor, no host-to-device copy): the host waits
    for the device only at :meth:`flush`."""

    chunk = CHUNK

    def __init__(self, params, tensor_layer, block_size):
        super().__init__(params, tensor_layer, block_size)
        self.block_dtype = torch.promote_types(self.dtype, torch.float32)
        opts = dict(dtype=self.block_dtype, device=self.device)
        self.block = torch.zeros(block_size, self.width, **opts)
        self.clip = torch.ones(block_size, self.L + 1, **opts)
        self.pad_index = torch.tensor(self.pad, dtype=torch.long, device=self.device)
        self.n_chunks = int(sum(self.chunks))
        # chunk -> layer membership, for per-layer sums (matmul) and extrema (masked)
        member = torch.repeat_interleave(torch.arange(self.L), torch.tensor(self.chunks))
        self.member = (torch.arange(self.L)[:, None] == member[None, :]).to(self.device)
        self.member_f = self.member.to(self.block_dtype)
        # fill of the masked extrema: 0 for max|g| (|g| >= 0, every layer has an element),
        # +inf for min|g|
        self.extrema_fill = torch.tensor([0.0, math.inf], dtype=self.dtype, device=self.device).view(2, 1, 1)
        # after the step, per chunk: the 3x3 Gram matrix of the rows of D (−Δθ(0), −Δθ(1), θ)
        # flattened (columns 0..8), then Σ|·| of each row (9..11); the statistics' columns
        # ‖Δθ‖², Σ|Δθ|, ⟨Δθ(t), Δθ(t−1)⟩, ‖θ‖², Σ|θ| for each (cur, prev)
        self.step_columns = {(c, 1 - c): torch.tensor([4 * c, 9 + c, 3 * c + 1 - c, 8, 11],
                                                      dtype=torch.long, device=self.device)
                             for c in (0, 1)}
        self.layer_index = torch.as_tensor(self.tensor_layer, dtype=torch.long, device=self.device)

    def _as_block(self, x):
        """``x`` in the block's dtype (no call at all when it is already: a call costs)."""
        return x if self.dtype == self.block_dtype else x.to(self.block_dtype)

    def _write(self, dst, parts):
        """``dst`` (a contiguous slice of the block) = the concatenation of ``parts``: one op."""
        if all(p.dtype == dst.dtype for p in parts):
            torch.cat(parts, out=dst)
        else:
            dst.copy_(torch.cat([p.to(dst.dtype) for p in parts]))

    def _loss(self, loss):
        """The loss as a 1-element device tensor, without a host-to-device copy."""
        if torch.is_tensor(loss) and loss.device == self.device:
            return loss.detach().reshape(1)
        value = math.nan if loss is None else float(loss)  # a Python number or a CPU tensor
        return torch.full((1,), value, dtype=self.block_dtype, device=self.device)  # a fill kernel

    def backward_stats(self, row_index, cur, norms, g_global, loss):
        self._backward_row(self.block[row_index, :self.w_back], cur, norms, g_global, self._loss(loss))

    def _backward_row(self, dst, cur, norms, g_global, loss_t):
        C, k, a = self.n_chunks, self.chunk, self.a
        G = self.G.view(2, C, k)
        torch.abs(self.G[cur], out=a)
        rows = a.view(C, k)
        dots = torch.bmm(G[0].unsqueeze(1), G[1].unsqueeze(2)).view(C)  # ⟨g(t), g(t−1)⟩ per chunk
        per_layer = self.member_f @ self._as_block(torch.stack([rows.sum(1), dots], 1))
        high = rows.amax(1)
        a.index_fill_(0, self.pad_index, math.inf)  # padding must not count as min|g| = 0
        low = rows.amin(1)
        masked = torch.where(self.member, torch.stack([high, low]).unsqueeze(1), self.extrema_fill)
        lows, highs = torch.aminmax(masked, dim=2)  # highs[0]: max|g| per layer, lows[1]: min|g|
        self._write(dst, [norms, per_layer[:, 0], highs[0], lows[1], per_layer[:, 1], loss_t, g_global.reshape(1)])

    def set_clip(self, row_index, col, factor):
        if torch.is_tensor(factor):
            self.clip[row_index, col].copy_(factor.reshape(()))  # on the device: no host sync
        else:
            self.clip[row_index, col].fill_(float(factor))  # a kernel argument, no H2D copy

    def set_clip_row(self, row_index, factors):
        """The whole clip row (L layer factors, then the global one) from a device tensor."""
        self.clip[row_index].copy_(factors)

    def step_stats(self, row_index, cur, prev):
        self._step_row(self.block[row_index, self.w_back:], cur, prev)

    def _step_row(self, dst, cur, prev):
        D, C, k = self.D, self.n_chunks, self.chunk
        torch._foreach_copy_(self.d_t[2], self.data)  # θ_after
        D[cur].sub_(D[2])  # θ_before − θ_after = −Δθ (the sign cancels in every statistic)
        rows = D.view(3, C, k).transpose(0, 1)  # (chunks, 3, k)
        gram = torch.bmm(rows, rows.transpose(1, 2)).view(C, 9)
        abs_sums = torch.linalg.vector_norm(rows, 1, dim=2)  # Σ|·| per chunk and row
        per_layer = self.member_f @ self._as_block(torch.cat([gram, abs_sums], 1))
        # columns: ‖Δθ‖², Σ|Δθ|, ⟨Δθ(t), Δθ(t−1)⟩, ‖θ‖², Σ|θ|, each (L,), into the row at once
        torch.index_select(per_layer.T, 0, self.step_columns[cur, prev], out=dst.view(len(STEP_STATS), self.L))

    def flush(self, rows):
        host = lambda x: x[:rows].to("cpu", copy=True).double().numpy()  # noqa: E731
        out = host(self.block), host(self.clip)
        self.clip[:] = 1.0
        return out


class GraphTorchEngine(TorchEngine):
    """:class:`TorchEngine` with each phase's kernels replayed from a CUDA graph: one launch
    per phase instead of a dozen (a small model's step on a GPU is bound by launches).

    What a graph cannot capture stays eager: the copy of the gradients (``.grad`` tensors are
    new every step after ``zero_grad(set_to_none=True)``; this is all the capture phase does,
    so the attached tracer's end-of-backward callback, which runs on autograd's thread, never
    captures or replays a graph), the loss into a fixed 1-element buffer, and the copy of each
    phase's row (computed into a fixed staging row) into the block's row of this step: per step
    4 small ops and 2 graph launches (24 ops eagerly). The gradient phase computes the
    per-tensor and global norms into fixed buffers (the tensors ``capture_gradients`` returns,
    filled when ``backward_stats`` runs) and takes θ_before (still before the update). One
    graph per phase and parity of the step (the double buffers alternate), each captured at
    its third call after two eager ones (lazy initialisation of the libraries): the first
    steps run eagerly, the captures (each synchronises once) fall into steps 4 and 5. A step with
    a missing gradient runs eagerly (the torch engine's rule for the global norm). The graphs
    read the buffers and the parameters' storage at fixed addresses: replacing a parameter's
    storage (``p.data = ...``) is not seen (nor by the eager engine, whose views alias it).
    Off CUDA the same staged code runs eagerly (what the CPU tests check)."""

    def __init__(self, params, tensor_layer, block_size):
        super().__init__(params, tensor_layer, block_size)
        opts = dict(dtype=self.block_dtype, device=self.device)
        self.loss_buf = torch.full((1,), math.nan, **opts)
        self.back_row = torch.zeros(self.w_back, **opts)
        self.step_row = torch.zeros(self.width - self.w_back, **opts)
        self.norms_buf = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        self.global_buf = torch.zeros((), dtype=self.dtype, device=self.device)
        self.graphs, self.calls = {}, {}
        self.cuda = self.device.type == "cuda"

    def _run(self, key, fn):
        """fn() eagerly, or replayed from its graph (captured at the third call on CUDA)."""
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        self.calls[key] = self.calls.get(key, 0) + 1
        if not self.cuda or self.calls[key] < 3:
            fn()
            return
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device), torch.cuda.graph(graph):
            fn()
        self.graphs[key] = graph
        graph.replay()  # capturing does not run the kernels

    def capture_gradients(self, cur):
        grads = [p.grad for p in self.params]
        if any(x is None for x in grads):  # a parameter unused this step (rare): eagerly
            return super().capture_gradients(cur)
        self.grads = grads
        torch._foreach_copy_(self.g_t[cur], grads)
        return self.norms_buf, self.global_buf  # filled by backward_stats

    def backward_stats(self, row_index, cur, norms, g_global, loss):
        if norms is not self.norms_buf:  # the eager capture of a step with a missing gradient
            return super().backward_stats(row_index, cur, norms, g_global, loss)
        self.loss_buf.copy_(self._loss(loss))

        def fn():
            torch.stack(torch._foreach_norm(self.g_t[cur], 2), out=self.norms_buf)
            torch.linalg.vector_norm(self.norms_buf, 2, out=self.global_buf)
            torch._foreach_copy_(self.d_t[cur], self.data)  # θ_before
            self._backward_row(self.back_row, cur, self.norms_buf, self.global_buf, self.loss_buf)
        self._run(("backward", cur), fn)
        self.block[row_index, :self.w_back].copy_(self.back_row)

    def step_stats(self, row_index, cur, prev):
        self._run(("step", cur), lambda: self._step_row(self.step_row, cur, prev))
        self.block[row_index, self.w_back:].copy_(self.step_row)


def fused_supported(params):
    """True when the compiled engine (:mod:`experiments.trace.fused`) can trace these
    parameters: contiguous CPU tensors of one dtype, float32 or float64."""
    dtypes = {p.dtype for p in params}
    return (len(dtypes) == 1 and dtypes <= {torch.float32, torch.float64}
            and all(p.device.type == "cpu" and p.is_contiguous() for p in params))
