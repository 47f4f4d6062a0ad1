"""A Lightning callback that traces a ``lightning.Trainer`` run (``pip install 'optdyn[lightning]'``).

:class:`TraceCallback` attaches a :class:`~experiments.trace.tracer.Tracer` to the
LightningModule and its optimizer when training starts (:meth:`Tracer.attach
<experiments.trace.tracer.Tracer.attach>`: Lightning steps the optimizer with a closure, which
the hooks trace at its first evaluation; Lightning's gradient clipping runs inside the closure
and shows as ``clip_factor``), detaches it when training ends, keeps the trace in
``callback.trace`` and, given ``out``, writes a normal run directory there (``config.json``
with the optimizer's ``opt``/``lr``/``momentum``, ``trace.nc``, ``summary.json``, ``DONE``), so
``optdyn link/export/plot OUT`` work on it.

One optimizer, 32-bit precision (``precision="32-true"`` or ``"64-true"``): a mixed-precision
plugin's GradScaler is passed to the tracer when there is one, but that path is untested.
"""

from pathlib import Path

from experiments import store
from experiments.trace.tracer import Tracer, optimizer_attrs

try:
    from lightning import Callback
except ImportError:  # the optional extra is not installed: the class exists, __init__ says so
    Callback = object


class TraceCallback(Callback):
    """Trace a Lightning run; ``out``: run directory to write at the end (optional).

    ``loss_fn(model, batch)`` and ``probe_batch``: as in :meth:`Tracer.attach` (the probe at
    θ_k every ``probe_every`` steps); the remaining keywords go to :class:`Tracer`.
    """

    def __init__(self, out=None, *, loss_fn=None, probe_batch=None, **tracer_kw):
        if Callback is object:
            raise ValueError("TraceCallback needs lightning: pip install 'optdyn[lightning]'")
        super().__init__()
        self.out = None if out is None else Path(out)
        self.attach_kw = dict(loss_fn=loss_fn, probe_batch=probe_batch)
        self.tracer_kw = tracer_kw
        self.tracer = self.trace = None

    def on_train_start(self, trainer, pl_module):
        if len(trainer.optimizers) != 1:
            raise ValueError(f"optimizers={len(trainer.optimizers)} is not supported; valid: 1")
        optimizer = trainer.optimizers[0]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.tracer = Tracer(pl_module, optimizer, **self.tracer_kw).attach(scaler=scaler, **self.attach_kw)

    def on_train_end(self, trainer, pl_module):
        self.trace = self.tracer.detach().dataset()
        if self.out is not None:
            a = optimizer_attrs(self.tracer.optimizer, self.trace.attrs.get("lr0"))
            config = {"opt": a["opt"], "lr": a["lr0"], "momentum": a["momentum"], "optimizer": a["optimizer"],
                      "nesterov": bool(a["nesterov"]), "source": "lightning", "max_steps": trainer.max_steps}
            loss = self.trace["loss"].values
            summary = {"steps": int(self.trace.sizes["step"]),
                       "final_loss": float(loss[-1]) if len(loss) else None}
            store.write_run(self.out, config, self.trace, summary)
