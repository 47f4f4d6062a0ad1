"""``optdyn link`` of a trace from one's own loop: a trace file, or a directory with trace.nc
and no config; opt/lr/momentum from the trace's attrs (the tracer records them) or flags."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn

from experiments import Tracer
from experiments.cli import main
from experiments.linking.core import link, link_trace
from experiments.store import atomic_write_dataset


def loss_fn(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


@pytest.fixture(scope="module")
def trace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.8)
    x, y = torch.randn(128, 6), torch.randn(128, 1)
    tracer = Tracer(model, opt, probe_every=10).attach(loss_fn=loss_fn, probe_batch=(x, y))
    for step in range(60):
        batch = x[step % 4 * 32:][:32], y[step % 4 * 32:][:32]
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
    return tracer.detach().dataset()


def test_link_reads_the_optimizer_from_the_trace_attrs(trace, tmp_path, capsys):
    path = tmp_path / "mine.nc"
    atomic_write_dataset(path, trace)
    assert main(["link", str(path)]) == 0
    assert "grad_corr: n=" in capsys.readouterr().out
    linked = xr.open_dataset(tmp_path / "mine.link.nc").load()
    expected = link_trace(trace, {"opt": "hb", "lr": 0.05, "momentum": 0.8})
    np.testing.assert_array_equal(linked.pred_grad_corr.values, expected.pred_grad_corr.values)
    assert linked.attrs["method"] == "hb" and linked.attrs["momentum"] == 0.8
    assert linked.probe_step.values.tolist() == [0, 10, 20, 30, 40, 50]  # all inside the trace


def test_link_a_directory_with_trace_nc_and_flags_override_attrs(trace, tmp_path):
    bare = trace.copy()
    bare.attrs = {}
    atomic_write_dataset(tmp_path / "trace.nc", bare)
    assert main(["link", str(tmp_path)]) == 2  # no optimizer recorded and none given
    assert main(["link", str(tmp_path), "--opt", "nag", "--lr", "0.05", "--momentum", "0.8"]) == 0
    ds = link(tmp_path, opt="nag", lr=0.05, momentum=0.8, write=False)
    assert (tmp_path / "link.nc").exists() and ds.attrs["method"] == "nag"
    assert float(ds.edge) == pytest.approx(2 * 1.8 / 2.6)  # NAG edge 2(1+β)/(1+2β)


def test_link_flags_are_refused_for_a_run_and_unreadable_files(tmp_path, capsys):
    (tmp_path / "junk.nc").write_text("not netcdf")
    assert main(["link", str(tmp_path / "junk.nc")]) == 2
    assert "junk.nc" in capsys.readouterr().err
    with pytest.raises(ValueError, match="opt='hb' is only for a trace"):
        link(tmp_path / "nothing", opt="hb")
