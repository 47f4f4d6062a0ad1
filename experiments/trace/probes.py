r"""Curvature and gradient-noise probes by Hessian-vector products (docs/theory.md §5, §4).

All quantities refer to the loss L(θ) = ``loss_fn(model, batch)`` of one batch at the current
parameters θ, split into blocks (layers) θ = (θ_1, ..., θ_K) with Hessian blocks H_kl.

* **Block sharpness** λ_max(H_kk): top (largest algebraic) eigenvalue of each diagonal block,
  and λ_max(H) of the whole network. Lanczos (largest *algebraic* eigenvalue, unlike power
  iteration's largest magnitude; three-term recurrence plus one full reorthogonalisation
  pass) with a fixed budget of ``iters`` Hessian-vector products per block (capped at the
  block's dimension, where it is exact), started from the previous probe's Ritz vector plus
  10 % of a random direction (warm start; the random part keeps newly dominant directions
  reachable); a block stops early once its Ritz residual β_j|y_j| ≤ tol·|θ| (default
  tol = 1e-3: in the benchmark ~7 of 20 steps, within 2e-5 of the converged value). Why not one HVP for all blocks: H·(v_1, ..., v_K) = (Σ_l H_kl v_l)_k mixes
  blocks, so H_kk v_k needs its own product (batching them with ``is_grads_batched`` was
  3x slower on CPU). Each block's product is ∂(g_k·v_k)/∂θ_k = H_kk v_k, a double backward
  restricted to θ_k through the shared first-order graph (``create_graph=True`` once per
  probe), which autograd prunes to the paths that reach θ_k. Cost per Lanczos step: one full
  HVP (≈ 1.8 forward-backward passes for the seed CNN) plus the K restricted ones (≈ 3.3
  more), so per-layer sharpness dominates a probe's cost.
* **Hutchinson trace** tr(H_kk) ≈ mean_s z_kᵀ(H z)_k, z Rademacher over *all* parameters: one
  full HVP per sample serves every block, and it is unbiased because the cross terms
  z_kᵀ H_kl z_l (l ≠ k) have mean zero (Hutchinson 1990; Bekas, Kokiopoulou, Saad 2007).
  Var = 2 Σ_{i≠j} (A_k)_ij² with A_k = (P_k H + H P_k)/2 (P_k the block's coordinate projector).
* **Gradient noise** tr Cov(ĝ) of the mini-batch mean gradient ĝ over a batch of B examples:
  split into M micro-batches of b = ⌊B/M⌋ examples (the remainder is dropped), micro-batch mean
  gradients g_1..g_M, unbiased sample variance s_i² = Σ_j (g_ji − ḡ_i)²/(M−1) per element; for
  i.i.d. examples Cov(g_j) = Σ_1/b and Cov(ĝ) = Σ_1/B, so the estimate is
  (b/B)·Σ_{i∈block} s_i² (= (1/M)Σ s_i² when M divides B). It is the ``noise_total`` of
  ``dynamics.nqm.stationary.layer_prediction``. From the same micro-batches, the **gradient signal**
  ‖E g‖² per block (squared norm of the mean gradient over the data at θ), unbiased:
  Σ_i (ḡ_i² − s_i²/M) (:func:`microbatch_moments`).

* **Curvature along the gradient** (``curvature=True``, :func:`microbatch_curvature`; issue 16):
  from M ≥ 3 independent micro-batches, one Hessian-vector product on micro-batch k's own graph
  per vector: :math:`g_{k+1}^\top H_k g_{k+1}` (unbiased for :math:`E[g^\top H g]` with the
  population H, since H_k is independent of g_{k+1}), :math:`g_{k+2}^\top H_k g_{k+1}` (unbiased
  for :math:`m^\top H m`), :math:`g_{k+1}^\top H_k b` with b the optimizer's momentum buffer, and
  the batch sharpness :math:`g_k^\top H_k g_k/\|g_k\|^2` (Andreyev & Beneventano 2024,
  docs/theory.md §7), all per block. The micro-batch passes are those of the gradient noise:
  with ``curvature`` each micro-batch's forward and backward pass (with graph) is made once
  and serves both (:func:`microbatch_gradients`). Cost: measured by benchmarks/bench_trace.py
  (part 3).

Mode, dropout, BatchNorm. ``mode="train"`` (default) probes the loss the optimizer descends:
BatchNorm normalises with the probe batch's statistics (part of the Hessian), dropout is
active with one mask drawn per probe — the first-order graph is built by a single forward pass
that all HVPs reuse, so the function whose Hessian is taken is deterministic. Micro-batches
draw their own dropout masks (dropout noise is gradient noise) and use their own BatchNorm
statistics (as in ghost batch norm; with BatchNorm the examples are not independent and the
noise estimate refers to micro-batch normalisation). ``mode="eval"`` probes the eval-mode loss
(no dropout, BatchNorm running statistics). Either way the probe leaves no trace on training:
the RNG streams are forked, module buffers (BatchNorm running statistics) restored, the modules'
train/eval flags restored, and ``.grad`` untouched (``torch.autograd.grad`` only).
Attention runs through the math SDPA kernel and, on CUDA, RNNs without cuDNN, because the
fused kernels have no double backward.
"""

