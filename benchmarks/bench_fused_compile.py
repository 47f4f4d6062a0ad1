"""First-use cost of the fused tracer engine (experiments.trace.fused), wall seconds in this process.

Prints the import time of numba and of the fused module, then the tracer's two calls
(``after_backward``, ``after_step``) on the first and second step of a small float32 and float64
model: the first call compiles the kernels for that dtype, or loads them from numba's cache
(``cache=True``: ``__pycache__`` next to the module, or ``NUMBA_CACHE_DIR``). Run it twice with
an empty cache directory to see both::

    export NUMBA_CACHE_DIR=$(mktemp -d)
    .venv/bin/python benchmarks/bench_fused_compile.py   # compiles
    .venv/bin/python benchmarks/bench_fused_compile.py   # loads the cache
"""

import time

import torch

from experiments.trace.tracer import Tracer  # noqa: E402  (does not import numba)

t0 = time.perf_counter()
import numba  # noqa: E402,F401

t1 = time.perf_counter()
from experiments.trace import fused  # noqa: E402,F401

t2 = time.perf_counter()

def tracer_seconds(dtype, steps=2):
    """Wall seconds of the tracer's calls per step (forward/backward/optimizer excluded)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracer = Tracer(model, opt)
    assert tracer.engine == "fused"
    x = torch.randn(16, 4, dtype=dtype)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        s = time.perf_counter()
        tracer.after_backward()
        spent = time.perf_counter() - s
        opt.step()
        s = time.perf_counter()
        tracer.after_step()
        out.append(spent + time.perf_counter() - s)
    return out


print(f"import numba {t1 - t0:.3f} s, experiments.trace.fused (after numba) {t2 - t1:.3f} s")
for dtype in (torch.float32, torch.float64):
    first, second = tracer_seconds(dtype)
    print(f"{dtype}: tracer calls of the first step {first:.3f} s, of the second {1e6 * second:.0f} us")
