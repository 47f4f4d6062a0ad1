"""Tracer overhead on a GPU: the every-step trace as a ratio of wall time within one run.

The ResNet and the transformer at the sizes of the repo's specs (link_eval_resnet_mnist1d:
ResNet width 8 on MNIST-1D, batch 32; link_eval_transformer_pytext: 1 block, dim 32, 4 heads on
pytext with 32-token windows, batch 16), each also at a ``--large-factor`` times larger batch,
SGD with momentum 0.9. One model and optimizer per setting train in blocks of the same number
of steps in three arms: no tracer, the tracer's four manual calls, the tracer attached
(``Tracer.attach`` + ``record_loss``); the arms' order rotates from round to round, and the
first ``--warmup`` rounds are discarded. A block is timed by the wall clock from a
``torch.cuda.synchronize()`` before its first step to one after its last (the device's queue is
empty at both ends), so the time counts whatever bounds the step, the host's launches or the
device's kernels. The steps cycle through 8 batches resident on the device (no sampling or
copying in the timed loop: the untraced step is only forward, backward and the optimizer step,
which makes the ratio as large as it can be). The tracer keeps its default block of 256 steps:
its flush (the one host read, every 256 steps) is inside the timed blocks.

Per setting: ratio = traced / untraced wall time over all kept rounds (manual calls and
attached), the median and quartiles of the per-round ratios, the untraced step's time and the
tracer's own device time per step (its CUDA events, ``attrs["tracer_seconds"]``). Stops within
``--budget-s`` (split evenly over the settings, rounds run while the next one fits) and writes
its JSON atomically after every setting.

    PYTHONPATH=$PWD python benchmarks/bench_trace_device.py --device cuda --out trace_cuda.json
    # the same on the CPU (a smoke test; the torch engine, which CUDA parameters get):
    PYTHONPATH=$PWD python benchmarks/bench_trace_device.py --device cpu --engine torch \\
        --budget-s 30 --large-factor 2 --out /tmp/trace_cpu.json

``--count-ops`` only counts the device ops (kernel launches on a GPU) of one step per arm, on the
meta device (shapes only: runs anywhere, takes a second), at the specs' batch sizes.

``--graph`` adds two rotating arms, the manual calls and the attached tracer with the opt-in
engine "torch-graph" (the torch engine's phases replayed from CUDA graphs).

``--baseline REV`` adds two rotating arms, the manual calls and the attached tracer with the
engines and hooks of git revision REV (``bench_trace.load_baseline``; needs the git history).
"""

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from experiments.runs.data import DataInfo, load_data
from experiments.runs.loop import make_loss_fn
from experiments.runs.models import build_model
from experiments.store import atomic_write_json
from experiments.trace.tracer import Tracer

SETTINGS = {  # the specs' model and data arguments and batch sizes
    "resnet": dict(spec="experiments/specs/link_eval_resnet_mnist1d.toml", data="mnist1d",
                   data_args={}, model_args=dict(width=8), batch=32),
    "transformer": dict(spec="experiments/specs/link_eval_transformer_pytext.toml", data="pytext",
                        data_args=dict(seq_len=32), model_args=dict(dim=32, layers=1, heads=4), batch=16),
}
ARMS = ("untraced", "manual", "attached")
POOL = 8  # batches cycled through in the timed loop


def stand_in(name, data_args):
    """Random data of the real set's shapes (the step's time does not depend on the values),
    for a machine without the data set's package."""
    g = torch.Generator().manual_seed(0)
    if name == "mnist1d":
        info = DataInfo("mnist1d (random stand-in)", "classify", (1, 40), n_classes=10)
        return info, torch.randn(4000, 1, 40, generator=g), torch.randint(0, 10, (4000,), generator=g)
    t = data_args.get("seq_len", 64)
    info = DataInfo("pytext (random stand-in)", "lm", (t,), vocab_size=256)
    tokens = torch.randint(0, 256, (4000, t + 1), generator=g)
    return info, tokens[:, :-1], tokens[:, 1:]


def load(name, data_args):
    try:
        data = load_data(name, **data_args)
        return data.info, data.x_train, data.y_train, name
    except (ImportError, OSError, ValueError) as err:  # e.g. no mnist1d package on this machine
        info, x, y = stand_in(name, data_args)
        return info, x, y, f"{info.name}: {type(err).__name__}: {err}"


