"""The tracer's CPU engine as compiled kernels: one pass over the parameters per phase.

:class:`FusedEngine` keeps the flat buffers and the row layout of
:mod:`experiments.trace.engines` (same G/D double buffers, same block of rows, same clip block),
and computes each phase's statistics in one compiled loop (numba) instead of ~20 numpy/BLAS
passes and calls:

* **capture** (after the backward pass): for every tensor i of layer l, one loop that copies
  the raw gradient g into G[cur] and θ into D[cur] (θ_before) while taking Σg² (per tensor),
  Σ|g|, max|g|, min|g| and ⟨g(t), g(t−1)⟩ (per layer); the global norm is
  √(Σ_i Σ_j g_ij²). The gradients are read through their addresses (``Tensor.data_ptr``, taken
  every step, since ``zero_grad(set_to_none=True)`` allocates new ``.grad`` tensors), so the
  whole phase is one call; a missing ``.grad`` counts as zero;
* **step statistics** (after the optimizer step): one loop per tensor that turns D[cur] into
  −Δθ = θ_before − θ_after (the float32/float64 subtraction, as the numpy engine) while taking
  ‖θ‖², Σ|θ|, ‖Δθ‖², Σ|Δθ| and ⟨Δθ(t), Δθ(t−1)⟩ per layer.

Accuracy. Sums and dot products accumulate in float64 (products of float32 values are exact in
float64), so each is within about m·2⁻⁵³ (m elements) of the exact sum of the stored values —
more accurate than the float32 BLAS of the numpy engine (error of order √m·2⁻²⁴), but not
bit-identical to it, nor the global norm to ``torch.nn.utils.get_total_norm``. The kernels
are compiled with LLVM's ``reassoc`` and ``contract`` flags only (no ``nnan``/``ninf``: NaN
and inf propagate): reassociation lets the float64 reductions run in SIMD lanes (without it
the loop is one dependent add chain, 3.5× slower); the result is deterministic for a given
machine. Extrema of |g| are taken on the IEEE bit patterns with the sign bit cleared (an
unsigned integer order equal to the order of the non-negative floats, exact, and
vectorisable); a NaN gradient makes the layer's max and min NaN, as numpy's reductions do.
An empty layer (no elements) has NaN extrema.

Compilation: the kernels are compiled on first use per dtype and cached next to this module
(``cache=True``); docs/findings/tracer_cost.md gives the compile and import times.
"""

import math

import numba
import numpy as np
import torch
from numba import types
from numba.extending import intrinsic

from experiments.trace.engines import BACKWARD_STATS, NumpyEngine, fused_supported

FLAGS = dict(cache=True, nogil=True, fastmath={"reassoc", "contract"})


@intrinsic
def _pointer(typingctx, address, like):
    """A typed pointer to ``address`` (an integer) with the element type of the array ``like``."""
    ptr_type = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr_type))
    return ptr_type(address, like), codegen


@numba.njit(**FLAGS)
def _grad_pass(g, bits, masks, gc, gp, th, dc):
    """gc ← g, dc ← th; returns Σg², Σ|g|, ⟨g, gp⟩ (float64) and max, min of |g|'s bits
    (``masks`` = [all bits but the sign, all bits, none])."""
    s2 = s1 = dt = 0.0
    mask, hi, lo = masks[0], masks[2], masks[1]
    for j in range(g.shape[0]):
        x = g[j]
        gc[j] = x
        dc[j] = th[j]
        x64 = np.float64(x)
        s2 += x64 * x64
        s1 += abs(x64)
        dt += x64 * np.float64(gp[j])
        b = bits[j] & mask
        hi = max(hi, b)
        lo = min(lo, b)
    return s2, s1, dt, hi, lo


@numba.njit(**FLAGS)
def _copy(src, dst):
    for j in range(src.shape[0]):
        dst[j] = src[j]


