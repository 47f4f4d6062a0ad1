"""The Lightning callback with a real Trainer on CPU: its trace equals the plain loop's (the
tracer attached, same module, data and seed) bit for bit, and it writes a run directory that
``optdyn link``/``export``/``plot`` read."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

lightning = pytest.importorskip("lightning", reason="lightning is not installed: pip install 'optdyn[lightning]'")

from experiments import Tracer, load_run  # noqa: E402
from experiments.cli import main  # noqa: E402
from experiments.trace.lightning_callback import TraceCallback  # noqa: E402

STEPS = 16


class Module(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, nesterov=True)


def loss_fn(model, batch):
    return model.training_step(batch, 0)


def setup():
    torch.manual_seed(0)
    module = Module()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(STEPS * 8, 5, generator=g), torch.randn(STEPS * 8, 1, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    return module, loader, (x[:32], y[:32])


def test_trainer_trace_equals_plain_loop_and_run_dir_works(tmp_path, capsys):
    module, loader, probe = setup()
    callback = TraceCallback(tmp_path / "run", loss_fn=loss_fn, probe_batch=probe, probe_every=5)
    trainer = lightning.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, gradient_clip_val=0.5, callbacks=[callback])
    trainer.fit(module, loader)
    got = callback.trace

    module, loader, probe = setup()
    opt = module.configure_optimizers()
    tracer = Tracer(module, opt, probe_every=5).attach(loss_fn=loss_fn, probe_batch=probe)
    for i, batch in enumerate(loader):
        opt.zero_grad()
        loss = module.training_step(batch, i)
        loss.backward()
        tracer.record_loss(loss)
        nn.utils.clip_grad_norm_(module.parameters(), 0.5)
        opt.step()
    want = tracer.detach().dataset()

    assert got.sizes["step"] == STEPS and got.probe_step.values.tolist() == [0, 5, 10, 15]
    for k in want.data_vars:
        if k.startswith("clip_factor"):  # both measured by the hooks, as ratios of norms
            np.testing.assert_allclose(got[k].values, want[k].values, rtol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(got[k].values, want[k].values, err_msg=k)
    assert (got.clip_factor_global.values < 1).any()  # Lightning's clipping was seen
    run = load_run(tmp_path / "run")
    assert run.attrs["config"]["opt"] == "nag" and run.attrs["summary"]["steps"] == STEPS
    assert main(["link", str(tmp_path / "run")]) == 0
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "link.nc").exists() and (tmp_path / "run" / "dashboard.png").exists()