import contextlib
from typing import NamedTuple

import numpy as np
import torch

WARM_START_NOISE = 0.1


class ProbeState:
    """What persists between probes: warm-start vectors and the probes' own RNG."""

    def __init__(self, seed=0):
        self.seed = seed
        self.vectors = {}
        self._generators = {}

    def generator(self, device):
        key = str(device)
        if key not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[key] = g
        return self._generators[key]


@contextlib.contextmanager
def probe_context(model, mode="train"):
    """Run a probe without side effects on training (see module docstring)."""
    flags = {m: m.training for m in model.modules()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    device = next(model.parameters()).device
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(
            devices=[device] if device.type == "cuda" else []))
        from torch.nn.attention import SDPBackend, sdpa_kernel
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        if device.type == "cuda" and any(isinstance(m, torch.nn.RNNBase) for m in flags):
            stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        stack.enter_context(torch.enable_grad())
        if mode == "eval":
            model.eval()
        try:
            yield
        finally:
            with torch.no_grad():
                for n, b in model.named_buffers():
                    if n in buffers:
                        b.copy_(buffers[n])
            for m, flag in flags.items():
                m.training = flag


def first_order_graph(loss, params):
    """Gradients g(θ) with their graph, for repeated HVPs (None for unused parameters)."""
    return list(torch.autograd.grad(loss, params, create_graph=True, allow_unused=True))


def block_hvp(grads, params, block, vec):
    """H_kk v for block k (tensor indices ``block``), v flat over the block; returns flat."""
    outs, gos = [], []
    vs = vec.split([params[i].numel() for i in block])
    for i, v in zip(block, vs):
        if grads[i] is not None and grads[i].requires_grad:
            outs.append(grads[i])
            gos.append(v.view_as(params[i]))
    if not outs:
        return torch.zeros_like(vec)
    hv = torch.autograd.grad(outs, [params[i] for i in block], gos, retain_graph=True,
                             allow_unused=True, materialize_grads=True)
    return torch.cat([h.reshape(-1) for h in hv])


def full_hvp(grads, params, vec):
    """H v over all parameters (v flat in parameter order); returns flat."""
    return block_hvp(grads, params, list(range(len(params))), vec)


