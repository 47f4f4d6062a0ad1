"""Tracer overhead on CPU, measured as ratios within one run (A/B alternated).

1. Every-step trace: one model and optimizer train in alternating blocks of ``BLOCK`` steps
   with the four manual tracer calls, without a tracer, and with the tracer attached
   (``Tracer.attach``: hooks on the optimizer's step and the gradients, plus
   ``record_loss``); the arms' order rotates; ratio = traced / untraced CPU time per arm.
2. Probes every 100 steps: alternating 100-step blocks, the traced one starting with a full
   probe (per-layer + global Lanczos sharpness, one Hutchinson sample, 4 micro-batches of
   gradient noise), warm-started Lanczos with the default early stop (Ritz residual
   <= 1e-3 |λ|) within a budget of 20 steps, and within 5; reported with the mean number of
   steps used and the largest relative error of the sharpness (all layers and global)
   against a converged (60-step, cold) Lanczos run at the same parameters (not timed).
3. The probe's curvature along the gradient and the momentum buffer (``probe_curvature``,
   issue 16): the same probe with and without it, alternated at the same parameters (and
   the same warm start), with 4 and with 16 micro-batches; ratio = with / without CPU time.

Seed CNN and MLP (experiments.runs.models defaults) on MNIST-1D, batch 32, SGD with momentum 0.9.
Single-threaded: torch threads = 1 and OPENBLAS/OMP/MKL threads = 1 (set before numpy is
imported), times are this process's CPU time (``time.process_time``), so other processes
on a shared machine disturb the ratios less (they still compete for caches and memory
bandwidth, which the tracer's memory-bound work feels more than the model's compute).

With ``--baseline REV`` parts 1 and 2 also measure "before" in the same run, with the engines,
hooks and probes of git revision REV (experiments/trace/{engines,hooks,probes}.py read with
``git show``), so that before and after share the machine's load: part 1 gets the same tracer
on REV's engine (manual calls, and attached with REV's hooks) as two more rotating arms; in
part 2 every probe is also run by REV's probes at the same parameters from the same warm
start (the order alternating), and "before" is the traced arm with that probe's CPU time in
place of this one's.

    .venv/bin/python benchmarks/bench_trace.py [--quick] [--every-step-only] [--baseline REV]
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from experiments.trace import probes as sharpness  # noqa: E402
from experiments.runs.data import load_data  # noqa: E402
from experiments.runs.models import build_model  # noqa: E402
from experiments.trace.tracer import Tracer  # noqa: E402

BATCH, BLOCK = 32, 10


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def load_baseline(rev):
    """{name: module} for experiments/trace/{engines,hooks,probes}.py at git revision ``rev``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mods = {}
    for name in ("engines", "hooks", "probes"):
        path = f"experiments/trace/{name}.py"
        src = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True,
                             text=True, check=True).stdout
        mod = importlib.util.module_from_spec(importlib.util.spec_from_loader(f"baseline_{name}", None))
        exec(compile(src, f"{rev}:{path}", "exec"), mod.__dict__)
        mods[name] = mod
    return mods


