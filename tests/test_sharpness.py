"""Probes against dense references: the Hessian from torch.autograd.functional.hessian,
per-example gradients from a loop, and an analytic gradient covariance (linear regression)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from experiments.trace import probes as sharpness
from experiments.trace.tracer import Tracer


class Net(nn.Module):
    def __init__(self, bn=False, dropout=0.0):
        super().__init__()
        self.l1 = nn.Linear(5, 8)
        self.bn = nn.BatchNorm1d(8) if bn else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.l2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.l2(self.drop(torch.tanh(self.bn(self.l1(x)))))


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g))


def dense_hessian(model, batch):
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    sizes = [p.numel() for p in params]

    def f(flat):
        parts = [v.view_as(p) for v, p in zip(flat.split(sizes), params)]
        out = torch.func.functional_call(model, dict(zip(names, parts)), (batch[0],))
        return F.cross_entropy(out, batch[1])

    H = torch.autograd.functional.hessian(f, torch.cat([p.reshape(-1) for p in params]))
    return H.numpy(), np.cumsum([0] + sizes)


def block_slices(offsets, blocks):
    return [np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in b]) for b in blocks]


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("bn", [False, True])
def test_sharpness_matches_dense_hessian_per_block_and_global(per_tensor, bn):
    torch.manual_seed(0)
    model = Net(bn=bn).double()
    batch = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # default budget of 20 Lanczos steps on blocks of up to 72 (global 75) dimensions
    tracer = Tracer(model, opt, per_tensor=per_tensor, hutchinson_samples=0,
                    noise_microbatches=0)
    ds_probe = tracer.probe(loss_fn, batch)
    H, off = dense_hessian(model, batch)
    blocks = [[i for i, li in enumerate(tracer.tensor_layer) if li == k]
              for k in range(len(tracer.layers))]
    expect = [np.linalg.eigvalsh(H[np.ix_(s, s)])[-1] for s in block_slices(off, blocks)]
    top = np.linalg.eigvalsh(H)[-1]
    # rtol 1e-3; blocks with an exactly zero Hessian (l1.bias under BatchNorm) are measured
    # against the operator's scale instead (atol 1e-3·λ_max(H))
    tol = dict(rtol=1e-3, atol=1e-3 * top)
    np.testing.assert_allclose(ds_probe.sharpness, expect, **tol)
    np.testing.assert_allclose(ds_probe.sharpness_global, top, rtol=1e-3)
    ds = tracer.dataset()
    np.testing.assert_allclose(ds.sharpness.sel(probe_step=0), expect, **tol)


def test_warm_start_converges_with_a_small_budget():
    torch.manual_seed(1)
    model = Net().double()
    batch = data()
    H, _ = dense_hessian(model, batch)
    top = np.linalg.eigvalsh(H)[-1]
    errors = {}
    for warm in (False, True):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        tracer = Tracer(model, opt, sharpness_iters=3, hutchinson_samples=0,
                        noise_microbatches=0, seed=3)
        if warm:  # a converged previous probe (same parameters) seeds the next one
            tracer.sharpness_iters = 40
            tracer.probe(loss_fn, batch)
            tracer.sharpness_iters = 3
        errors[warm] = abs(tracer.probe(loss_fn, batch).sharpness_global / top - 1)
    assert errors[True] < 1e-3 < errors[False]


def test_lanczos_finds_largest_algebraic_eigenvalue_and_survives_breakdown():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    evals = torch.tensor([-9.0, 2.5, 2.0] + [0.1 * i for i in range(9)], dtype=torch.float64)
    A = Q @ torch.diag(evals) @ Q.T  # |−9| dominates: power iteration would return −9
    Z = torch.zeros(5, 5, dtype=torch.float64)  # breakdown at the first step
    ops = [A, Z, torch.diag(torch.arange(30.0, dtype=torch.float64))]
    starts = [torch.randn(m.shape[0], generator=g, dtype=torch.float64) for m in ops]
    values, vectors, steps = sharpness.lanczos_top(lambda vs: {k: ops[k] @ v for k, v in vs.items()},
                                            starts, iters=12, generator=g)
    # iters >= dim for the first two: exact to roundoff; 12 steps on diag(0..29): Kaniel-Paige
    np.testing.assert_allclose(values[:2], [2.5, 0.0], atol=1e-10)
    np.testing.assert_allclose(values[2], 29.0, rtol=1e-3)
    for v, m, lam in zip(vectors, ops, values):
        assert torch.isfinite(v).all()
        np.testing.assert_allclose((m @ v).norm().item(), abs(lam), rtol=1e-2, atol=1e-8)


def test_lanczos_early_stop_meets_its_tolerance():
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    evals = torch.cat([torch.tensor([10.0, 5.0], dtype=torch.float64),
                       torch.rand(198, generator=g, dtype=torch.float64)])
    A = Q @ torch.diag(evals) @ Q.T
    start = torch.randn(200, generator=g, dtype=torch.float64)
    mv = lambda vs: {k: A @ v for k, v in vs.items()}  # noqa: E731
    full, _, steps_full = sharpness.lanczos_top(mv, [start], iters=40, generator=g)
    early, vec, steps = sharpness.lanczos_top(mv, [start], iters=40, generator=g, tol=1e-3)
    assert steps_full[0] == 40 and steps[0] < 40  # a gap of 2x converges fast
    # residual bound: |θ − λ| ≤ ‖Ax − θx‖ ≤ tol·|θ|
    assert abs(early[0] - 10.0) <= 1e-3 * 10.0
    assert (A @ vec[0] - early[0] * vec[0]).norm() <= 1e-3 * 10.0 * (1 + 1e-9)
    np.testing.assert_allclose(full[0], 10.0, rtol=1e-12)


def test_hutchinson_block_traces_are_unbiased():
    torch.manual_seed(2)
    model = Net().double()
    batch = data()
    params = list(model.parameters())
    blocks = [[0, 1], [2, 3]]
    H, off = dense_hessian(model, batch)
    grads = sharpness.first_order_graph(loss_fn(model, batch), params)
    S = 1500
    est = sharpness.hutchinson_block_traces(grads, params, blocks, S,
                                            torch.Generator().manual_seed(0)).numpy()
    for k, s in enumerate(block_slices(off, blocks)):
        P = np.zeros(len(H))
        P[s] = 1
        A = (P[:, None] * H + H * P[None, :]) / 2  # z_kᵀ(Hz)_k = zᵀ A z
        var = 2 * (np.sum(A ** 2) - np.sum(np.diag(A) ** 2))  # Rademacher quadratic form
        # a mean of S i.i.d. samples: 5 standard errors (false alarm ~ 6e-7)
        assert abs(est[k] - np.trace(H[np.ix_(s, s)])) < 5 * np.sqrt(var / S)
        assert var > 0


@pytest.mark.parametrize("B", [12, 14])
def test_noise_estimator_matches_per_example_computation(B):
    torch.manual_seed(3)
    model = Net().double()
    batch = data(B)
    params = list(model.parameters())
    blocks = [[0, 1], [2], [3]]
    M = 4
    got = sharpness.microbatch_noise(model, params, blocks, loss_fn, batch, M).numpy()
    per_example = []
    for e in range(B):
        gs = torch.autograd.grad(loss_fn(model, (batch[0][e:e + 1], batch[1][e:e + 1])), params)
        per_example.append([g.reshape(-1) for g in gs])
    b = B // M  # the remainder (B=14: 2 examples) is dropped
    for k, blk in enumerate(blocks):
        micro = []
        for j in range(M):
            rows = [torch.cat([per_example[e][i] for i in blk]) for e in range(j * b, (j + 1) * b)]
            micro.append(torch.stack(rows).mean(0))
        micro = torch.stack(micro)
        s2 = ((micro - micro.mean(0)) ** 2).sum(0) / (M - 1)  # unbiased sample variance
        np.testing.assert_allclose(got[k], (b / B) * s2.sum().item(), rtol=1e-10)


def test_noise_estimator_is_unbiased_for_the_batch_gradient_covariance():
    """Linear regression at fixed w, x ~ N(0, I_d), y ~ N(0, s²): the per-example gradient
    g = (wᵀx − y)x has Cov = (‖w‖² + s²)I + wwᵀ (Isserlis), so tr Cov(ĝ_B) =
    (d(‖w‖² + s²) + ‖w‖²)/B."""
    d, B, M, R, s = 6, 32, 4, 300, 0.5
    torch.manual_seed(4)
    model = nn.Linear(d, 1, bias=False).double()
    w2 = model.weight.detach().pow(2).sum().item()
    expected = (d * (w2 + s ** 2) + w2) / B
    mse = lambda m, b: 0.5 * (m(b[0]).squeeze(1) - b[1]).pow(2).mean()  # noqa: E731
    g = torch.Generator().manual_seed(5)
    est = []
    for _ in range(R):
        x = torch.randn(B, d, generator=g, dtype=torch.float64)
        y = s * torch.randn(B, generator=g, dtype=torch.float64)
        est.append(sharpness.microbatch_noise(model, list(model.parameters()), [[0]], mse,
                                              (x, y), M).item())
    est = np.array(est)
    # mean of R i.i.d. estimates: 5 standard errors
    assert abs(est.mean() - expected) < 5 * est.std(ddof=1) / np.sqrt(R)
    assert abs(est.mean() / expected - 1) < 0.2  # and the test has power


def test_probe_restores_buffers_rng_grads_and_modes_and_eval_mode_matches_dense():
    torch.manual_seed(6)
    model = Net(bn=True, dropout=0.5).double()
    batch = data()
    loss_fn(model, batch).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.bn.eval()  # a submodule in its own mode must stay so
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    rng = torch.get_rng_state()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracer = Tracer(model, opt, probe_mode="eval", sharpness_iters=40, hutchinson_samples=2)
    out = tracer.probe(loss_fn, batch)
    assert torch.equal(rng, torch.get_rng_state())
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    for g, p in zip(grads, model.parameters()):
        assert torch.equal(g, p.grad)
    assert model.training and model.drop.training and not model.bn.training
    model.eval()  # eval mode: dropout off, running statistics: the dense reference
    H, _ = dense_hessian(model, batch)
    np.testing.assert_allclose(out.sharpness_global, np.linalg.eigvalsh(H)[-1], rtol=1e-3)
    assert np.isfinite(out.grad_noise).all() and np.isfinite(out.hessian_trace).all()


def test_split_batch_nested_and_errors():
    x, y = torch.arange(10.0), torch.arange(10)
    parts, b, B = sharpness.split_batch({"x": x, "pair": (x, [y])}, 3)
    assert (b, B) == (3, 10) and len(parts) == 3
    assert torch.equal(parts[2]["pair"][1][0], torch.tensor([6, 7, 8]))
    with pytest.raises(ValueError, match="noise_microbatches=11"):
        sharpness.split_batch(x, 11)
    with pytest.raises(ValueError, match="common batch size"):
        sharpness.split_batch((x, y[:3]), 2)


def test_signal_estimator_is_unbiased_for_the_mean_gradient_and_the_naive_one_is_not():
    """Linear regression at fixed w, x ~ N(0, I_d), y ~ N(0, s²) independent of x: the
    population mean gradient is E[(wᵀx − y)x] = w, so ‖E g‖² = ‖w‖² and its part along a
    unit u is (w·u)². The naive ‖ḡ‖² is biased up by tr Cov(ḡ) = (d(‖w‖² + s²) + ‖w‖²)/B."""
    d, B, M, R, s = 6, 32, 4, 300, 0.5
    torch.manual_seed(4)
    model = nn.Linear(d, 1, bias=False).double()
    w = model.weight.detach().reshape(-1)
    u = torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u = u / u.norm()
    mse = lambda m, b: 0.5 * (m(b[0]).squeeze(1) - b[1]).pow(2).mean()  # noqa: E731
    g = torch.Generator().manual_seed(5)
    est, top, naive = [], [], []
    for _ in range(R):
        x = torch.randn(B, d, generator=g, dtype=torch.float64)
        y = s * torch.randn(B, generator=g, dtype=torch.float64)
        _, signal, signal_top = sharpness.microbatch_moments(model, list(model.parameters()), [[0]], mse,
                                                             (x, y), M, direction=2.0 * u)  # any scale
        est.append(signal.item())
        top.append(signal_top.item())
        naive.append(torch.autograd.grad(mse(model, (x, y)), model.weight)[0].pow(2).sum().item())
    est, top, naive = map(np.array, (est, top, naive))
    w2, wu2 = w.pow(2).sum().item(), (w @ u).item() ** 2
    # means of R i.i.d. estimates: 5 standard errors (false alarm ~ 6e-7 each)
    assert abs(est.mean() - w2) < 5 * est.std(ddof=1) / np.sqrt(R)
    assert abs(top.mean() - wu2) < 5 * top.std(ddof=1) / np.sqrt(R)
    bias = (d * (w2 + s ** 2) + w2) / B
    assert abs(naive.mean() - w2 - bias) < 5 * naive.std(ddof=1) / np.sqrt(R)
    assert naive.mean() - w2 > 5 * naive.std(ddof=1) / np.sqrt(R)  # the bias the estimator removes is visible


def test_signal_plus_noise_bias_is_the_squared_mean_of_the_microbatch_gradients():
    """Per element ḡ² = (ḡ² − s²/M) + s²/M exactly: the identity behind the estimator."""
    torch.manual_seed(7)
    model = Net().double()
    batch = data(24)
    params = list(model.parameters())
    M, blocks = 4, [[0, 1], [2], [3]]
    noise, signal = sharpness.microbatch_moments(model, params, blocks, loss_fn, batch, M)
    full = torch.autograd.grad(loss_fn(model, batch), params)  # mean over 24 = mean of 4 x 6
    for k, blk in enumerate(blocks):
        sq = sum(full[i].pow(2).sum().item() for i in blk)
        # noise is for the 24-example mean: (b/B) Σ s² = Σ s² / M
        np.testing.assert_allclose(signal[k].item() + noise[k].item(), sq, rtol=1e-9)
