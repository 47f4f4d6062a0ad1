"""Device pre-check: imports, the gpu-marked tests' devices, and the costs that size the GPU
checks (float64 full-batch HVPs of the seed CNN and ResNet; float32 training steps)."""
import json, os, sys, time
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp

from experiments.runs.data import load_data
from experiments.runs.models import build_model

out = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
       "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
dev = "cuda" if torch.cuda.is_available() else "cpu"


def timed(fn, n):
    fn(); fn()
    if dev == "cuda": torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    if dev == "cuda": torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def hvp_cost(name, data_name, n, dtype, **args):
    data = load_data(data_name, n_train=n)
    torch.manual_seed(0)
    model = build_model(name, data.info, **args).to(dev, dtype).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = data.x_train.to(dev, dtype if data.x_train.is_floating_point() else None)
    y = data.y_train.to(dev)
    loss = lambda p: F.cross_entropy(functional_call(model, p, (x,)), y)
    g = grad(loss)
    v = {k: torch.randn_like(t) for k, t in params.items()}
    hvp = lambda: jvp(g, (params,), (v,))[1]
    d = sum(t.numel() for t in params.values())
    return {"d": d, "n": n, "dtype": str(dtype), "grad_s": timed(lambda: g(params), 10),
            "hvp_s": timed(hvp, 10)}


for key, args in [("seed_cnn_1000_f64", ("seed-cnn", "mnist1d", 1000, torch.float64)),
                  ("resnet8_4000_f64", ("resnet", "mnist1d", 4000, torch.float64)),
                  ("seed_cnn_1000_f32", ("seed-cnn", "mnist1d", 1000, torch.float32))]:
    try:
        kw = {"width": 8} if args[0] == "resnet" else {}
        out[key] = hvp_cost(*args, **kw)
    except Exception as err:  # report, go on
        out[key] = f"{type(err).__name__}: {err}"
    print(key, out[key], flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "precheck.json"), "w"), indent=1)