class Bench:
    def __init__(self, name, data, seed=0, baseline=None, **tracer_kw):
        torch.manual_seed(seed)
        self.model = build_model(name, data.info)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.tracer = Tracer(self.model, self.opt, **tracer_kw)
        self.x, self.y = data.x_train, data.y_train
        self.gen = torch.Generator().manual_seed(seed)
        self.errors = []
        self.probe_cpu = 0.0
        self.base, self.base_tracer, self.base_probe_cpu, self.n_probes = baseline, None, 0.0, 0
        if baseline is not None:  # the same tracer on the baseline's engine, hooks and probes
            tr = self.base_tracer = Tracer(self.model, self.opt, **tracer_kw)
            engine = getattr(baseline["engines"], type(tr._engine).__name__)
            tr._engine = engine(tr.params, tr.tensor_layer, tr.block_size)
            self.base_state = baseline["probes"].ProbeState(tr.seed)

    def probes(self, batch):
        """The tracer's probe (CPU time added to ``probe_cpu``) and, with a baseline, the
        baseline's probe at the same parameters from the same warm start (CPU time added to
        ``base_probe_cpu``; the order alternates). Returns the baseline's CPU time (not part of
        the arm's time)."""
        saved = dict(self.tracer._probe_state.vectors)
        spent = [0.0, 0.0]
        self.n_probes += 1
        order = (0, 1) if self.n_probes % 2 else (1, 0)
        for arm in (0,) if self.base is None else order:
            if arm == 1:
                self.base_state.vectors = dict(saved)
            p0 = time.process_time()
            self.base_probe(batch) if arm == 1 else self.tracer.probe(loss_fn, batch)
            spent[arm] = time.process_time() - p0
        self.probe_cpu += spent[0]
        self.base_probe_cpu += spent[1]
        return spent[1]

    def base_probe(self, batch):
        """One probe by the baseline's probes (``--baseline``)."""
        tr = self.base_tracer
        blocks = [[i for i, li in enumerate(tr.tensor_layer) if li == k] for k in range(len(tr.layers))]
        return self.base["probes"].probe(
            self.model, tr.params, blocks, loss_fn, batch, state=self.base_state,
            iters=tr.sharpness_iters, tol=tr.sharpness_tol, hutchinson_samples=tr.hutchinson_samples,
            microbatches=tr.noise_microbatches, mode=tr.probe_mode)

    def batch(self):
        idx = torch.randint(0, len(self.y), (BATCH,), generator=self.gen)
        return self.x[idx], self.y[idx]

    def steps(self, n, traced, probe=False, check=False, hooked=False, base=False):
        """CPU seconds of n training steps (the accuracy check is not timed). ``hooked``: the
        tracer attached for these steps (attach/detach not timed) instead of the manual calls.
        ``base``: the baseline's tracer (``--baseline``) instead of this one."""
        tracer = self.base_tracer if base else self.tracer
        if hooked:
            return self.hooked_steps(n, tracer, base)
        spent = 0.0
        for i in range(n):
            batch = self.batch()
            if probe and i == 0 and check and not base:
                self.errors.append(self.sharpness_error(batch))
            t0 = time.process_time()
            if probe and i == 0:
                spent -= self.probes(batch)
            self.opt.zero_grad(set_to_none=True)
            loss = loss_fn(self.model, batch)
            loss.backward()
            if traced:
                tracer.after_backward(loss)
            self.opt.step()
            if traced:
                tracer.after_step()
            spent += time.process_time() - t0
        return spent

    def hooked_steps(self, n, tracer, base=False):
        if base:  # the baseline's hooks on this tracer
            tracer._hooks = self.base["hooks"].Hooks(tracer)
        else:
            tracer.attach()
        spent = 0.0
        for _ in range(n):
            batch = self.batch()
            t0 = time.process_time()
            self.opt.zero_grad(set_to_none=True)
            loss = loss_fn(self.model, batch)
            loss.backward()
            tracer.record_loss(loss)
            self.opt.step()
            spent += time.process_time() - t0
        tracer.detach()
        return spent

    def sharpness_error(self, batch):
        """Relative error of the warm-started probe's sharpness (per layer and global) against
        a converged cold Lanczos run at the same parameters; restores the probe's state."""
        tr = self.tracer
        blocks = [[i for i, li in enumerate(tr.tensor_layer) if li == k]
                  for k in range(len(tr.layers))]
        saved = dict(tr._probe_state.vectors)
        with sharpness.probe_context(self.model):
            grads = sharpness.first_order_graph(loss_fn(self.model, batch), tr.params)
            ref, ref_g, _ = sharpness.block_sharpness(grads, tr.params, blocks, 60,
                                                      sharpness.ProbeState(1))
            est, est_g, _ = sharpness.block_sharpness(grads, tr.params, blocks,
                                                      tr.sharpness_iters, tr._probe_state,
                                                      tol=tr.sharpness_tol)
        tr._probe_state.vectors = saved  # the timed probe starts from the same state
        return np.abs(np.append(est, est_g) / np.append(ref, ref_g) - 1).max()


def alternate(bench, pairs, n, probe=False, check=False):
    """Total CPU seconds (traced, plain) over ``pairs`` alternating blocks of ``n`` steps."""
    t = np.zeros((pairs, 2))
    for k in range(pairs):
        for arm in ((0, 1) if k % 2 == 0 else (1, 0)):
            t[k, arm] = bench.steps(n, traced=arm == 0, probe=probe and arm == 0,
                                    check=check)
    return t.sum(0)