@numba.njit(**FLAGS)
def capture_kernel(meta, G, D, cur, masks, ext_bits, ext, out):
    """The capture phase. ``meta`` (5, n): per tensor its offset in the buffers, size, layer,
    θ's address and the gradient's address (0: no gradient, a zero). ``out`` = [‖g_i‖ (n) |
    Σ|g|, max|g|, min|g|, ⟨g(t), g(t−1)⟩ (L each) | (loss, untouched) | ‖g‖_global].
    ``ext_bits``/``ext``: one (2, L) scratch seen as unsigned integers and as floats of G's
    dtype; ``masks``: [all bits but the sign, all bits, none] of that unsigned type."""
    n, L = meta.shape[1], ext.shape[1]
    prev = 1 - cur
    count = np.zeros(L, dtype=np.int64)
    for l in range(L):
        out[n + l] = 0.0
        out[n + 3 * L + l] = 0.0
        ext_bits[0, l] = masks[2]
        ext_bits[1, l] = masks[1]
    total = 0.0
    for i in range(n):
        o, m, l = meta[0, i], meta[1, i], meta[2, i]
        gc, gp, dc = G[cur, o:o + m], G[prev, o:o + m], D[cur, o:o + m]
        th = numba.carray(_pointer(meta[3, i], G), m)
        if meta[4, i] == 0:  # no gradient this step: zero
            for j in range(m):
                gc[j] = 0
            _copy(th, dc)
            s2 = s1 = dt = 0.0
            hi = lo = masks[2]
        else:
            g = numba.carray(_pointer(meta[4, i], G), m)
            bits = numba.carray(_pointer(meta[4, i], ext_bits), m)
            s2, s1, dt, hi, lo = _grad_pass(g, bits, masks, gc, gp, th, dc)
        out[i] = math.sqrt(s2)
        total += s2
        out[n + l] += s1
        out[n + 3 * L + l] += dt
        if m:
            count[l] += m
            ext_bits[0, l] = max(ext_bits[0, l], hi)
            ext_bits[1, l] = min(ext_bits[1, l], lo)
    for l in range(L):
        if count[l] == 0 or math.isnan(out[n + l]):
            out[n + L + l] = out[n + 2 * L + l] = math.nan
        else:
            out[n + L + l], out[n + 2 * L + l] = ext[0, l], ext[1, l]
    out[n + 4 * L + 1] = math.sqrt(total)
    return out[n + 4 * L + 1]


@numba.njit(**FLAGS)
def row_kernel(block, row, scratch, loss):
    """block[row] ← the backward part of a row (``scratch``) with the loss."""
    w = scratch.shape[0]
    for k in range(w):
        block[row, k] = scratch[k]
    block[row, w - 2] = loss


@numba.njit(**FLAGS)
def _step_pass(th, dc, dp):
    """dc ← dc − th (θ_before − θ_after); returns ‖Δθ‖², Σ|Δθ|, ⟨Δθ, dp⟩, ‖θ‖², Σ|θ| (float64)."""
    d2 = d1 = dd = p2 = p1 = 0.0
    for j in range(th.shape[0]):
        t = th[j]
        d = dc[j] - t
        dc[j] = d
        t64, d64 = np.float64(t), np.float64(d)
        d2 += d64 * d64
        d1 += abs(d64)
        dd += d64 * np.float64(dp[j])
        p2 += t64 * t64
        p1 += abs(t64)
    return d2, d1, dd, p2, p1


@numba.njit(**FLAGS)
def step_kernel(meta, D, cur, block, row, w_back):
    """The step phase: block[row, w_back:] = [‖Δθ‖², Σ|Δθ|, ⟨Δθ(t), Δθ(t−1)⟩, ‖θ‖², Σ|θ|
    (L each)]."""
    out = block[row, w_back:]
    L = out.shape[0] // 5
    prev = 1 - cur
    out[:] = 0.0
    for i in range(meta.shape[1]):
        o, m, l = meta[0, i], meta[1, i], meta[2, i]
        th = numba.carray(_pointer(meta[3, i], D), m)
        stats = _step_pass(th, D[cur, o:o + m], D[prev, o:o + m])
        for k in range(5):
            out[k * L + l] += stats[k]