class Setting:
    """One model, optimizer and tracer; :meth:`block` times n steps of one arm."""

    def __init__(self, model_name, batch, device, engine, seed=0, base=None, graph=False):
        cfg = SETTINGS[model_name]
        info, x, y, self.data = load(cfg["data"], cfg["data_args"])
        torch.manual_seed(seed)
        self.model = build_model(model_name, info, **cfg["model_args"]).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.tracer = Tracer(self.model, self.opt, engine=engine)
        self.tracers = {"": self.tracer}
        if base is not None:  # the same tracer on the baseline's engine (and, attached, hooks)
            tr = self.tracers["@base"] = Tracer(self.model, self.opt, engine=engine)
            tr._engine = getattr(base["engines"], type(tr._engine).__name__)(tr.params, tr.tensor_layer,
                                                                              tr.block_size)
        if graph:
            self.tracers["@graph"] = Tracer(self.model, self.opt, engine="torch-graph")
        self.base, self.graph = base, graph
        self.loss_fn = make_loss_fn(info.task)
        g = torch.Generator().manual_seed(seed)
        idx = [torch.randint(0, len(y), (batch,), generator=g) for _ in range(POOL)]
        self.pool = [(x[i].to(device), y[i].to(device)) for i in idx]
        self.device = torch.device(device)
        self.steps = {arm: 0 for arm in self.arms()}

    def arms(self):
        return (ARMS + (() if self.base is None else ("manual@base", "attached@base"))
                + (("manual@graph", "attached@graph") if self.graph else ()))

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def block(self, arm, n):
        """Wall seconds of n steps of ``arm``, the device idle at both ends."""
        mode, _, which = arm.partition("@")
        model, opt, tracer, loss_fn = self.model, self.opt, self.tracers["@" + which if which else ""], self.loss_fn
        manual, attached = mode == "manual", mode == "attached"
        if attached and which == "base":
            tracer._hooks = self.base["hooks"].Hooks(tracer)
        elif attached:
            tracer.attach()
        self.sync()
        t0 = time.perf_counter()
        for i in range(n):
            batch = self.pool[i % POOL]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            if manual:
                tracer.after_backward(loss)
            elif attached:
                tracer.record_loss(loss)
            opt.step()
            if manual:
                tracer.after_step()
        self.sync()
        spent = time.perf_counter() - t0
        if attached:
            tracer.detach()
        self.steps[arm] += n
        return spent