def rotate(bench, rounds, n):
    """Total CPU seconds (manual calls, no tracer, attached[, baseline manual, baseline
    attached]) over ``rounds`` rounds of one ``n``-step block per arm, the order rotating."""
    arms = [dict(traced=True), dict(traced=False), dict(traced=True, hooked=True)]
    if bench.base is not None:
        arms += [dict(traced=True, base=True), dict(traced=True, hooked=True, base=True)]
    t = np.zeros((rounds, len(arms)))
    for k in range(rounds):
        for a in np.roll(np.arange(len(arms)), k):
            t[k, a] = bench.steps(n, **arms[a])
    return t.sum(0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--curvature-only", action="store_true", help="only part 3 (probe_curvature's cost)")
    parser.add_argument("--every-step-only", action="store_true", help="skip the probe benchmarks")
    parser.add_argument("--baseline", metavar="REV", help="add before arms: the engines, hooks and "
                        "probes of this git revision")
    args = parser.parse_args()
    base = load_baseline(args.baseline) if args.baseline else None
    torch.set_num_threads(1)
    data = load_data("mnist1d")
    pairs, probe_pairs = (10, 2) if args.quick else (40, 4)
    if args.every_step_only:
        probe_pairs = 0
    print(f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
          f"BLAS threads {os.environ['OPENBLAS_NUM_THREADS']}, CPU, batch {BATCH}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for name in ("seed-cnn", "mlp"):
        if args.curvature_only:
            print(name)
            curvature_cost(name, data, 2 if args.quick else 6)
            continue
        bench = Bench(name, data, baseline=base)
        bench.steps(20, traced=True)  # warm-up both paths
        bench.steps(20, traced=False)
        bench.steps(20, traced=True, hooked=True)
        if base is not None:
            bench.steps(20, traced=True, base=True)
            bench.steps(20, traced=True, hooked=True, base=True)
        traced, plain, hooked, *before = rotate(bench, pairs, BLOCK)
        n_params = sum(p.numel() for p in bench.tracer.params)
        print(f"\n{name}: {n_params} parameters in {len(bench.tracer.layers)} layers, "
              f"untraced step {1e3 * plain / (pairs * BLOCK):.2f} ms CPU "
              f"(tracer engine {bench.tracer.engine})")
        print(f"  every-step trace / no tracer:                {traced / plain:.3f}x "
              f"({pairs} x {BLOCK} steps per arm)")
        print(f"  every-step trace attached (hooks) / no tracer: {hooked / plain:.3f}x "
              f"(hooked / manual calls {hooked / traced:.3f}x)")
        if before:
            print(f"  before ({args.baseline}): manual {before[0] / plain:.3f}x, attached "
                  f"{before[1] / plain:.3f}x (hooked / manual calls {before[1] / before[0]:.3f}x)")
        for iters in ((20, 5) if probe_pairs else ()):
            bench = Bench(name, data, baseline=base, sharpness_iters=iters)
            bench.steps(20, traced=True, probe=True)  # first probe: a cold start, untimed
            bench.probe_cpu = bench.base_probe_cpu = 0.0
            traced, plain = alternate(bench, probe_pairs, 100, probe=True, check=True)
            ds = bench.tracer.dataset()
            used = np.concatenate([ds.sharpness_steps.values.ravel(),
                                   ds.sharpness_global_steps.values])
            print(f"  trace + probe every 100 steps, <= {iters:2d} Lanczos steps: "
                  f"{traced / plain:.3f}x (the probe alone: {1 + bench.probe_cpu / plain:.3f}x; "
                  f"{probe_pairs} x 100 steps per arm; "
                  f"{ds.attrs['probe_seconds'] / (probe_pairs + 1):.2f} s wall per probe; "
                  f"{used.mean():.1f} steps used on average; sharpness within "
                  f"{100 * max(bench.errors):.2g} % of converged)")
            if base is not None:  # the same steps with the baseline's probe in place of this one
                print(f"    before ({args.baseline}), same parameters and warm starts: "
                      f"{(traced - bench.probe_cpu + bench.base_probe_cpu) / plain:.3f}x (the probe "
                      f"alone: {1 + bench.base_probe_cpu / plain:.3f}x)")

        if not args.every_step_only:
            curvature_cost(name, data, 2 if args.quick else 6)


def curvature_cost(name, data, pairs):
    """CPU time of the probe with ``probe_curvature`` / without, alternated at fixed parameters."""
    for micro in (4, 16):
        bench = Bench(name, data, noise_microbatches=micro)
        bench.steps(20, traced=True)
        tr = bench.tracer
        tr.probe(loss_fn, bench.batch())  # warm start
        saved = dict(tr._probe_state.vectors)
        t = np.zeros(2)
        for k in range(pairs):
            batch = bench.batch() if micro == 4 else tuple(torch.cat([x] * 4) for x in bench.batch())
            for arm in ((0, 1) if k % 2 == 0 else (1, 0)):
                tr._probe_state.vectors = dict(saved)
                tr.probe_curvature = arm == 0
                t0 = time.process_time()
                tr.probe(loss_fn, batch, noise_batch_size=BATCH)
                t[arm] += time.process_time() - t0
        print(f"  probe with / without probe_curvature, {micro:2d} micro-batches of "
              f"{BATCH * (1 if micro == 4 else 4) // micro}: {t[0] / t[1]:.3f}x ({pairs} probes per arm)")


if __name__ == "__main__":
    main()