@numba.njit(**FLAGS)
def _sum_sq(g):
    s = 0.0
    for j in range(g.shape[0]):
        x = np.float64(g[j])
        s += x * x
    return s


@numba.njit(**FLAGS)
def norms_kernel(ptrs, sizes, like, out):
    """out[i] = ‖tensor i‖ (float64 sum) for the tensors at addresses ``ptrs``, of ``like``'s
    dtype."""
    for i in range(ptrs.shape[0]):
        out[i] = math.sqrt(_sum_sq(numba.carray(_pointer(ptrs[i], like), sizes[i])))


class FusedEngine(NumpyEngine):
    """Statistics by the compiled kernels above (float32/float64 parameters on the CPU, each
    contiguous, all of one dtype: :func:`~experiments.trace.engines.fused_supported`); the
    block, clip block and flush are the numpy engine's."""

    def __init__(self, params, tensor_layer, block_size):
        if not fused_supported(params):
            raise ValueError("engine='fused' needs contiguous CPU parameters of one dtype, "
                             "float32 or float64")
        super().__init__(params, tensor_layer, block_size)
        offsets = [(x.data_ptr() - self.G[0].data_ptr()) // self.G.element_size() for x in self.g_t[0]]
        self.meta = np.array([offsets, self.sizes, self.tensor_layer,
                              [x.data_ptr() for x in self.data], [0] * self.n], dtype=np.int64)
        uint = np.uint32 if self.Gn.dtype == np.float32 else np.uint64
        self.ext_bits = np.zeros((2, self.L), dtype=uint)
        self.ext = self.ext_bits.view(self.Gn.dtype)
        ones = np.iinfo(uint).max
        self.masks = np.array([ones >> 1, ones, 0], dtype=uint)
        self.scratch = np.zeros(self.w_back)  # the backward part of a row
        self.norms_t = torch.from_numpy(self.scratch[:self.n])  # a view, for the hooks' clip factors

    def capture_gradients(self, cur):
        """Copy the raw gradients into G[cur] and θ into D[cur] and take the gradient's
        statistics (kept for :meth:`backward_stats`); returns (the per-tensor norms, a float64
        tensor overwritten by the next capture, and the global norm, a float)."""
        grads = self.grads = [p.grad for p in self.params]  # the tensors copied (for the hooks)
        try:  # the gradients' addresses; -1: not contiguous
            ptrs = [g.data_ptr() if g.is_contiguous() else -1 for g in grads]
        except (AttributeError, RuntimeError):  # a missing or sparse gradient
            ptrs = [-1]
        if -1 in ptrs:  # copy by torch, then read the copies in place
            ptrs = []
            for v, x in zip(self.g_t[cur], grads):
                if x is not None:
                    v.copy_(x)
                ptrs.append(0 if x is None else v.data_ptr())
        self.meta[4] = ptrs
        g_global = capture_kernel(self.meta, self.Gn, self.Dn, cur, self.masks, self.ext_bits,
                                  self.ext, self.scratch)
        return self.norms_t, g_global

    def clip_norms(self, cur, norms):
        """Per-tensor norms of the raw gradients (the copies in G[cur]) and of the parameters'
        gradients now, by one kernel (equal for an unchanged gradient, to the bit)."""
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.contiguous() for p in self.params]
        base = self.G[cur].data_ptr() + self.meta[0] * self.G.element_size()
        ptrs = np.concatenate([base, [g.data_ptr() for g in grads]]).astype(np.int64)
        out = np.empty(2 * self.n)
        norms_kernel(ptrs, np.tile(self.meta[1], 2), self.Gn, out)
        return torch.from_numpy(out[:self.n]), torch.from_numpy(out[self.n:])

    def backward_stats(self, row_index, cur, norms, g_global, loss):
        loss = math.nan if loss is None else (loss.item() if torch.is_tensor(loss) else float(loss))
        row_kernel(self.block, row_index, self.scratch, loss)

    def step_stats(self, row_index, cur, prev):
        step_kernel(self.meta, self.Dn, cur, self.block, row_index, self.w_back)