def lanczos_top(matvecs, starts, iters, generator=None, tol=0.0, min_steps=3):
    """Top eigenvalue and Ritz vector of several symmetric operators in lockstep.

    ``matvecs(vectors) -> products`` maps {k: flat vector} to {k: operator k applied to it};
    ``starts`` are the start vectors. Lanczos: three-term recurrence plus one full
    reorthogonalisation pass against the stored basis per step, min(iters, dim_k) steps per
    operator (exact up to roundoff when iters >= dim_k). A breakdown (β ≈ 0: an invariant
    Krylov subspace, e.g. a zero block) restarts from a random direction orthogonal to the
    basis; T keeps the tiny β, so it decouples and stays correct. With ``tol`` > 0 an
    operator stops early (after at least ``min_steps``) once its top Ritz pair (θ, x) has
    residual ‖H x − θ x‖ = β_j |y_j| ≤ tol·|θ| (the standard Lanczos bound; θ is then within
    tol·|θ| of an eigenvalue, usually within (tol·θ)²/gap). One host transfer per step (α, β
    of all operators, for the breakdown and convergence tests). Returns (numpy eigenvalues,
    unit Ritz vectors, numpy array of the steps taken)."""
    K = len(starts)
    steps = [min(iters, s.numel()) for s in starts]
    Q = [torch.empty(m, s.numel(), dtype=s.dtype, device=s.device)
         for m, s in zip(steps, starts)]
    for k in range(K):
        Q[k][0] = starts[k] / starts[k].norm()
    # the recurrence's scalars live on the host as float64 numpy: no 0-d tensor ops per step
    alphas = [np.empty(m) for m in steps]
    betas = [np.empty(max(m - 1, 0)) for m in steps]
    tiny = [100 * torch.finfo(s.dtype).eps for s in starts]
    beta_prev = {}
    for j in range(max(steps)):
        active = [k for k in range(K) if j < steps[k]]
        if not active:  # all converged early
            break
        ws = matvecs({k: Q[k][j] for k in active})
        new, stats = {}, []
        for k in active:
            q, w = Q[k][j], ws[k]
            alpha = torch.dot(q, w)
            stats.append(alpha)
            if j + 1 < steps[k]:  # w − α q − β q_prev, then reorthogonalised; one new vector, in place
                w = torch.addcmul(w, q, alpha, value=-1)
                if j:
                    w.sub_(Q[k][j - 1], alpha=beta_prev[k])
                basis = Q[k][:j + 1]
                w.addmv_(basis.T, basis @ w, alpha=-1)
                new[k] = w
                stats.append(w.norm())
        host = torch.stack(stats).cpu().double().numpy()  # the one synchronisation of this step
        pos = 0
        for k in active:
            alphas[k][j] = host[pos]
            pos += 1
            if k in new:
                beta = float(host[pos])
                pos += 1
                betas[k][j] = beta
                w = new[k]
                if tol > 0 and j + 1 >= min_steps:
                    theta, y = _top_ritz(alphas[k][:j + 1], betas[k][:j])
                    if beta * abs(y[-1]) <= tol * abs(theta):
                        steps[k] = j + 1  # converged: q_{j+1} is not needed
                        continue
                if beta <= tiny[k] * max(abs(alphas[k][j]), betas[k][j - 1] if j else 0.0):
                    basis = Q[k][:j + 1]
                    w = torch.randn(w.shape, generator=generator, dtype=w.dtype, device=w.device)
                    for _ in range(2):
                        w = w - basis.T @ (basis @ w)
                    Q[k][j + 1] = w / w.norm()
                else:
                    torch.div(w, beta, out=Q[k][j + 1])
                beta_prev[k] = beta
    values, vectors = np.empty(K), []
    for k in range(K):
        m = steps[k]
        values[k], y = _top_ritz(alphas[k][:m], betas[k][:m - 1])
        vec = torch.as_tensor(y, dtype=Q[k].dtype, device=Q[k].device) @ Q[k][:m]
        vectors.append(vec / vec.norm())
    return values, vectors, np.array(steps)


def _top_ritz(alphas, betas):
    """Largest eigenvalue and its unit eigenvector of the tridiagonal T(alphas, betas) (at most
    ``iters`` rows: a dense LAPACK eigh costs less than scipy's tridiagonal driver's checks)."""
    n = len(alphas)
    T = np.zeros((n, n))
    T.flat[::n + 1] = alphas
    if n > 1:
        T.flat[1::n + 1] = betas
        T.flat[n::n + 1] = betas
    w, y = np.linalg.eigh(T)
    return w[-1], y[:, -1]


def _start(state, key, dim, like, gen):
    r = torch.randn(dim, generator=gen, device=like.device, dtype=like.dtype)
    r = r / r.norm()
    prev = state.vectors.get(key)
    if prev is None or prev.numel() != dim:
        return r
    return prev + WARM_START_NOISE * r


