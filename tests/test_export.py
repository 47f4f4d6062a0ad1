"""optdyn export: TensorBoard scalars read back with tensorboard's own reader, and the tidy table."""

import numpy as np
import pandas as pd
import pytest

from experiments.cli import main
from experiments.store import atomic_write_dataset, write_run
from experiments.store import read_trace
from experiments.viewers.export import h_edge
from tests.traces import small_trace


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "mine.nc"
    atomic_write_dataset(path, small_trace())
    return path


def test_tensorboard_scalars_read_back_equal_the_trace(trace_file, tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: pip install 'optdyn[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["export", str(trace_file), "--tensorboard", str(tmp_path / "tb")]) == 0
    assert "scalars to" in capsys.readouterr().out
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1 and not list((tmp_path / "tb").glob(".tmp-*"))
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0}).Reload()
    tags = set(acc.Tags()["scalars"])
    per_layer = {"grad_norm", "update_norm", "param_norm", "update_ratio", "grad_cos", "lr", "sharpness", "h_edge"}
    assert tags == {f"{g}/{n}" for g in ("0", "2") for n in per_layer} | \
        {f"global/{n}" for n in ("loss", "lr", "grad_norm", "grad_cos", "sharpness", "h_edge")}
    trace = read_trace(trace_file)

    def read(tag):
        ev = acc.Scalars(tag)
        return np.array([e.step for e in ev]), np.array([e.value for e in ev])

    steps, values = read("2/grad_norm")
    np.testing.assert_array_equal(steps, trace.step.values)
    np.testing.assert_array_equal(values, trace.grad_norm.sel(layer="2").values.astype(np.float32))
    steps, values = read("global/grad_cos")  # NaN at step 0 is not written
    np.testing.assert_array_equal(steps, trace.step.values[1:])
    np.testing.assert_array_equal(values, trace.grad_cos_global.values[1:].astype(np.float32))
    steps, values = read("0/h_edge")
    np.testing.assert_array_equal(steps, trace.probe_step.values)
    edge = 2 * (1 + 0.8)  # HB
    expected = 0.05 * trace.sharpness.sel(layer="0").values / edge
    np.testing.assert_allclose(values, expected, rtol=1e-6)  # float32 in the event file
    steps, values = read("global/loss")
    np.testing.assert_array_equal(values, trace.loss.values.astype(np.float32))


def test_tidy_table_has_one_row_per_step_and_layer(trace_file, tmp_path):
    assert main(["export", str(trace_file), "--csv", str(tmp_path / "t.csv")]) == 0
    df = pd.read_csv(tmp_path / "t.csv")
    trace = read_trace(trace_file)
    assert len(df) == trace.sizes["step"] * trace.sizes["layer"]
    row = df[(df.step == 20) & (df.layer.astype(str) == "2")].iloc[0]
    assert row.grad_norm == pytest.approx(float(trace.grad_norm.sel(step=20, layer="2")), rel=1e-15)
    assert row.sharpness == pytest.approx(float(trace.sharpness.sel(probe_step=20, layer="2")), rel=1e-15)
    assert row.h_edge == pytest.approx(float(h_edge(trace)[0].sel(probe_step=20, layer="2")), rel=1e-15)
    assert df[df.step == 21].sharpness.isna().all()


def test_export_of_a_run_directory_and_bad_input(trace_file, tmp_path, capsys):
    trace = read_trace(trace_file)
    trace.attrs = {}  # the run's config says the method
    write_run(tmp_path / "run", {"opt": "nag", "momentum": 0.8, "lr": 0.05}, trace, {})
    assert main(["export", str(tmp_path / "run"), "--csv", str(tmp_path / "r.csv")]) == 0
    df = pd.read_csv(tmp_path / "r.csv")
    assert df.h_edge.dropna().iloc[0] == pytest.approx(
        0.05 * trace.sharpness.isel(probe_step=0, layer=0).item() / (2 * 1.8 / 2.6))
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run")]) == 2
    assert main(["export", str(tmp_path / "none"), "--csv", str(tmp_path / "x.csv")]) == 2
    assert main(["export", str(tmp_path / "run"), "--csv", str(tmp_path / "x.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("optdyn export: error:") for line in err)
