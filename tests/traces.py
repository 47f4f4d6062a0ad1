"""A small trace from a user-style loop with the tracer attached (shared by the viewer tests)."""

import torch
import torch.nn.functional as F
from torch import nn

from experiments import Tracer


def loss_fn(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


def small_trace(steps=60, probe_every=10, layers=2, momentum=0.8, seed=0):
    """SGD with momentum on an MLP with ``layers`` Linear layers, probes every ``probe_every``."""
    torch.manual_seed(seed)
    mods = []
    for i in range(layers):
        mods += [nn.Linear(6, 6 if i < layers - 1 else 1)] + ([nn.Tanh()] if i < layers - 1 else [])
    model = nn.Sequential(*mods)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    x, y = torch.randn(128, 6), torch.randn(128, 1)
    tracer = Tracer(model, opt, probe_every=probe_every, sharpness_iters=10).attach(
        loss_fn=loss_fn, probe_batch=(x, y))
    for step in range(steps):
        batch = x[step % 4 * 32:][:32], y[step % 4 * 32:][:32]
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        tracer.record_loss(loss)
        opt.step()
    return tracer.detach().dataset()
