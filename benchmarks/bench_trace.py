"""Tracer overhead on CPU, measured as ratios within one run (A/B alternated).

(On a GPU, by wall clock: benchmarks/bench_trace_device.py.)

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
   the same warm start), with 4 and with 16 micro-batches; ratio = with / without CPU time
   (with ``--baseline REV``, also this probe with curvature / REV's with curvature).
4. ``--profile``: where the time goes, per phase of a traced step and per part of a probe
   (:func:`profile`).
5. ``--tol-sweep``: Lanczos steps and sharpness error per early-stop tolerance
   (:func:`tolerance_sweep`), seed CNN and MLP, seeds 0 and 1.
6. ``--probe-floor``: the probe's inherent parts (HVPs, first-order graph, micro-batch passes)
   timed inside part 2's probe sequence (:func:`probe_floor`).

Seed CNN and MLP (experiments.runs.models defaults) on MNIST-1D, batch 32, SGD with momentum 0.9.
Single-threaded: torch threads = 1 and OPENBLAS/OMP/MKL threads = 1 (set before numpy is
imported), times are this process's CPU time (``time.process_time``), so other processes
on a shared machine disturb the ratios less (they still compete for caches and memory
bandwidth, which the tracer's memory-bound work feels more than the model's compute).

With ``--baseline REV`` parts 1 and 2 also measure "before" in the same run, with the engines,
hooks and probes of git revision REV (experiments/trace/{engines,fused,hooks,probes}.py read
with ``git show``; REV's numpy engine where REV has no fused one), so that before and after share the machine's load: part 1 gets the same tracer
on REV's engine (manual calls, and attached with REV's hooks) as two more rotating arms; in
part 2 every probe is also run by REV's probes at the same parameters from the same warm
start (the order alternating), and "before" is the traced arm with that probe's CPU time in
place of this one's.

    .venv/bin/python benchmarks/bench_trace.py [--quick] [--every-step-only | --probe-only]
        [--probe-pairs N] [--sharpness-tol TOL] [--baseline REV]
    .venv/bin/python benchmarks/bench_trace.py --profile | --tol-sweep | --curvature-only
    .venv/bin/python benchmarks/bench_trace.py --probe-floor [--probe-pairs N]
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import atexit  # noqa: E402
import importlib.util  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
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
    """{name: module} for experiments/trace/{engines,fused,hooks,probes}.py at git revision
    ``rev`` (fused only where ``rev`` has it), written as the package ``baseline_trace`` into a
    temporary directory (numba caches compiled kernels next to a real file), their imports of
    each other redirected there."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tmp = tempfile.mkdtemp(prefix="bench_trace_baseline_")
    atexit.register(shutil.rmtree, tmp, True)
    os.makedirs(os.path.join(tmp, "baseline_trace"))
    open(os.path.join(tmp, "baseline_trace", "__init__.py"), "w").close()
    names = []
    for name in ("engines", "fused", "hooks", "probes"):
        out = subprocess.run(["git", "show", f"{rev}:experiments/trace/{name}.py"], cwd=root,
                             capture_output=True, text=True, check=name != "fused")
        if out.returncode == 0:
            with open(os.path.join(tmp, "baseline_trace", f"{name}.py"), "w") as f:
                f.write(out.stdout.replace("experiments.trace.", "baseline_trace."))
            names.append(name)
    sys.path.insert(0, tmp)
    return {name: importlib.import_module(f"baseline_trace.{name}") for name in names}


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
        self.base_diff, self.base_same_steps = {}, True  # this probe's values against the baseline's
        if baseline is not None:  # the same tracer on the baseline's engine, hooks and probes
            tr = self.base_tracer = Tracer(self.model, self.opt, **tracer_kw)
            kernels = {**vars(baseline["engines"]), **vars(baseline.get("fused", baseline["engines"]))}
            name = type(tr._engine).__name__
            if name not in kernels:  # no compiled engine there: its CPU default, under no_grad
                name, tr.engine, tr._no_grad = "NumpyEngine", "numpy", torch.no_grad()
            tr._engine = kernels[name](tr.params, tr.tensor_layer, tr.block_size)
            self.base_state = baseline["probes"].ProbeState(tr.seed)

    def probes(self, batch):
        """The tracer's probe (CPU time added to ``probe_cpu``) and, with a baseline, the
        baseline's probe at the same parameters from the same warm start (CPU time added to
        ``base_probe_cpu``; the order alternates). Returns the baseline's CPU time (not part of
        the arm's time)."""
        state = self.tracer._probe_state
        saved, rng = dict(state.vectors), state.generator(self.tracer.device).get_state()
        spent, out = [0.0, 0.0], [None, None]
        self.n_probes += 1
        order = (0, 1) if self.n_probes % 2 else (1, 0)
        for arm in (0,) if self.base is None else order:
            st = self.base_state if arm == 1 else state
            st.vectors = dict(saved)  # the same warm starts and random draws for both
            st.generator(self.tracer.device).set_state(rng)
            p0 = time.process_time()
            out[arm] = self.base_probe(batch) if arm == 1 else self.tracer.probe(loss_fn, batch)
            spent[arm] = time.process_time() - p0
        if self.base is not None:
            for key in ("sharpness", "sharpness_global", "hessian_trace", "grad_noise", "grad_signal"):
                a, b = np.atleast_1d(getattr(out[0], key)), np.atleast_1d(getattr(out[1], key))
                self.base_diff[key] = max(self.base_diff.get(key, 0.0), float(np.max(np.abs(a / b - 1))))
            self.base_same_steps &= bool(np.array_equal(out[0].sharpness_steps, out[1].sharpness_steps)
                                         and out[0].sharpness_global_steps == out[1].sharpness_global_steps)
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
    parser.add_argument("--probe-only", action="store_true", help="only part 2 (probes every 100 steps)")
    parser.add_argument("--sharpness-tol", type=float, default=None, metavar="TOL",
                        help="part 2: this code's probe stops Lanczos at TOL (the baseline's keeps the default)")
    parser.add_argument("--probe-start", type=int, default=0, metavar="S",
                        help="part 2 and --probe-floor: train S more steps first, probing every 100 "
                        "(untimed), so that the timed probes come later in training (default 0)")
    parser.add_argument("--probe-pairs", type=int, default=None, metavar="N",
                        help="part 2: N pairs of 100-step blocks per arm (default 4, --quick 2)")
    parser.add_argument("--profile", action="store_true", help="only where the time goes (per phase, per probe part)")
    parser.add_argument("--tol-sweep", action="store_true", help="only the Lanczos early-stop tolerance sweep")
    parser.add_argument("--probe-floor", action="store_true", help="only the probe's inherent parts "
                        "(HVPs, first-order graph, micro-batch passes) in part 2's probe sequence")
    parser.add_argument("--baseline", metavar="REV", help="add before arms: the engines, hooks and "
                        "probes of this git revision")
    args = parser.parse_args()
    base = load_baseline(args.baseline) if args.baseline else None
    torch.set_num_threads(1)
    data = load_data("mnist1d")
    pairs, probe_pairs = (10, 2) if args.quick else (40, 4)
    if args.probe_start < 0:
        parser.error(f"--probe-start={args.probe_start} is outside the valid range [0, inf)")
    if args.probe_pairs is not None:
        if args.probe_pairs < 1:
            parser.error(f"--probe-pairs={args.probe_pairs} is outside the valid range [1, inf)")
        probe_pairs = args.probe_pairs
    if args.every_step_only:
        probe_pairs = 0
    print(f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
          f"BLAS threads {os.environ['OPENBLAS_NUM_THREADS']}, CPU, batch {BATCH}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.profile:
        kernels()
    for name in ("seed-cnn", "mlp"):
        if args.probe_floor:
            probe_floor(name, data, probe_pairs, args.probe_start)
            continue
        if args.profile or args.tol_sweep:
            print(name)
            if args.profile:
                profile(name, data)
            for seed in ((0, 1) if args.tol_sweep else ()):
                tolerance_sweep(name, data, seed)
            continue
        if args.curvature_only:
            print(name)
            curvature_cost(name, data, 2 if args.quick else 6, base, args.baseline)
            continue
        if not args.probe_only:  # part 1
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
        if args.probe_only:
            print(f"\n{name}")
        for iters in ((20, 5) if probe_pairs else ()):
            bench = Bench(name, data, baseline=base, sharpness_iters=iters)
            if args.sharpness_tol is not None:  # this probe only; before's (base_tracer) keeps the default
                bench.tracer.sharpness_tol = args.sharpness_tol
            bench.steps(20, traced=True, probe=True)  # first probe: a cold start, untimed
            warm_up(bench, args.probe_start)
            bench.probe_cpu = bench.base_probe_cpu = 0.0
            traced, plain = alternate(bench, probe_pairs, 100, probe=True, check=True)
            ds = bench.tracer.dataset()
            used = np.concatenate([ds.sharpness_steps.values[-probe_pairs:].ravel(),  # the timed probes
                                   ds.sharpness_global_steps.values[-probe_pairs:]])
            print(f"  trace + probe every 100 steps, <= {iters:2d} Lanczos steps: "
                  f"{traced / plain:.3f}x (the probe alone: {1 + bench.probe_cpu / plain:.3f}x; "
                  f"{probe_pairs} x 100 steps per arm; "
                  f"untraced step {10 * plain / probe_pairs:.2f} ms CPU; "
                  f"{ds.attrs['probe_seconds'] / ds.sizes['probe_step']:.2f} s wall per probe (all, untimed ones too); "
                  f"{used.mean():.1f} steps used on average; sharpness within "
                  f"{100 * max(bench.errors):.2g} % of converged)")
            if base is not None:  # the same steps with the baseline's probe in place of this one
                print(f"    before ({args.baseline}), same parameters and warm starts: "
                      f"{(traced - bench.probe_cpu + bench.base_probe_cpu) / plain:.3f}x (the probe "
                      f"alone: {1 + bench.base_probe_cpu / plain:.3f}x); largest relative difference "
                      f"of this probe's values from before's: "
                      + ", ".join(f"{k} {v:.1e}" for k, v in bench.base_diff.items())
                      + f"; the same Lanczos steps: {'yes' if bench.base_same_steps else 'no'}")

        if not (args.every_step_only or args.probe_only):
            curvature_cost(name, data, 2 if args.quick else 6, base, args.baseline)


def profile(name, data, steps=1000, reps=5):
    """Where the time goes. Every step: CPU µs per phase of a step with the manual calls and of
    one without a tracer (alternating). Probe, at fixed parameters after 200 steps (a warm start
    from step 100): µs of the first-order graph, one full HVP, one HVP per block, the same K
    block products as K zero-padded full HVPs and as one batched double backward, the
    Hutchinson sample, the micro-batch moments, and the block/global Lanczos (its HVPs apart)."""
    bench = Bench(name, data)
    tr, pc = bench.tracer, time.process_time
    t = {}
    bench.steps(50, traced=True)
    bench.steps(50, traced=False)
    for i in range(steps):
        arm = "traced" if i % 2 == 0 else "plain"
        batch = bench.batch()
        marks = [pc()]
        bench.opt.zero_grad(set_to_none=True)
        loss = loss_fn(bench.model, batch)
        marks.append(pc())
        loss.backward()
        marks.append(pc())
        if arm == "traced":
            tr.after_backward(loss)
        marks.append(pc())
        bench.opt.step()
        marks.append(pc())
        if arm == "traced":
            tr.after_step()
        marks.append(pc())
        for k, phase in enumerate(("forward", "backward", "after_backward", "optimizer.step", "after_step")):
            t[arm, phase] = t.get((arm, phase), 0.0) + marks[k + 1] - marks[k]
    per = lambda arm, ph: 1e6 * t[arm, ph] / (steps // 2)  # noqa: E731
    phases = ("forward", "backward", "after_backward", "optimizer.step", "after_step")
    print("  CPU us per step, traced (manual calls) / untraced: " + ", ".join(
        f"{ph} {per('traced', ph):.0f} / {per('plain', ph):.0f}" for ph in phases))
    # the engine's three calls inside the step, and each repeated at once (buffers in cache);
    # the repeat of step_stats works on −Δθ, which only spoils this loop's trace values
    e, hot = tr._engine, np.zeros((2, 3))
    for i in range(steps // 2):
        batch = bench.batch()
        bench.opt.zero_grad(set_to_none=True)
        loss = loss_fn(bench.model, batch)
        loss.backward()
        cur = tr.step % 2
        with torch.no_grad():
            for rep in range(2):
                t0 = pc()
                captured = e.capture_gradients(cur)
                t1 = pc()
                e.backward_stats(tr._row, cur, *captured, loss)
                hot[rep, :2] += pc() - t1, t1 - t0
        tr._captured, tr._phase = captured, "backward"
        tr._lrs.append(0.0), tr._group_lrs.append([0.0])
        bench.opt.step()
        for rep in range(2):
            t0 = pc()
            with torch.no_grad():
                e.step_stats(tr._row, cur, 1 - cur)
            hot[rep, 2] += pc() - t0
        tr._after_step()
    hot *= 1e6 / (steps // 2)
    print("  engine CPU us per step, in the step / repeated at once: "
          f"capture {hot[0, 1]:.0f} / {hot[1, 1]:.0f}, backward stats {hot[0, 0]:.0f} / {hot[1, 0]:.0f}, "
          f"step stats {hot[0, 2]:.0f} / {hot[1, 2]:.0f}")

    bench.steps(50, traced=True, probe=True)
    bench.steps(100, traced=True)
    batch, blocks = bench.batch(), [[i for i, li in enumerate(tr.tensor_layer) if li == k]
                                    for k in range(len(tr.layers))]
    saved, params, hvp = dict(tr._probe_state.vectors), tr.params, sharpness.block_hvp
    spent = {}

    def timed(key, fn, *args):
        t0 = pc()
        out = fn(*args)
        spent[key] = spent.get(key, 0.0) + (pc() - t0) / reps
        return out

    def counted(*args):  # block_hvp, its time counted apart within the Lanczos
        return timed("  of which HVPs", hvp, *args)
    for _ in range(reps):
        tr._probe_state.vectors = dict(saved)
        with sharpness.probe_context(bench.model):
            grads = timed("first-order graph", lambda: sharpness.first_order_graph(loss_fn(bench.model, batch), params))
            dim = sum(p.numel() for p in params)
            timed("full HVP", sharpness.full_hvp, grads, params, torch.randn(dim))
            vs = [torch.randn(sum(params[i].numel() for i in b)) for b in blocks]
            for k, b in enumerate(blocks):
                timed(f"HVP block {k}", hvp, grads, params, b, vs[k])
            # the same K block products by other routes: a full HVP with the vector zero outside
            # the block (its block part), and one batched double backward (row k: v_k on block k)
            offsets = np.cumsum([0] + [len(v) for v in vs])

            def zero_padded(grads):
                for k in range(len(blocks)):
                    z = torch.zeros(dim)
                    z[offsets[k]:offsets[k + 1]] = vs[k]
                    sharpness.full_hvp(grads, params, z)[offsets[k]:offsets[k + 1]]

            def batched(grads):
                rows = torch.zeros(len(blocks), dim)
                for k in range(len(blocks)):
                    rows[k, offsets[k]:offsets[k + 1]] = vs[k]
                cols = rows.split([p.numel() for p in params], dim=1)
                torch.autograd.grad(grads, params, [c.reshape(len(blocks), *p.shape) for c, p in zip(cols, params)],
                                    retain_graph=True, is_grads_batched=True)
            timed("K block HVPs as zero-padded full HVPs", zero_padded, grads)
            timed("K block HVPs as one batched double backward", batched, grads)
            sharpness.block_hvp = counted
            try:
                _, _, used = timed("Lanczos (blocks and global)", sharpness.block_sharpness, grads, params, blocks,
                                   tr.sharpness_iters, tr._probe_state, True, tr.sharpness_tol)
            finally:
                sharpness.block_hvp = hvp
            timed("Hutchinson (1 sample)", sharpness.hutchinson_block_traces, grads, params, blocks, 1,
                  torch.Generator().manual_seed(0))
            del grads
            timed("micro-batch moments", sharpness.microbatch_moments, bench.model, params, blocks, loss_fn, batch,
                  tr.noise_microbatches, None, tr.global_top_vector)
    order = [k for k in spent if "of which" not in k] + ["  of which HVPs"]
    order.insert(order.index("Lanczos (blocks and global)") + 1, order.pop())
    print("  probe, CPU ms: " + ", ".join(f"{k.strip()} {1e3 * spent[k]:.2f}" for k in order)
          + f"; Lanczos steps per block {used[:-1].tolist()}, global {int(used[-1])}")


def warm_up(bench, steps):
    """``steps`` untimed training steps with a probe every 100 (``--probe-start``), the errors
    and CPU counters of the benchmark left as they were."""
    for k in range(0, steps, 100):
        probe_cpu, base_cpu, errors = bench.probe_cpu, bench.base_probe_cpu, list(bench.errors)
        bench.steps(min(100, steps - k), traced=True, probe=True)
        bench.probe_cpu, bench.base_probe_cpu, bench.errors = probe_cpu, base_cpu, errors


def probe_floor(name, data, pairs, start=0):
    """Part 2's probe sequence (a cold probe, then one probe per traced 100-step block,
    alternating with untraced blocks) with the probe's inherent parts timed inside each probe:
    the Hessian-vector products (Lanczos and Hutchinson), the first-order graph (the probe
    batch's forward and backward pass) and the micro-batch passes. Their sum over the untraced
    steps' CPU time is the probe's floor for these Lanczos step counts: what is left if
    everything else cost nothing. ``start``: see ``--probe-start``."""
    spent, wrapped = {}, {}
    parts = (("block_hvp", "HVPs"), ("first_order_graph", "first-order graph"),
             ("microbatch_gradients", "micro-batch passes"))

    def timer(fn, key):
        def timed(*args, **kwargs):
            t0 = time.process_time()
            out = fn(*args, **kwargs)
            spent[key] = spent.get(key, 0.0) + time.process_time() - t0
            return out
        return timed
    for attr, key in parts:
        wrapped[attr] = getattr(sharpness, attr)
        setattr(sharpness, attr, timer(wrapped[attr], key))
    try:
        bench = Bench(name, data)
        probe = bench.tracer.probe

        def timed_forward(model, batch):  # the probe batch's forward (micro-batches: in their passes)
            t0 = time.process_time()
            out = loss_fn(model, batch)
            if len(batch[1]) == BATCH:
                spent["first-order graph"] = spent.get("first-order graph", 0.0) + time.process_time() - t0
            return out
        bench.tracer.probe = lambda fn, batch, **kw: probe(timed_forward, batch, **kw)
        bench.steps(20, traced=True, probe=True)  # first probe: a cold start, not counted
        warm_up(bench, start)
        spent.clear()
        bench.probe_cpu = 0.0
        _, plain = alternate(bench, pairs, 100, probe=True)
    finally:
        for attr, fn in wrapped.items():
            setattr(sharpness, attr, fn)
    ds = bench.tracer.dataset()
    steps = np.column_stack([ds.sharpness_steps.values, ds.sharpness_global_steps.values])[-pairs:]
    print(f"{name}: untraced step {10 * plain / pairs:.2f} ms CPU; per probe, CPU ms: all "
          f"{1e3 * bench.probe_cpu / pairs:.1f}, " + ", ".join(f"{k} {1e3 * spent.get(k, 0.0) / pairs:.1f}"
                                                            for _, k in parts))
    print(f"  probe alone {1 + bench.probe_cpu / plain:.3f}x; the HVPs alone {1 + spent['HVPs'] / plain:.3f}x; "
          f"the three parts {1 + sum(spent.values()) / plain:.3f}x ({pairs} probes)")
    print(f"  Lanczos steps per probe (layers, then global): {steps.astype(int).tolist()}")


def kernels(reps=200):
    """CPU µs of single kernels the findings compare (each repeated, data in cache)."""
    import scipy.linalg
    import scipy.linalg.blas

    def us(fn):
        fn()
        t0 = time.process_time()
        for _ in range(reps):
            fn()
        return 1e6 * (time.process_time() - t0) / reps
    g = torch.Generator().manual_seed(0)
    x = torch.randn(144000, generator=g)
    asum, dot = scipy.linalg.blas.get_blas_funcs(("asum", "dot"), (x.numpy(),))
    D = torch.randn(3, 144450, generator=g).numpy()
    rows = torch.randn(4, 161504, generator=g)

    def two_pass():
        dev = rows - rows.mean(0)
        return dev.mul_(dev).sum(0).div_(3)
    a, b = np.random.default_rng(0).random(8), np.random.default_rng(1).random(7)
    T = np.diag(a) + np.diag(b, 1) + np.diag(b, -1)
    print(f"  kernels, CPU us: torch norm of 144000 floats {us(lambda: torch.linalg.vector_norm(x)):.1f}, "
          f"BLAS asum {us(lambda: asum(x.numpy())):.1f}; (4, 161504).var(dim=0) "
          f"{us(lambda: rows.var(dim=0)):.0f}, two passes {us(two_pass):.0f}; top Ritz pair of an 8x8 "
          f"tridiagonal by eigh_tridiagonal(select) "
          f"{us(lambda: scipy.linalg.eigh_tridiagonal(a, b, select='i', select_range=(7, 7))):.0f}, "
          f"dense eigh {us(lambda: np.linalg.eigh(T)):.0f}; (3, 144450) Gram by sgemm {us(lambda: D @ D.T):.0f}, "
          f"three sdot {us(lambda: (dot(D[0], D[0]), dot(D[0], D[1]), dot(D[2], D[2]))):.0f}")


def tolerance_sweep(name, data, seed, tols=(1e-3, 3e-3, 1e-2, 3e-2), probes=8):
    """Lanczos steps and the sharpness's relative error (all blocks and global) against an
    80-step cold run, per early-stop tolerance, each tolerance with its own warm starts along one
    training run (probes every 100 steps; the first probe, a cold start, not counted)."""
    bench = Bench(name, data, seed=seed)
    tr = bench.tracer
    blocks = [[i for i, li in enumerate(tr.tensor_layer) if li == k] for k in range(len(tr.layers))]
    states = {tol: sharpness.ProbeState(seed) for tol in tols}
    rows = {tol: [] for tol in tols}
    for k in range(probes + 1):
        batch = bench.batch()
        with sharpness.probe_context(bench.model):
            grads = sharpness.first_order_graph(loss_fn(bench.model, batch), tr.params)
            ref, ref_g, _ = sharpness.block_sharpness(grads, tr.params, blocks, 80, sharpness.ProbeState(99))
            for tol in tols:
                est, est_g, used = sharpness.block_sharpness(grads, tr.params, blocks, tr.sharpness_iters,
                                                             states[tol], tol=tol)
                if k:
                    err = np.abs(np.append(est, est_g) / np.append(ref, ref_g) - 1)
                    rows[tol].append((err.max(), used[:-1].sum(), used[-1]))
        bench.steps(100, traced=False)
    for tol in tols:
        r = np.array(rows[tol])
        print(f"  {name} seed {seed}, tol {tol:g}: sharpness error max {r[:, 0].max():.1e}, median "
              f"{np.median(r[:, 0]):.1e}; Lanczos steps per probe: blocks {r[:, 1].mean():.1f}, "
              f"global {r[:, 2].mean():.1f} ({probes} probes)")


def curvature_cost(name, data, pairs, base=None, rev=None):
    """CPU time of the probe with ``probe_curvature`` / without, alternated at fixed parameters.
    With a baseline (``--baseline``) the baseline's probe with curvature also runs at the same
    parameters, warm start and random draws, alternating with this one's."""
    for micro in (4, 16):
        bench = Bench(name, data, noise_microbatches=micro, baseline=base)
        bench.steps(20, traced=True)
        tr = bench.tracer
        tr.probe(loss_fn, bench.batch())  # warm start
        saved = dict(tr._probe_state.vectors)
        rng = tr._probe_state.generator(tr.device).get_state()
        t = np.zeros(3)
        for k in range(pairs):
            batch = bench.batch() if micro == 4 else tuple(torch.cat([x] * 4) for x in bench.batch())
            arms = (0, 1, 2) if base is not None else (0, 1)
            for arm in (arms if k % 2 == 0 else arms[::-1]):
                st = bench.base_state if arm == 2 else tr._probe_state
                st.vectors = dict(saved)
                st.generator(tr.device).set_state(rng)
                tr.probe_curvature = arm == 0
                t0 = time.process_time()
                if arm == 2:
                    bt = bench.base_tracer
                    blocks = [[i for i, li in enumerate(bt.tensor_layer) if li == j] for j in range(len(bt.layers))]
                    base["probes"].probe(bench.model, bt.params, blocks, loss_fn, batch, state=st,
                                         iters=bt.sharpness_iters, tol=bt.sharpness_tol,
                                         hutchinson_samples=bt.hutchinson_samples, microbatches=micro,
                                         mode=bt.probe_mode, noise_batch_size=BATCH, curvature=True,
                                         buffer=tr._momentum_buffer())
                else:
                    tr.probe(loss_fn, batch, noise_batch_size=BATCH)
                t[arm] += time.process_time() - t0
        extra = (f"; this probe with it / before's ({rev}) with it, same parameters and warm starts: "
                 f"{t[0] / t[2]:.3f}x" if base is not None else "")
        print(f"  probe with / without probe_curvature, {micro:2d} micro-batches of "
              f"{BATCH * (1 if micro == 4 else 4) // micro}: {t[0] / t[1]:.3f}x ({pairs} probes per arm){extra}")

if __name__ == "__main__":
    main()
