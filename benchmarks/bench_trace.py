"""Tracer overhead on CPU, measured as ratios within one run (A/B alternated).

1. Every-step trace: the same model and optimizer train in alternating blocks of
   ``BLOCK`` steps with and without the tracer calls; ratio = traced / untraced time.
2. Probes every 100 steps: alternating 100-step blocks, one starting with a full probe
   (per-layer + global Lanczos sharpness, Hutchinson trace, micro-batch noise; the
   Tracer defaults) on top of the every-step trace, the other plain; plus the probe's
   cost alone, broken down, and the sharpness-only cost at smaller Lanczos budgets.

Seed CNN and MLP (experiments.models) on MNIST-1D, batch 32, SGD with momentum.
torch threads = 1 (the machine is shared; single-thread ratios are the conservative case:
the tracer's small ops do not parallelise, the model's matmuls would).

    .venv/bin/python benchmarks/bench_trace.py [--quick]
"""

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from experiments import sharpness
from experiments.data import load_data
from experiments.models import build_model
from experiments.trace import Tracer

BATCH, BLOCK = 32, 10


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


class Bench:
    def __init__(self, name, data, seed=0):
        torch.manual_seed(seed)
        self.model = build_model(name, data.info)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.tracer = Tracer(self.model, self.opt)
        self.x, self.y = data.x_train, data.y_train
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self):
        idx = torch.randint(0, len(self.y), (BATCH,), generator=self.gen)
        return self.x[idx], self.y[idx]

    def steps(self, n, traced, probe=False):
        t0 = time.perf_counter()
        for i in range(n):
            batch = self.batch()
            if probe and i == 0:
                self.tracer.probe(loss_fn, batch)
            self.opt.zero_grad(set_to_none=True)
            loss = loss_fn(self.model, batch)
            loss.backward()
            if traced:
                self.tracer.after_backward(loss)
            self.opt.step()
            if traced:
                self.tracer.after_step()
        return time.perf_counter() - t0


def alternate(bench, pairs, n, probe=False):
    """Total (traced, plain) seconds over ``pairs`` alternating blocks of ``n`` steps."""
    t = np.zeros((pairs, 2))
    for k in range(pairs):
        order = (0, 1) if k % 2 == 0 else (1, 0)  # alternate which arm goes first
        for arm in order:
            t[k, arm] = bench.steps(n, traced=arm == 0, probe=probe and arm == 0)
    return t.sum(0)


def probe_breakdown(bench, iters):
    """Seconds of each probe part at the current parameters (one call each)."""
    model, params = bench.model, bench.tracer.params
    blocks = [[i for i, li in enumerate(bench.tracer.tensor_layer) if li == k]
              for k in range(len(bench.tracer.layers))]
    batch, state = bench.batch(), sharpness.ProbeState(0)
    out = {}
    with sharpness.probe_context(model):
        t0 = time.perf_counter()
        grads = sharpness.first_order_graph(loss_fn(model, batch), params)
        out["graph"] = time.perf_counter() - t0
        for it in iters:
            t0 = time.perf_counter()
            sharpness.block_sharpness(grads, params, blocks, it, state, include_global=False)
            out[f"layers@{it}"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            sharpness.block_sharpness(grads, params, [], it, state)
            out[f"global@{it}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        sharpness.hutchinson_block_traces(grads, params, blocks, 1, state.generator("cpu"))
        out["hutchinson@1"] = time.perf_counter() - t0
    with sharpness.probe_context(model):
        t0 = time.perf_counter()
        sharpness.microbatch_noise(model, params, blocks, loss_fn, batch, 4)
        out["noise@4"] = time.perf_counter() - t0
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_data("mnist1d")
    pairs = 10 if args.quick else 40
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU, batch {BATCH}")
    for name in ("seed-cnn", "mlp"):
        bench = Bench(name, data)
        bench.steps(20, traced=True)  # warm-up both paths
        bench.steps(20, traced=False)
        n_params = sum(p.numel() for p in bench.tracer.params)
        traced, plain = alternate(bench, pairs, BLOCK)
        step = plain / (pairs * BLOCK)
        print(f"\n{name}: {n_params} parameters in {len(bench.tracer.layers)} layers, "
              f"untraced step {1e3 * step:.2f} ms")
        print(f"  every-step trace / no tracer: {traced / plain:.3f}x "
              f"({pairs} x {BLOCK} steps per arm)")
        probe_pairs = 2 if args.quick else 3
        traced, plain = alternate(bench, probe_pairs, 100, probe=True)
        print(f"  trace + full probe every 100 steps / no tracer: {traced / plain:.3f}x "
              f"({probe_pairs} x 100 steps per arm)")
        parts = probe_breakdown(bench, iters=(5, 10, 20))
        per100 = 100 * step
        print("  probe parts, in units of 100 untraced steps (= amortised overhead at "
              "probe_every=100):")
        for k, v in parts.items():
            print(f"    {k:>14}: {v / per100:.3f}   ({1e3 * v:.1f} ms)")
        full = parts["graph"] + parts["layers@20"] + parts["global@20"] + parts["hutchinson@1"]
        print(f"    sharpness-only ratio at probe_every=100, 20 iters: {1 + full / per100:.3f}x;"
              f" 5 iters: {1 + (full - parts['layers@20'] - parts['global@20'] + parts['layers@5'] + parts['global@5']) / per100:.3f}x")


if __name__ == "__main__":
    main()