def block_sharpness(grads, params, blocks, iters, state, include_global=True, tol=0.0):
    """λ_max of each diagonal block (and of H): returns (array over blocks, global or nan,
    Lanczos steps taken per block (and global last))."""
    p0 = params[0]
    gen = state.generator(p0.device)
    dims = [sum(params[i].numel() for i in b) for b in blocks]
    keys = [("block", tuple(b)) for b in blocks] + ([("global",)] if include_global else [])
    all_blocks = blocks + ([list(range(len(params)))] if include_global else [])
    dims = dims + ([sum(p.numel() for p in params)] if include_global else [])
    starts = [_start(state, key, d, p0.detach(), gen) for key, d in zip(keys, dims)]

    def matvecs(vs):
        return {k: block_hvp(grads, params, all_blocks[k], v) for k, v in vs.items()}

    values, vectors, steps = lanczos_top(matvecs, starts, iters, gen, tol=tol)
    for key, v in zip(keys, vectors):
        state.vectors[key] = v.detach()
    if include_global:
        return values[:-1], values[-1], steps
    return values, np.nan, steps


def hutchinson_block_traces(grads, params, blocks, samples, generator):
    """Unbiased Hutchinson estimates of tr(H_kk) for every block from ``samples`` full HVPs."""
    sizes = [p.numel() for p in params]
    total = torch.zeros(len(blocks), dtype=params[0].dtype, device=params[0].device)
    for _ in range(samples):
        z = torch.randint(0, 2, (sum(sizes),), generator=generator, device=params[0].device)
        z = z.to(params[0].dtype) * 2 - 1
        per_tensor = (z * full_hvp(grads, params, z)).split(sizes)
        total += torch.stack([sum(per_tensor[i].sum() for i in b) for b in blocks])
    return total / samples


def split_batch(batch, parts):
    """Split a tensor or (nested) tuple/list/dict of tensors into ``parts`` equal micro-batches
    of ⌊B/parts⌋ examples along dim 0 (the remainder dropped). Returns (micro-batches, b, B)."""
    sizes = []
    _walk(batch, lambda t: sizes.append(t.shape[0]))
    if not sizes or len(set(sizes)) != 1:
        raise ValueError(f"batch must hold tensors with one common batch size along dim 0; "
                         f"got sizes {sorted(set(sizes))}")
    B = sizes[0]
    b = B // parts
    if b < 1:
        raise ValueError(f"noise_microbatches={parts} is outside the valid range [2, {B}] "
                         f"for a batch of {B} examples")
    return [_walk(batch, lambda t, j=j: t[j * b:(j + 1) * b]) for j in range(parts)], b, B


def _walk(x, fn):
    if torch.is_tensor(x):
        return fn(x)
    if isinstance(x, dict):
        return {k: _walk(v, fn) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_walk(v, fn) for v in x)
    return x


class MicroGrads(NamedTuple):
    """The micro-batch passes of one probe (:func:`microbatch_gradients`)."""

    rows: torch.Tensor  # (M, n): micro-batch mean gradients, flat over params, detached
    graphs: list  # per micro-batch the gradients with their graph (create_graph), else None
    b: int  # examples per micro-batch
    B: int  # examples in the batch


def microbatch_gradients(model, params, loss_fn, batch, parts, create_graph=False):
    """One forward and backward pass per micro-batch (:func:`split_batch`), in order; with
    ``create_graph`` the gradients keep their graph for Hessian-vector products on each
    micro-batch (:func:`microbatch_curvature`). One set of passes serves both the moments and
    the curvature of a probe (each micro-batch draws its dropout masks once)."""
    micro, b, B = split_batch(batch, parts)
    rows, graphs = [], [] if create_graph else None
    for mb in micro:
        gs = torch.autograd.grad(loss_fn(model, mb), params, create_graph=create_graph,
                                 allow_unused=True, materialize_grads=True)
        if create_graph:
            graphs.append(gs)
        rows.append(torch.cat([g.detach().reshape(-1) for g in gs]))
    return MicroGrads(torch.stack(rows), graphs, b, B)


def microbatch_noise(model, params, blocks, loss_fn, batch, parts):
    """tr Cov of the mini-batch mean gradient per block from ``parts`` micro-batches."""
    return microbatch_moments(model, params, blocks, loss_fn, batch, parts)[0]


