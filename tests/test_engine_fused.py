"""The fused engine's kernels (experiments.trace.fused) against float64 references.

Every statistic is a float64 sum of float32 values (products of two float32 values are exact in
float64), so it is within m·2⁻⁵³ of the exact value for m terms: rtol 1e-12 for the few
thousand terms here. Extrema and copies are exact (element values)."""

import math

import numpy as np
import pytest
import torch

from experiments.trace.engines import BACKWARD_STATS, STEP_STATS
from experiments.trace.fused import FusedEngine

RTOL = 1e-12
# tensor sizes and their layers: odd sizes, a 1-element tensor, an empty tensor beside a
# non-empty one (layer 1), a layer that is only an empty tensor (layer 3), a larger one
SHAPES = [(3, 5), (1,), (0,), (7, 3, 3), (0, 4), (1001,)]
LAYERS = [0, 1, 1, 2, 3, 2]


def make(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in SHAPES]
    return params, FusedEngine(params, LAYERS, block_size=4), g


def columns(engine, row):
    """{statistic: per-layer values} of a block row."""
    n, L = engine.n, engine.L
    out = {k: row[n + j * L:n + (j + 1) * L] for j, k in enumerate(BACKWARD_STATS)}
    out.update({k: row[engine.w_back + j * L:engine.w_back + (j + 1) * L] for j, k in enumerate(STEP_STATS)})
    out["norms"], out["loss"], out["global"] = row[:n], row[n + 4 * L], row[n + 4 * L + 1]
    return out


def per_layer(values, fn, empty):
    """fn over each layer's concatenated float64 values (``empty`` for a layer with none)."""
    out = []
    for l in range(max(LAYERS) + 1):
        x = np.concatenate([v for v, li in zip(values, LAYERS) if li == l])
        out.append(fn(x) if x.size else empty)
    return np.array(out)


def flat64(tensors):
    return [np.zeros(0) if t is None else t.detach().double().numpy().reshape(-1).copy() for t in tensors]


def layer_dots(xs, ys):
    """Per-layer ⟨x, y⟩ of per-tensor values."""
    return np.bincount(LAYERS, [x @ y for x, y in zip(xs, ys)], max(LAYERS) + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_statistic_matches_a_float64_reference_over_steps(dtype):
    params, e, gen = make(dtype)
    prev_g = prev_d = None
    for step in range(5):
        cur, row = step % 2, step % 4
        grads = [torch.randn(p.shape, generator=gen, dtype=dtype) * 10.0 ** (i - 2) for i, p in enumerate(params)]
        if step == 2:
            grads[0] = None  # unused this step: a zero gradient
        if step == 3:  # a non-contiguous gradient: read through a torch copy
            grads[3] = torch.randn(SHAPES[3][::-1], generator=gen, dtype=dtype).permute(2, 1, 0)
            assert not grads[3].is_contiguous()
        for p, g in zip(params, grads):
            p.grad = g
        g64 = [np.zeros(p.numel()) if g is None else x for p, g, x in zip(params, grads, flat64(grads))]
        before = flat64(params)
        norms, g_global = e.capture_gradients(cur)
        e.backward_stats(row, cur, norms, g_global, torch.tensor(0.25 * step))
        with torch.no_grad():  # an optimizer step
            for p in params:
                p.mul_(0.9).add_(torch.randn(p.shape, generator=gen, dtype=dtype), alpha=1e-3)
        e.step_stats(row, cur, 1 - cur)
        after = flat64(params)
        # −Δθ as the engine forms it: θ_before − θ_after in the parameters' dtype
        d64 = [(b.astype(e.Gn.dtype) - a.astype(e.Gn.dtype)).astype(np.float64) for b, a in zip(before, after)]
        c = columns(e, e.block[row])
        np.testing.assert_allclose(c["norms"], [np.sqrt((x ** 2).sum()) for x in g64], rtol=RTOL)
        assert list(norms.numpy()) == list(c["norms"])
        np.testing.assert_allclose(c["global"], np.sqrt(sum((x ** 2).sum() for x in g64)), rtol=RTOL)
        assert g_global == c["global"] and c["loss"] == 0.25 * step
        np.testing.assert_allclose(c["g_abs"], per_layer(g64, lambda x: np.abs(x).sum(), 0.0), rtol=RTOL)
        np.testing.assert_array_equal(c["g_max"], per_layer(g64, lambda x: np.abs(x).max(), math.nan))
        np.testing.assert_array_equal(c["g_min"], per_layer(g64, lambda x: np.abs(x).min(), math.nan))
        dots = layer_dots(g64, prev_g) if prev_g else np.zeros(e.L)  # G(t−1) starts at zero
        np.testing.assert_allclose(c["g_dot"], dots, rtol=RTOL)
        for key, x, fn in [("d_sq", d64, lambda x: x @ x), ("d_abs", d64, lambda x: np.abs(x).sum()),
                           ("p_sq", after, lambda x: x @ x), ("p_abs", after, lambda x: np.abs(x).sum())]:
            np.testing.assert_allclose(c[key], per_layer(x, fn, 0.0), rtol=RTOL, err_msg=key)
        dots = layer_dots(d64, prev_d) if prev_d else np.zeros(e.L)
        np.testing.assert_allclose(c["d_dot"], dots, rtol=RTOL)
        # the buffers now hold g(t) and −Δθ(t), exactly, for the next step's dot products
        for i, (o, m) in enumerate(zip(e.meta[0], e.meta[1])):
            np.testing.assert_array_equal(e.Gn[cur, o:o + m], g64[i])
            np.testing.assert_array_equal(e.Dn[cur, o:o + m], d64[i])
        prev_g, prev_d = g64, d64


def test_non_finite_gradients_propagate_like_numpy():
    params, e, _ = make()
    for i, p in enumerate(params):
        p.grad = torch.full(p.shape, 0.5 + i)
    params[0].grad[1, 2] = math.nan
    params[3].grad[0, 0, 0] = -math.inf
    e.capture_gradients(0)
    e.backward_stats(0, 0, None, None, None)
    c = columns(e, e.block[0])
    assert np.isnan(c["norms"][0]) and np.isnan(c["global"]) and np.isnan(c["loss"])
    assert np.isnan(c["g_max"][0]) and np.isnan(c["g_min"][0])  # numpy: NaN wins both
    assert c["g_max"][2] == math.inf and c["g_min"][2] == 3.5  # -inf: |g| = inf
    assert c["g_max"][1] == c["g_min"][1] == 1.5


def test_needs_contiguous_parameters_of_one_dtype():
    with pytest.raises(ValueError, match="engine='fused'"):
        FusedEngine([torch.zeros(3, 4).t()], [0], 2)
    with pytest.raises(ValueError, match="engine='fused'"):
        FusedEngine([torch.zeros(3), torch.zeros(3, dtype=torch.float64)], [0, 0], 2)


def test_auto_picks_fused_where_it_can_and_numpy_elsewhere():
    from experiments.trace.tracer import Tracer

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert Tracer(model, opt).engine == "fused"
    model[0].weight = torch.nn.Parameter(torch.randn(3, 4).t())  # not contiguous
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert Tracer(model, opt).engine == "numpy"
    with pytest.raises(ValueError, match="engine='fused' is not valid here.*contiguous"):
        Tracer(model, opt, engine="fused")
