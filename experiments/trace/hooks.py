"""The tracer as one line in any training loop: hooks on the optimizer's step and the gradients.

:meth:`Tracer.attach <experiments.trace.tracer.Tracer.attach>` makes a :class:`Hooks` that
does, at the right points of every optimizer step, what the four manual calls do:

* **the raw gradient** (before the user's clipping): a post-accumulate-grad hook on every
  traced parameter queues one callback per backward pass, run when the pass ends; it copies
  the gradients and θ into the tracer's buffers. With gradient accumulation every backward
  pass copies again and the last copy, the accumulated gradient, is the one the step uses.
  With a ``torch.amp.GradScaler`` (``attach(scaler=...)``) the copy is taken instead right
  after ``scaler.unscale_`` (the gradients are then true gradients, not yet clipped), and
  the gradient hooks are not used;
* **before the step** (``optimizer.register_step_pre_hook``): the gradient statistics, the
  lrs of all param groups, the clip factors and, every ``probe_every`` steps, the probe at
  θ_k (when ``loss_fn`` and ``probe_batch`` were given);
* **a closure** (``optimizer.step(closure)``, as Lightning and L-BFGS call it): the
  forward and backward passes run inside the step, so the pre-step hook wraps the closure
  and does the above right after its first evaluation (the gradient at θ_k, after any
  clipping the closure does); its returned loss is recorded unless ``record_loss`` was
  called; later evaluations within the step are not recorded;
* **after the step** (``register_step_post_hook``): the update Δθ and θ, one record per
  optimizer step. A step that ``GradScaler.step`` skips (non-finite gradients) never calls
  ``optimizer.step``, so it is not recorded.

Clip factors. Any in-place change of a gradient after the copy (``clip_grad_norm_``,
``clip_grad_value_``, ``GradScaler.unscale_`` when no scaler was given, a hand-written
rescale) bumps the tensor's version counter; only then (no cost otherwise) the hook measures
per layer ``clip_factor`` = ‖g_l at the step‖/‖g_l raw‖ and ``clip_factor_global`` the same
for the whole gradient. For norm clipping (global or per layer) that is exactly the factor
applied; for value clipping it is the effective factor. Unlike the manual
``record_clip(global_factor=c)``, global clipping thus shows ``c`` in every layer too.

Loss: the hooks do not see it; ``tracer.record_loss(loss)`` (any time before the step; with
accumulation, the recorded losses of the step are summed) fills ``loss``, else it is NaN.
"""

import operator

import torch


def batch_source(probe_batch):
    """A function returning the probe's next batch: ``probe_batch`` called when callable, the
    next item (cycled) of an iterable such as a DataLoader, or ``probe_batch`` itself (a
    tensor or a tuple/list/dict of tensors)."""
    if callable(probe_batch):
        return probe_batch
    if torch.is_tensor(probe_batch) or isinstance(probe_batch, (tuple, list, dict)):
        return lambda: probe_batch
    if hasattr(probe_batch, "__iter__"):
        state = {"it": iter(probe_batch)}

        def next_batch():
            try:
                return next(state["it"])
            except StopIteration:
                state["it"] = iter(probe_batch)
                return next(state["it"])
        return next_batch
    raise ValueError(f"probe_batch={type(probe_batch).__name__} is not valid; valid: a batch, a "
                     "callable returning one, or an iterable of batches")


