"""Run directories: atomic writes leave no partial files; DONE is written last."""

import json
import os

import numpy as np
import pytest
import xarray as xr

from experiments import store


def _trace():
    return xr.Dataset(
        {"grad_norm": (("step", "layer"), np.arange(6.0).reshape(3, 2)), "loss": ("step", [3.0, 2.0, 1.0])},
        coords={"step": [0, 1, 2], "layer": ["conv1", "fc1"]},
    )


def test_write_run_round_trip(tmp_path):
    store.write_run(tmp_path / "r", {"lr": 0.1}, _trace(), {"diverged": False, "final_loss": np.float32(1.0)})
    ds = store.load_run(tmp_path / "r")
    xr.testing.assert_equal(ds.drop_attrs(), _trace())
    assert ds.attrs["config"] == {"lr": 0.1}
    assert ds.attrs["summary"] == {"diverged": False, "final_loss": 1.0}
    assert sorted(os.listdir(tmp_path / "r")) == ["DONE", "config.json", "summary.json", "trace.nc"]


def test_unfinished_run_is_refused(tmp_path):
    store.atomic_write_json(tmp_path / "r" / "config.json", {"lr": 0.1})
    assert not store.is_done(tmp_path / "r")
    with pytest.raises(ValueError, match="not a finished run"):
        store.load_run(tmp_path / "r")


def test_failed_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "x.json"
    store.atomic_write_json(target, {"a": 1})
    with pytest.raises(TypeError):
        store.atomic_write_json(target, {"a": object()})  # fails while serialising
    assert json.loads(target.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["x.json"]


def test_interrupted_byte_write_keeps_old_content(tmp_path, monkeypatch):
    target = tmp_path / "x.bin"
    store.atomic_write_bytes(target, b"old")

    def boom(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        store.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.bin"]


def test_failure_then_success(tmp_path):
    store.write_failure(tmp_path / "r", {"lr": 1.0}, "Traceback: boom")
    assert store.is_failed(tmp_path / "r") and not store.is_done(tmp_path / "r")
    store.write_run(tmp_path / "r", {"lr": 1.0}, _trace(), {"diverged": True})
    assert store.is_done(tmp_path / "r") and not store.is_failed(tmp_path / "r")