def microbatch_moments(model, params, blocks, loss_fn, batch, parts, noise_batch_size=None, direction=None,
                       micro=None):
    r"""(noise, signal) per block from ``parts`` micro-batches: ``noise`` as
    :func:`microbatch_noise`; ``signal`` the unbiased estimate of :math:`\|E g\|^2`, the
    squared norm of the population mean gradient at these parameters:
    :math:`\sum_{i\in\mathrm{block}} (\bar g_i^2 - s_i^2/M)`, with :math:`\bar g` the mean of
    the M micro-batch gradients (over M·b examples). For i.i.d. examples
    :math:`E\bar g_i^2 = \mu_i^2 + \sigma_i^2/(Mb)` and :math:`E s_i^2 = \sigma_i^2/b`, so the
    bias :math:`\mathrm{tr\,Cov}(\bar g)` of the naive :math:`\|\bar g\|^2` cancels in
    expectation; a single estimate can be negative when the signal is small.
    ``noise_batch_size`` B' (default: the batch's B) reports the noise of a mean over B'
    examples instead, b·Σ s_i²/B' (a large probe batch estimating the training batch's noise).
    With a ``direction`` v (flat over all parameters; the network's top Ritz vector in
    :func:`probe`) also ``signal_top``: per block k the part of ‖E g_k‖² along the block's
    unit piece u_k = v_k/‖v_k‖, (E g_k·u_k)², estimated without bias by c̄² − s_c²/M from
    the micro-batch projections c_j = g_jk·u_k (same argument, one coordinate). Returns
    (noise, signal) or (noise, signal, signal_top). ``micro``: the passes, if already made
    (:func:`microbatch_gradients`)."""
    if micro is None:
        micro = microbatch_gradients(model, params, loss_fn, batch, parts)
    rows, b, B = micro.rows, micro.b, micro.B
    sizes = [p.numel() for p in params]
    # two-pass sample variance over the M rows; torch's var(dim=0) reduces across the short,
    # strided dimension some 20x slower on the CPU
    mean = rows.mean(0)
    dev = rows - mean
    var = dev.mul_(dev).sum(0).div_(parts - 1)
    unbiased_sq = mean ** 2 - var / parts

    def per_block(x):
        per_tensor = torch.stack([v.sum() for v in x.split(sizes)])
        return torch.stack([per_tensor[b_].sum() for b_ in blocks])

    noise, signal = per_block(var) * (b / (noise_batch_size or B)), per_block(unbiased_sq)
    if direction is None:
        return noise, signal
    offsets = np.cumsum([0] + sizes)
    top = []
    for blk in blocks:
        if list(blk) == list(range(blk[0], blk[0] + len(blk))):  # consecutive tensors: a slice
            cols = slice(int(offsets[blk[0]]), int(offsets[blk[-1] + 1]))
        else:
            cols = torch.cat([torch.arange(offsets[i], offsets[i + 1], device=rows.device) for i in blk])
        u = direction[cols]
        c = rows[:, cols] @ (u / u.norm()) if u.norm() > 0 else torch.zeros(parts, dtype=rows.dtype)
        top.append(c.mean() ** 2 - c.var(correction=1) / parts)
    return noise, signal, torch.stack(top)


CURVATURE_KEYS = ("grad_curv", "grad_curv_mean", "buffer_curv", "batch_sharpness")