class Hooks:
    """The hooks of one attached tracer; :meth:`remove` takes every one of them away."""

    def __init__(self, tracer, loss_fn=None, probe_batch=None, scaler=None):
        if (loss_fn is None) != (probe_batch is None):
            raise ValueError("loss_fn and probe_batch go together: give both (the tracer probes "
                             "every probe_every steps) or neither (call tracer.probe yourself)")
        if scaler is not None and not callable(getattr(scaler, "unscale_", None)):
            raise ValueError(f"scaler={scaler!r} is not valid; valid: a torch.amp.GradScaler")
        self.tracer, self.loss_fn, self.scaler = tracer, loss_fn, scaler
        self.next_batch = None if probe_batch is None else batch_source(probe_batch)
        self.captured = False  # gradients copied since the last step
        self.queued = False  # a callback is queued for the end of the running backward pass
        self.grads = self.versions = None
        self.loss = None
        self.frozen = False  # the step's gradient statistics are taken: no more copies
        opt = tracer.optimizer
        self.handles = [opt.register_step_pre_hook(self.pre_step),
                        opt.register_step_post_hook(self.post_step)]
        if scaler is None:
            self.handles += [p.register_post_accumulate_grad_hook(self.on_grad) for p in tracer.params]
        else:
            original = scaler.unscale_

            def unscale_(optimizer):
                out = original(optimizer)
                if optimizer is opt:
                    self.capture()
                return out
            original_update = scaler.update

            def update(*args, **kwargs):
                self.skip()  # after a taken step: nothing left; after a skipped one: forget it
                return original_update(*args, **kwargs)
            scaler.unscale_, scaler.update = unscale_, update  # instance attributes shadow the methods

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []
        if self.scaler is not None:
            del self.scaler.unscale_, self.scaler.update

    # ------------------------------------------------------------------ gradients
    def on_grad(self, param):
        if not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.end_of_backward)

    def end_of_backward(self):
        self.queued = False
        self.capture()

    def capture(self):
        if self.frozen:
            return
        t = self.tracer
        t._capture()
        self.captured = True
        self.grads = t._engine.grads  # the gradient tensors just copied
        self.versions = [g._version for g in self.grads if g is not None]

    def changed(self):
        """True when a gradient was replaced or changed in place since the copy."""
        grads = [p.grad for p in self.tracer.params]
        if any(map(operator.is_not, grads, self.grads)):
            return True
        return [g._version for g in grads if g is not None] != self.versions

    def record_clip(self):
        """Factors ‖g at the step‖/‖g raw‖ per layer and globally (docstring: clip factors)."""
        t = self.tracer
        raw, now = t._engine.clip_norms(t.step % 2, t._captured[0])
        on_device = t.engine in ("torch", "torch-graph")  # no host-device copy, no read-back: no sync
        index = t._engine.layer_index if on_device else torch.as_tensor(t.tensor_layer)
        L = len(t.layers)
        norms = torch.stack([raw, now])
        sq = torch.zeros(2, L, dtype=norms.dtype, device=norms.device).index_add_(1, index, norms * norms)
        sq = torch.cat([sq, sq.sum(1, keepdim=True)], 1)  # per layer, then the whole gradient
        factors = torch.where(sq[0] > 0, (sq[1] / sq[0]).sqrt(), 1.0)  # L layers, then global
        if on_device:
            t._engine.set_clip_row(t._row, factors)
            return
        for col, factor in enumerate(factors.tolist()):
            t._engine.set_clip(t._row, col, factor)

    # ------------------------------------------------------------------ the step
    def pre_step(self, optimizer, args, kwargs):
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0]: the optimizer
        if closure is None:
            self.before_update()
            return None

        def traced_closure():  # the gradient at θ_k comes from the closure's first evaluation
            loss = closure()
            if not self.frozen:
                if self.loss is None and torch.is_tensor(loss):
                    self.record_loss(loss)
                self.before_update()
            return loss
        if "closure" in kwargs:
            return args, {**kwargs, "closure": traced_closure}
        return (args[0], traced_closure, *args[2:]), kwargs

    def before_update(self):
        """Statistics of the gradient at θ_k, clip factors and the probe, once per step; later
        backward passes of the step (a closure evaluated again, as L-BFGS does) are ignored."""
        t = self.tracer
        if not self.captured:  # gradients set without a backward pass, or no gradient hook ran
            self.capture()
        self.frozen = True
        t._backward_stats(self.loss)
        if self.changed():
            with torch.no_grad():
                self.record_clip()
        if self.loss_fn is not None and t.should_probe():
            t.probe(self.loss_fn, self.next_batch())

    def post_step(self, optimizer, args, kwargs):
        if not self.frozen:  # a closure that never ran a backward pass
            self.before_update()
        self.tracer._after_step()
        self.skip()

    def record_loss(self, loss):
        """The step's loss (summed over calls); the first one is kept as given (one torch op
        less per step; the engines read it without autograd), a sum is detached."""
        if not torch.is_tensor(loss):
            loss = torch.tensor(float(loss))
        self.loss = loss if self.loss is None else self.loss.detach() + loss.detach()

    def skip(self):
        """Forget this step's gradients and loss (a step the GradScaler skipped)."""
        self.captured, self.loss, self.grads, self.versions, self.frozen = False, None, None, None, False