def count_ops(model_name, base=None):
    """Device ops (non-view aten ops touching a non-CPU tensor) of one step per arm, the
    optimizer's momentum buffers already made; on the meta device."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
            if not func.is_view and any(isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in leaves):
                self.n += 1
            return out

    cfg = SETTINGS[model_name]
    info, x, y = stand_in(cfg["data"], cfg["data_args"])
    with torch.device("meta"):
        model = build_model(model_name, info, **cfg["model_args"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    tracers = {"": Tracer(model, opt, engine="torch")}
    if base is not None:
        tr = tracers["@base"] = Tracer(model, opt, engine="torch")
        tr._engine = base["engines"].TorchEngine(tr.params, tr.tensor_layer, tr.block_size)
    loss_fn = make_loss_fn(info.task)
    batch = (x[:cfg["batch"]].to("meta"), y[:cfg["batch"]].to("meta"))
    counts = {}
    for arm in ARMS + (() if base is None else ("manual@base", "attached@base")):
        mode, _, which = arm.partition("@")
        tracer = tracers["@" + which if which else ""]
        if mode == "attached":
            tracer._hooks = base["hooks"].Hooks(tracer) if which else None
            if not which:
                tracer.attach()
        for _ in range(2):  # the second step counts
            with Count() as c:
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model, batch)
                loss.backward()
                if mode == "manual":
                    tracer.after_backward(loss)
                elif mode == "attached":
                    tracer.record_loss(loss)
                opt.step()
                if mode == "manual":
                    tracer.after_step()
        tracer.detach()
        counts[arm] = c.n
    return dict(model=model_name, n_layers=len(tracers[""].layers), batch_size=cfg["batch"], ops=counts)


def quartiles(x):
    q = np.quantile(x, [0.25, 0.5, 0.75])
    return dict(q25=float(q[0]), median=float(q[1]), q75=float(q[2]))


def measure(model_name, batch, device, engine, budget_s, warmup, block_s, min_rounds, base=None, graph=False):
    """Rotating rounds of one block per arm until the budget is spent; see the docstring."""
    start = time.perf_counter()
    s = Setting(model_name, batch, device, engine, base=base, graph=graph)
    arms = s.arms()
    for arm in arms:  # first calls: allocator, autotuning, lazy init
        s.block(arm, 3)
    probe = s.block("untraced", 10) / 10  # the step's time, to size the blocks
    n = int(min(max(block_s / max(probe, 1e-6), 10), 1000))
    times, round_s = [], None
    while True:
        k = len(times)
        left = budget_s - (time.perf_counter() - start)
        if k >= warmup + min_rounds and (round_s is None or left < 1.2 * round_s):
            break
        t0 = time.perf_counter()
        row = [0.0] * len(arms)
        for a in np.roll(np.arange(len(arms)), k):
            row[a] = s.block(arms[a], n)
        times.append(row)
        round_s = time.perf_counter() - t0
    t = np.array(times[warmup:])
    per_round = {arm: t[:, i] / t[:, 0] for i, arm in enumerate(arms) if i}
    traced_steps = s.steps["manual"] + s.steps["attached"]
    ds = s.tracer.dataset()  # flushes (a sync), outside the timing
    recorded, tracer_s = int(ds.sizes["step"]), float(ds.attrs["tracer_seconds"])
    finite = bool(np.isfinite(ds.grad_norm.values).all() and np.isfinite(ds.update_norm.values).all())
    n_params = sum(p.numel() for p in s.tracer.params)
    out = dict(
        model=model_name, batch_size=batch, model_args=SETTINGS[model_name]["model_args"],
        spec=SETTINGS[model_name]["spec"], data=s.data, engine=s.tracer.engine,
        n_params=n_params, n_layers=len(s.tracer.layers), n_tensors=len(s.tracer.params),
        steps_per_block=n, rounds_kept=len(t), rounds_warmup=warmup,
        untraced_step_ms=1e3 * float(t[:, 0].sum()) / (len(t) * n),
        ratio_manual=float(t[:, 1].sum() / t[:, 0].sum()),
        ratio_attached=float(t[:, 2].sum() / t[:, 0].sum()),
        per_round_manual=quartiles(per_round["manual"]),
        per_round_attached=quartiles(per_round["attached"]),
        se_manual=float(per_round["manual"].std(ddof=1) / math.sqrt(len(t))) if len(t) > 1 else math.nan,
        se_attached=float(per_round["attached"].std(ddof=1) / math.sqrt(len(t))) if len(t) > 1 else math.nan,
        block_seconds={arm: t[:, i].tolist() for i, arm in enumerate(arms)},
        traced_steps=traced_steps, trace_steps_recorded=recorded, trace_finite=finite,
        # the tracer's own time (attrs["tracer_seconds"]): device time between CUDA events
        # on a GPU, host time elsewhere; all traced steps, warm-up included
        tracer_ms_per_step=1e3 * tracer_s / max(traced_steps, 1),
        seconds=time.perf_counter() - start,
    )
    for which in ("base", "graph"):
        if "@" + which not in s.tracers:
            continue
        tr, col = s.tracers["@" + which], {arm: i for i, arm in enumerate(arms)}
        ds_w = tr.dataset()
        out.update({f"ratio_manual_{which}": float(t[:, col["manual@" + which]].sum() / t[:, 0].sum()),
                    f"ratio_attached_{which}": float(t[:, col["attached@" + which]].sum() / t[:, 0].sum()),
                    f"per_round_manual_{which}": quartiles(per_round["manual@" + which]),
                    f"per_round_attached_{which}": quartiles(per_round["attached@" + which]),
                    f"trace_finite_{which}": bool(np.isfinite(ds_w.grad_norm.values).all()),
                    f"tracer_ms_per_step_{which}": 1e3 * float(ds_w.attrs["tracer_seconds"])
                    / max(s.steps["manual@" + which] + s.steps["attached@" + which], 1)})
        if which == "graph":
            out["graphs_captured"] = len(tr._engine.graphs)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--models", default="resnet,transformer", help="comma-separated: " + ", ".join(SETTINGS))
    parser.add_argument("--engine", default="auto", help="the tracer's engine (auto: torch on CUDA)")
    parser.add_argument("--large-factor", type=int, default=64,
                        help="the larger batch = the spec's batch times this (0: only the spec's)")
    parser.add_argument("--budget-s", type=float, default=150.0, help="wall seconds for everything")
    parser.add_argument("--warmup", type=int, default=2, help="rounds discarded per setting")
    parser.add_argument("--block-s", type=float, default=0.1, help="target seconds of one block")
    parser.add_argument("--min-rounds", type=int, default=5, help="kept rounds at least (may overrun the budget)")
    parser.add_argument("--graph", action="store_true", help="add arms with the engine torch-graph (CUDA graphs)")
    parser.add_argument("--baseline", metavar="REV", help="add arms with the engines and hooks of this git revision")
    parser.add_argument("--count-ops", action="store_true", help="only count the device ops per step (meta device)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", help="JSON file (written atomically after each setting); needed unless --count-ops")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in SETTINGS]
    if unknown or not models:
        parser.error(f"--models={args.models!r} is not valid; valid: a comma-separated subset of {', '.join(SETTINGS)}")
    if args.large_factor < 0 or args.budget_s <= 0 or args.warmup < 0 or args.min_rounds < 1 or args.block_s <= 0:
        parser.error("--large-factor >= 0, --budget-s > 0, --warmup >= 0, --min-rounds >= 1 and --block-s > 0")
    if args.out is None and not args.count_ops:
        parser.error("--out is needed (the JSON file of the results)")
    try:
        device = torch.device("meta" if args.count_ops else args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        parser.error(f"--device={args.device!r} is not available here: {err}")
    torch.set_num_threads(max(args.threads, 1))
    base = None
    if args.baseline:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_trace import load_baseline
        base = load_baseline(args.baseline)
    if args.count_ops:
        for model in models:
            r = count_ops(model, base)
            ops = r["ops"]
            print(f"{model} ({r['n_layers']} layers, batch {r['batch_size']}): device ops per step " + ", ".join(
                f"{arm} {n}" + (f" (+{n - ops['untraced']})" if arm != "untraced" else "") for arm, n in ops.items()))
        return
    start = time.perf_counter()
    settings = [(m, SETTINGS[m]["batch"] * f) for m in models for f in ((1, args.large_factor) if args.large_factor > 1 else (1,))]
    result = dict(
        command=" ".join(sys.argv), device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or device.type,
        torch=torch.__version__, python=platform.python_version(), budget_s=args.budget_s,
        torch_threads=torch.get_num_threads(),
        time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), settings=[], complete=False,
    )
    for i, (model, batch) in enumerate(settings):
        share = (args.budget_s - (time.perf_counter() - start)) / (len(settings) - i)
        r = measure(model, batch, device, args.engine, share, args.warmup, args.block_s, args.min_rounds, base,
                    args.graph)
        result["settings"].append(r)
        result["complete"] = i == len(settings) - 1
        result["seconds"] = time.perf_counter() - start
        atomic_write_json(args.out, result)
        print(f"{model} batch {batch} ({r['n_params']} params, {r['n_layers']} layers, engine {r['engine']}): "
              f"untraced step {r['untraced_step_ms']:.3f} ms; traced/untraced manual {r['ratio_manual']:.3f}x "
              f"(rounds: median {r['per_round_manual']['median']:.3f}, IQR {r['per_round_manual']['q25']:.3f}"
              f"-{r['per_round_manual']['q75']:.3f}), attached {r['ratio_attached']:.3f}x (median "
              f"{r['per_round_attached']['median']:.3f}, IQR {r['per_round_attached']['q25']:.3f}-"
              f"{r['per_round_attached']['q75']:.3f}); {r['rounds_kept']} rounds x {r['steps_per_block']} steps; "
              f"tracer's own time {r['tracer_ms_per_step']:.3f} ms/step; data {r['data']}", flush=True)
        for which, label in (("base", f"before ({args.baseline})"), ("graph", "engine torch-graph")):
            if f"ratio_manual_{which}" in r:
                print(f"  {label}: manual {r[f'ratio_manual_{which}']:.3f}x (median "
                      f"{r[f'per_round_manual_{which}']['median']:.3f}), attached {r[f'ratio_attached_{which}']:.3f}x "
                      f"(median {r[f'per_round_attached_{which}']['median']:.3f}); tracer's own time "
                      f"{r[f'tracer_ms_per_step_{which}']:.3f} ms/step", flush=True)
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