def microbatch_curvature(model, params, blocks, loss_fn, batch, parts, noise_batch_size=None, buffer=None,
                         micro=None):
    r"""Curvature along the gradient and along the momentum buffer, per block, from ``parts``
    micro-batches (M ≥ 3) of b examples; what the link's one-step response model needs
    (:mod:`experiments.link_response`).

    With micro-batch gradients :math:`g_k` and Hessians :math:`H_k` (k = 0..M−1, independent
    draws; E g_k = m, E H_k = H) one Hessian-vector product per vector and micro-batch, on the
    micro-batch's own graph, gives per block l (indices mod M):

    * ``grad_curv`` :math:`E[g_{B,l}^\top (H g_B)_l]` for a mini-batch of B = ``noise_batch_size``
      (default M·b) examples. :math:`q_l = \mathrm{mean}_k\, g_{k+1,l}\cdot(H_k g_{k+1})_l` is
      unbiased for :math:`E[g_{b,l}^\top(Hg_b)_l] = m_l^\top(Hm)_l + \mathrm{tr}(H\Sigma)_{ll}/b`
      (H_k is independent of g_{k+1}); :math:`a_l = \mathrm{mean}_k\, g_{k+2,l}\cdot(H_k g_{k+1})_l`
      is unbiased for :math:`m_l^\top(Hm)_l` (three independent draws); the per-example
      covariance term scales as 1/B, so the estimate is :math:`a_l + (b/B)(q_l - a_l)`;
    * ``grad_curv_mean`` :math:`a_l`;
    * ``buffer_curv`` :math:`m_l^\top (H v)_l` with v = ``buffer`` (flat; the optimizer's
      momentum buffer), :math:`\mathrm{mean}_k\, g_{k+1,l}\cdot(H_k v)_l`; 0 without a buffer;
    * ``batch_sharpness`` at the micro-batch size b: :math:`\mathrm{mean}_k\,
      g_{k,l}^\top(H_k g_k)_l/\|g_{k,l}\|^2`, the layer's part of the mini-batch gradient's
      curvature along itself (Andreyev & Beneventano 2024, docs/theory.md §7); and
      ``batch_sharpness_global`` :math:`\mathrm{mean}_k\, g_k^\top H_k g_k/\|g_k\|^2`.

    Cost: per micro-batch one forward pass, a backward pass with graph and 2–3 double backward
    passes (about 3–4 forward-backward passes over the M·b examples in all). ``micro``: the
    passes with their graphs, if already made (:func:`microbatch_gradients` with
    ``create_graph``; :func:`probe` shares them with :func:`microbatch_moments`); each graph is
    freed once used, so they serve one call. Returns a
    dict of tensors over blocks plus the scalar ``batch_sharpness_global``."""
    if parts < 3:
        raise ValueError(f"noise_microbatches={parts} is outside the valid range [3, inf) for the "
                         f"curvature along the gradient (three independent micro-batches)")
    if micro is None:
        micro = microbatch_gradients(model, params, loss_fn, batch, parts, create_graph=True)
    elif micro.graphs is None or len(micro.graphs) != parts or any(g is None for g in micro.graphs):
        held = ("no graphs" if micro.graphs is None else
                f"{sum(g is not None for g in micro.graphs)} unused graphs of {len(micro.graphs)}")
        raise ValueError(f"micro holds {held}; valid: the {parts} unused graphs of "
                         f"microbatch_gradients(..., parts={parts}, create_graph=True)")
    grads, graphs, b, B = micro.rows, micro.graphs, micro.b, micro.B
    sizes = [p.numel() for p in params]
    dtype, device = grads.dtype, grads.device

    def hvp(gs, vec):
        outs = [(g, v.view_as(p)) for g, v, p in zip(gs, vec.split(sizes), params) if g.requires_grad]
        if not outs:
            return torch.zeros_like(vec)
        hv = torch.autograd.grad([o for o, _ in outs], params, [v for _, v in outs], retain_graph=True,
                                 allow_unused=True, materialize_grads=True)
        return torch.cat([h.reshape(-1) for h in hv])

    tensor_block = torch.full((len(sizes),), -1, dtype=torch.long)
    for j, blk in enumerate(blocks):
        tensor_block[list(blk)] = j
    elem_block = torch.repeat_interleave(tensor_block, torch.tensor(sizes)).to(device)
    keep = elem_block >= 0
    K = len(blocks)

    def per_block(x):  # elementwise products -> sums per block
        return torch.zeros(K, dtype=dtype, device=device).index_add_(0, elem_block[keep], x[keep])

    q = torch.zeros(K, dtype=dtype, device=device)
    a, c, bs = q.clone(), q.clone(), q.clone()
    bs_global = torch.zeros((), dtype=dtype, device=device)
    for k in range(parts):
        g1, g2 = grads[(k + 1) % parts], grads[(k + 2) % parts]
        h1 = hvp(graphs[k], g1)
        q += per_block(g1 * h1)
        a += per_block(g2 * h1)
        hk = hvp(graphs[k], grads[k])
        gk_sq = per_block(grads[k] ** 2)
        bs += torch.where(gk_sq > 0, per_block(grads[k] * hk) / gk_sq, torch.nan)
        bs_global += torch.dot(grads[k], hk) / torch.dot(grads[k], grads[k])
        if buffer is not None:
            c += per_block(g1 * hvp(graphs[k], buffer))
        graphs[k] = None  # free the micro-batch's graph (``micro``'s graphs are used up)
    q, a, c, bs = q / parts, a / parts, c / parts, bs / parts
    return {"grad_curv": a + (b / (noise_batch_size or B)) * (q - a), "grad_curv_mean": a,
            "buffer_curv": c, "batch_sharpness": bs, "batch_sharpness_global": bs_global / parts}


class ProbeResult(NamedTuple):
    """One probe's measurements: arrays over blocks (layers), floats for the whole network;
    NaN where that probe is switched off."""

    sharpness: np.ndarray  # λ_max(H_kk)
    hessian_trace: np.ndarray  # tr(H_kk), Hutchinson
    grad_noise: np.ndarray  # tr Cov of the mini-batch mean gradient
    grad_signal: np.ndarray  # ‖E g‖², unbiased
    grad_signal_top: np.ndarray  # its part along the network's top Ritz vector
    sharpness_steps: np.ndarray  # Lanczos steps used per block
    sharpness_global: float  # λ_max(H)
    sharpness_global_steps: float
    # with curvature=True (microbatch_curvature), else NaN
    grad_curv: np.ndarray = None  # E[g_l^T (H g)_l] at the training batch size
    grad_curv_mean: np.ndarray = None  # m_l^T (H m)_l
    buffer_curv: np.ndarray = None  # m_l^T (H b)_l, b the momentum buffer
    batch_sharpness: np.ndarray = None  # mean_k g_kl^T (H_k g_k)_l / |g_kl|^2 (micro-batch size)
    batch_sharpness_global: float = float("nan")


def probe(model, params, blocks, loss_fn, batch, *, state, iters=20, tol=1e-3,
          hutchinson_samples=1, microbatches=4, mode="train", noise_batch_size=None, curvature=False,
          buffer=None) -> ProbeResult:
    """All probes at the current parameters (:class:`ProbeResult`): block sharpness and
    Lanczos steps used, Hutchinson traces, gradient noise, signal and its part along the
    network's top Ritz vector (:func:`microbatch_moments`), and the network's sharpness.
    ``noise_batch_size``: see :func:`microbatch_moments`. With ``curvature`` (and
    ``microbatches`` ≥ 3) also the curvature along the gradient and along ``buffer`` (the
    optimizer's momentum buffer, flat over ``params``, or None) and the batch sharpness
    (:func:`microbatch_curvature`)."""
    K = len(blocks)
    nan = np.full(K, np.nan)
    out = dict(sharpness=nan, hessian_trace=nan.copy(), grad_noise=nan.copy(),
               grad_signal=nan.copy(), grad_signal_top=nan.copy(), sharpness_steps=nan.copy(), sharpness_global=np.nan,
               sharpness_global_steps=np.nan, batch_sharpness_global=np.nan)
    out.update({k: nan.copy() for k in CURVATURE_KEYS})
    with probe_context(model, mode):
        if iters > 0 or hutchinson_samples > 0:
            grads = first_order_graph(loss_fn(model, batch), params)
            if iters > 0:
                out["sharpness"], out["sharpness_global"], steps = block_sharpness(
                    grads, params, blocks, iters, state, tol=tol)
                out["sharpness_steps"], out["sharpness_global_steps"] = steps[:-1], steps[-1]
            if hutchinson_samples > 0:
                gen = state.generator(params[0].device)
                tr = hutchinson_block_traces(grads, params, blocks, hutchinson_samples, gen)
                out["hessian_trace"] = tr.detach().cpu().double().numpy()
            del grads
        if microbatches >= 2:  # one pass per micro-batch serves the moments and the curvature
            curvature = curvature and microbatches >= 3
            micro = microbatch_gradients(model, params, loss_fn, batch, microbatches, curvature)
            top_vector = state.vectors.get(("global",)) if iters > 0 else None
            moments = microbatch_moments(model, params, blocks, loss_fn, batch, microbatches,
                                         noise_batch_size, direction=top_vector, micro=micro)
            keys = ("grad_noise", "grad_signal", "grad_signal_top")
            out.update({k: m.detach().cpu().double().numpy() for k, m in zip(keys, moments)})
            if curvature:
                curv = microbatch_curvature(model, params, blocks, loss_fn, batch, microbatches,
                                            noise_batch_size, buffer, micro=micro)
                out.update({k: v.detach().cpu().double().numpy() for k, v in curv.items()})
            del micro
    out["batch_sharpness_global"] = float(out["batch_sharpness_global"])
    out["sharpness_global"] = float(out["sharpness_global"])
    return ProbeResult(**out)
