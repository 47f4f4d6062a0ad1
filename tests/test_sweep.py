"""Sweeps: spec validation, run ids, resumability, executors, collect (issue 6).

Runs are real ``experiments.runs.loop.run`` calls on tiny configs (an MLP on the bundled 8x8
digits, 20 steps). The default suite runs them in-process; the two tests that start
worker processes (kill-and-resume, pool vs Dask) are marked slow.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from experiments import store, sweeps as sweep
from experiments.runs import config as run_config
from experiments.cli import main
from experiments.sweeps.collect import collect, tidy, to_table
from experiments.sweeps.executors import InProcessExecutor, RunTask, dask_resources, make_executor
from experiments.runs import RunConfig

TINY = {"model": "mlp", "data": "digits", "steps": 20, "batch_size": 32}
# lr=1000 on the digits MLP blows the loss up within a few steps (measured: step 3).
DIVERGING_LR = 1000.0


def tiny_spec(root, **axes):
    return sweep.parse_spec({"name": "tiny", "root": str(root), "base": dict(TINY), **axes})


def write_toml(path, text):
    path.write_text(text)
    return path


def wall_clock_free(summary):
    return {k: v for k, v in summary.items() if not k.endswith("seconds")}


@pytest.fixture(scope="module")
def grid_store(tmp_path_factory):
    """One 2×2 sweep (lr × momentum, one lr diverging), run in-process once for the module."""
    root = tmp_path_factory.mktemp("grid")
    spec = tiny_spec(root, grid={"lr": [0.05, DIVERGING_LR], "momentum": [0.5, 0.9]})
    counts = sweep.run_sweep(spec, workers=0, progress=False)
    return spec, root, counts


# ------------------------------------------------------------------ ids and expansion

def test_run_id_is_a_hash_of_the_canonical_full_config():
    a = RunConfig.from_dict({**TINY, "lr": 1})
    b = RunConfig.from_dict({"lr": 1.0, **{k: TINY[k] for k in reversed(list(TINY))}})
    assert run_config.run_id(a) == run_config.run_id(b)  # int vs float, key order
    assert run_config.run_id(a) == run_config.run_id(RunConfig.from_dict(a.to_dict()))
    assert len(run_config.run_id(a)) == 16 and int(run_config.run_id(a), 16) >= 0
    assert run_config.run_id(a) != run_config.run_id(RunConfig.from_dict({**TINY, "lr": 1.0 + 1e-12}))
    assert run_config.run_id(a) == run_config.run_id(RunConfig.from_dict({**TINY, "lr": 1, "weight_decay": -0.0}))
    # defaults are filled in: naming a default explicitly is the same run
    assert run_config.run_id(a) == run_config.run_id(RunConfig.from_dict({**TINY, "lr": 1, "seed": 0}))


def test_run_id_changes_with_the_result_format(monkeypatch):
    config = RunConfig.from_dict(TINY)
    before = run_config.run_id(config)
    monkeypatch.setattr(run_config, "RESULT_FORMAT", run_config.RESULT_FORMAT + 1)
    assert run_config.run_id(config) != before


def test_expansion_is_runs_times_zip_times_grid(tmp_path):
    spec = tiny_spec(tmp_path, runs=[{"opt": "hb"}, {"opt": "nag"}],
                     zip={"lr": [0.1, 0.2, 0.3], "momentum": [0.5, 0.6, 0.7]}, grid={"seed": [0, 1]})
    configs = sweep.expand(spec)
    assert len(configs) == 2 * 3 * 2
    got = [(c.opt, c.lr, c.momentum, c.seed) for c in configs]
    want = [(o, lr, m, s) for o in ("hb", "nag") for lr, m in ((0.1, 0.5), (0.2, 0.6), (0.3, 0.7))
            for s in (0, 1)]
    assert got == want
    assert all(c.model == "mlp" and c.steps == 20 for c in configs)


def test_equal_points_are_one_run(tmp_path):
    # for "gd" the momentum is normalised away, so the two grid points are one config
    spec = tiny_spec(tmp_path, grid={"opt": ["gd"], "momentum": [0.5, 0.9]})
    assert len(sweep.expand(spec)) == 1


# ------------------------------------------------------------------ validation

MALFORMED = [
    ({"name": "x", "bse": {}}, r"unknown key 'bse'; expected one of"),
    ({"name": "x", "base": {"lrr": 0.1}}, r"'base.lrr' is not a RunConfig field"),
    ({"name": "x", "grid": {"momentun": [0.1]}}, r"'grid.momentun' is not a RunConfig field"),
    ({"name": "x", "base": {"lr": "fast"}}, r"base: lr='fast' has type str; expected float"),
    ({"name": "x", "grid": {"steps": [10, 2.5]}}, r"grid.steps\[1\]: steps=2.5 has type float; expected int"),
    ({"name": "x", "grid": {"lr": []}}, r"axis 'grid.lr' must be a non-empty list"),
    ({"name": "x", "grid": {"lr": 0.1}}, r"axis 'grid.lr' must be a non-empty list"),
    ({"name": "x", "runs": []}, r"axis 'runs' must be a non-empty array of tables"),
    ({"name": "x", "zip": {"lr": [0.1, 0.2], "seed": [1]}}, r"\[zip\] must have equal lengths, got lr: 2, seed: 1"),
    ({"name": "x", "base": {"model": "lenet"}}, r"base: model='lenet' is unknown; valid: seed-cnn"),
    ({"name": "x", "runs": [{"model": "lenet"}]}, r"runs\[0\]: model='lenet' is unknown"),
    ({"name": "x", "grid": {"lr": [0.1]}, "zip": {"lr": [0.2]}}, r"'lr' appears in both \[grid\] and \[zip\]"),
    ({"base": {}}, r"key 'name' must be a non-empty string"),
]


@pytest.mark.parametrize("data, message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_spec_names_the_key(data, message):
    with pytest.raises(ValueError, match=message):
        sweep.parse_spec(data)


def test_cli_malformed_spec_is_one_line_exit_2_before_any_run(tmp_path, capsys):
    root = tmp_path / "store"
    spec = write_toml(tmp_path / "bad.toml", f"""
name = "bad"
root = "{root}"
[base]
model = "mlp"
data = "digits"
steps = 20
[grid]
lr = [0.05, "0.1"]
""")
    assert main(["sweep", str(spec), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "grid.lr[1]: lr='0.1' has type str; expected float" in err
    assert not root.exists()  # nothing ran, nothing was created
    write_toml(spec, "name = 'bad'\n[grid\nlr = [1]\n")
    assert main(["sweep", str(spec)]) == 2
    assert "is not valid TOML" in capsys.readouterr().err


def test_dry_run_lists_without_running(tmp_path, capsys):
    root = tmp_path / "store"
    spec = write_toml(tmp_path / "s.toml", f"""
name = "dry"
root = "{root}"
[base]
model = "mlp"
data = "digits"
steps = 20
[grid]
lr = [0.05, 0.1]
seed = [0, 1, 2]
""")
    assert main(["sweep", str(spec), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ids = [run_config.run_id(c) for c in sweep.expand(sweep.load_spec(spec))]
    assert [line.split()[0] for line in lines[:-1]] == ids
    assert all(" todo " in line for line in lines[:-1]) and "lr=0.1 seed=2" in lines[-2]
    assert lines[-1] == f"6 runs in {root}: done 0 / failed 0 / to run 6"
    assert not root.exists()


def test_example_spec_reproduces_the_seed_setting():
    spec = sweep.load_spec(sweep.SPECS_DIR / "seed_cnn.toml")
    configs = sweep.expand(spec)
    assert len(configs) == 12
    for c in configs:
        assert (c.model, c.data, c.opt, c.batch_size, c.schedule) == ("seed-cnn", "mnist1d", "hb", 32, "step")
        assert c.momentum > 0 and c.step_gamma < 1


SPEC_FILES = sorted(sweep.SPECS_DIR.glob("*.toml"))


@pytest.mark.parametrize("path", SPEC_FILES, ids=[p.stem for p in SPEC_FILES])
def test_every_shipped_spec_is_valid(path):
    spec = sweep.load_spec(path)
    assert sweep.expand(spec)


# ------------------------------------------------------------------ running and resuming

def test_diverging_lr_is_a_finished_result_and_the_others_are_unaffected(grid_store, tmp_path):
    spec, root, counts = grid_store
    assert counts == {"finished": 4, "skipped": 0, "diverged": 2, "failed": 0,
                      "total": 4, "held": 0, "failed_before": 0}
    ds = collect(spec)
    assert ds.sizes == {"lr": 2, "momentum": 2}
    np.testing.assert_array_equal(ds.diverged.sel(lr=DIVERGING_LR), [True, True])
    np.testing.assert_array_equal(ds.diverged.sel(lr=0.05), [False, False])
    assert np.all(ds.diverged_step.sel(lr=DIVERGING_LR) >= 0)
    assert np.all(np.isfinite(ds.final_loss.sel(lr=0.05)))
    # unaffected: the same config run alone elsewhere gives the identical trace and summary
    alone = tiny_spec(tmp_path, base={**TINY, "lr": 0.05, "momentum": 0.9})
    assert sweep.run_sweep(alone, workers=0, progress=False)["finished"] == 1
    rid = run_config.run_id(sweep.expand(alone)[0])
    a, b = store.load_run(root / rid), store.load_run(tmp_path / rid)
    assert wall_clock_free(a.attrs.pop("summary")) == wall_clock_free(b.attrs.pop("summary"))
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())


def test_resume_skips_finished_runs_without_touching_them(grid_store):
    spec, root, _ = grid_store
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    counts = sweep.run_sweep(spec, workers=0, progress=False)
    assert counts == {"finished": 0, "skipped": 4, "diverged": 0, "failed": 0,
                      "total": 4, "held": 0, "failed_before": 0}
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps


def test_a_run_that_raises_is_failed_and_retried_only_on_request(tmp_path, monkeypatch):
    # MNIST needs local files; with an empty data directory the run raises inside train.run
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("OPTDYN_DATA", str(tmp_path / "empty"))
    spec = tiny_spec(tmp_path / "store", runs=[{"data": "digits"}, {"data": "mnist"}])
    counts = sweep.run_sweep(spec, workers=0, progress=False)
    assert counts == {"finished": 1, "skipped": 0, "diverged": 0, "failed": 1,
                      "total": 2, "held": 0, "failed_before": 0}
    plan = sweep.plan(spec)
    failed_dir = tmp_path / "store" / plan.ids[plan.status.index("failed")]
    text = (failed_dir / store.FAILED).read_text()
    assert "Traceback" in text and "mnist" in text
    assert not store.is_done(failed_dir) and store.is_failed(failed_dir)
    stamp = (failed_dir / store.FAILED).stat().st_mtime_ns

    again = sweep.run_sweep(spec, workers=0, progress=False)
    assert again == {"finished": 0, "skipped": 1, "diverged": 0, "failed": 1, "total": 2, "held": 0,
                     "failed_before": 1}
    assert (failed_dir / store.FAILED).stat().st_mtime_ns == stamp  # not run again

    time.sleep(0.01)
    retried = sweep.run_sweep(spec, workers=0, progress=False, retry_failed=True)
    assert retried == {"finished": 0, "skipped": 1, "diverged": 0, "failed": 1,
                      "total": 2, "held": 0, "failed_before": 0}
    assert (failed_dir / store.FAILED).stat().st_mtime_ns > stamp  # it was run again


def test_leftovers_of_a_killed_run_are_replaced(tmp_path):
    spec = tiny_spec(tmp_path)
    run_dir = tmp_path / run_config.run_id(sweep.expand(spec)[0])
    run_dir.mkdir()
    (run_dir / ".tmp-abc123").write_bytes(b"half a trace")
    (run_dir / store.CONFIG).write_text("{}")  # written before the kill; no DONE
    assert sweep.run_sweep(spec, workers=0, progress=False)["finished"] == 1
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        [store.CONFIG, store.TRACE, store.SUMMARY, store.DONE])
    assert store.read_json(run_dir / store.CONFIG)["model"] == "mlp"


def test_cli_sweep_prints_the_counts_line_and_collects(tmp_path, capsys):
    root = tmp_path / "store"
    spec = write_toml(tmp_path / "s.toml", f"""
name = "cli"
root = "{root}"
[base]
model = "mlp"
data = "digits"
steps = 20
[zip]
lr = [0.05, {DIVERGING_LR}]
momentum = [0.9, 0.5]
""")
    assert main(["sweep", str(spec), "--workers", "0", "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "finished 2 / skipped 0 / diverged 1 / failed 0"
    assert main(["sweep", str(spec), "--workers", "0", "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "finished 0 / skipped 2 / diverged 0 / failed 0"
    csv = tmp_path / "t.csv"
    assert main(["collect", str(spec), "--csv", str(csv)]) == 0
    table = pd.read_csv(csv)
    assert len(table) == 2 and list(table.lr) == [0.05, DIVERGING_LR] and list(table.momentum) == [0.9, 0.5]
    assert list(table.diverged) == [False, True]


def test_cuda_runs_ask_dask_for_a_gpu_worker():
    def task(device):
        return RunTask("x", RunConfig.from_dict({**TINY, "device": device}).to_dict(), "/nowhere")

    assert dask_resources(task("cuda")) == {"GPU": 1} == dask_resources(task("cuda:1"))
    assert dask_resources(task("cpu")) is None


def test_executor_choice_and_its_errors():
    assert isinstance(make_executor(workers=0), InProcessExecutor)
    assert make_executor(workers=3).workers == 3
    assert make_executor().workers == os.cpu_count()
    assert make_executor(dask_local=2).n_local == 2
    with pytest.raises(ValueError, match="workers=-1 is outside the valid range"):
        make_executor(workers=-1)
    with pytest.raises(ValueError, match="workers cannot be combined"):
        make_executor(workers=2, dask_local=2)
    with pytest.raises(ValueError, match="dask_local=0 is outside the valid range"):
        make_executor(dask_local=0)


# ------------------------------------------------------------------ collect

def test_collect_flat_root_has_a_run_dim_with_config_coords(grid_store):
    spec, root, _ = grid_store
    ds = collect(root)
    ids = sorted(run_config.run_id(c) for c in sweep.expand(spec))
    assert list(ds.run.values) == ids and ds.diverged.dims == ("run",)
    for rid in ids:
        config = store.read_json(root / rid / store.CONFIG)
        assert ds.lr.sel(run=rid).item() == config["lr"]
        assert ds.final_loss.sel(run=rid).item() == pytest.approx(
            store.read_json(root / rid / store.SUMMARY)["final_loss"] or np.nan, nan_ok=True)
    assert collect(root, run_ids=ids[:1]).sizes["run"] == 1


def test_collect_traces_are_aligned_on_step_and_layer(grid_store):
    spec, root, _ = grid_store
    ds = collect(spec, traces=True)
    assert ds["loss"].dims == ("lr", "momentum", "step")
    assert ds["grad_norm"].dims == ("lr", "momentum", "step", "layer")
    assert ds.sizes["step"] == TINY["steps"]
    # a diverged run's trace stops at its diverged step; the outer join pads it with NaN
    for m in (0.5, 0.9):
        stop = int(ds.diverged_step.sel(lr=DIVERGING_LR, momentum=m))
        loss = ds["loss"].sel(lr=DIVERGING_LR, momentum=m).values
        assert np.all(np.isnan(loss[stop + 1:])) and not np.all(np.isnan(loss[:stop]))
    assert np.all(np.isfinite(ds["loss"].sel(lr=0.05)))
    # the per-step lr of the trace does not collide with the lr axis
    np.testing.assert_allclose(ds["trace.lr"].sel(lr=0.05, momentum=0.9), 0.05)
    rid = str(ds.run_id.sel(lr=0.05, momentum=0.5).item())
    xr.testing.assert_equal(ds["grad_norm"].sel(lr=0.05, momentum=0.5).reset_coords(drop=True),
                            store.load_run(root / rid)["grad_norm"])


def test_collect_marks_missing_points_nan(grid_store, tmp_path):
    spec, root, _ = grid_store
    bigger = sweep.parse_spec({"name": "b", "root": str(root), "base": dict(TINY),
                               "grid": {"lr": [0.05, DIVERGING_LR, 0.01], "momentum": [0.5, 0.9]}})
    ds = collect(bigger)
    assert ds.sizes == {"lr": 3, "momentum": 2}
    assert ds.final_loss.sel(lr=0.01).isnull().all() and ds.run_id.sel(lr=0.01).isnull().all()
    table = to_table(ds, tmp_path / "t.csv")
    assert len(table) == 4  # the two missing points are dropped from the tidy table
    assert table.diverged.dtype == bool
    assert_one_type_per_column(table)
    assert len(pd.read_csv(tmp_path / "t.csv")) == 4


def test_collect_zip_and_runs_axes_are_dims_with_their_keys_as_coords(grid_store):
    spec, root, _ = grid_store  # these points are all runs of the grid, finished already
    zipped = tiny_spec(root, zip={"lr": [0.05, DIVERGING_LR], "momentum": [0.5, 0.9]})
    ds = collect(zipped)
    assert ds.sizes == {"zip": 2} and list(ds.lr.values) == [0.05, DIVERGING_LR]
    assert list(ds.momentum.values) == [0.5, 0.9] and ds.momentum.dims == ("zip",)
    grid = collect(spec)
    assert ds.final_loss.values[0] == grid.final_loss.sel(lr=0.05, momentum=0.5).item()
    assert list(ds.diverged.values) == [False, True]

    listed = tiny_spec(root, runs=[{"lr": DIVERGING_LR, "momentum": 0.5}, {"lr": 0.05, "momentum": 0.9}],
                       grid={"seed": [0]})
    ds = collect(listed)
    assert ds.sizes == {"runs": 2} and list(ds.lr.values) == [DIVERGING_LR, 0.05]
    assert ds.seed.dims == () and ds.model.item() == "mlp"  # constant: a scalar coordinate
    assert ds.run_id.values[1] == grid.run_id.sel(lr=0.05, momentum=0.9).item()


def test_tidy_table_of_traces_is_long(grid_store):
    spec, _, _ = grid_store
    ds = collect(spec, traces=True)
    table = tidy(ds)
    assert {"variable", "value", "lr", "momentum", "step", "layer"} <= set(table.columns)
    grad = table[table.variable == "grad_norm"]
    n_finite = int(np.isfinite(ds.grad_norm).sum())
    assert len(grad) == n_finite
    assert table["value"].dtype == float and set(table.variable) >= {"diverged", "loss", "final_loss"}
    assert "run_id" in table.columns and "run_id" not in set(table.variable)
    assert_one_type_per_column(table)


def assert_one_type_per_column(table):
    """What Parquet needs: every object column holds one Python type (NaN aside)."""
    for column in table.columns[table.dtypes == object]:
        kinds = {type(v) for v in table[column] if not pd.isna(v)}
        assert len(kinds) <= 1, (column, kinds)


def test_parquet_without_pyarrow_is_a_clear_error(grid_store, tmp_path, monkeypatch):
    spec, _, _ = grid_store
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    with pytest.raises(ValueError, match="Parquet needs pyarrow"):
        to_table(collect(spec), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="valid: csv, parquet"):
        to_table(collect(spec), tmp_path / "t.xlsx")


# ------------------------------------------------------------------ worker processes (slow)

def _done_dirs(root):
    return sorted(p.parent for p in Path(root).glob(f"*/{store.DONE}"))


@pytest.mark.slow
def test_sigkill_the_process_group_then_resume(tmp_path):
    root = tmp_path / "store"
    n_runs = 8
    spec = write_toml(tmp_path / "kill.toml", f"""
name = "kill"
root = "{root}"
[base]
model = "mlp"
data = "digits"
steps = 200
[grid]
lr = [0.01, 0.02, 0.03, 0.04]
seed = [0, 1]
""")
    command = [sys.executable, "-m", "experiments.cli", "sweep", str(spec), "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while len(_done_dirs(root)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its pool workers, mid-run
    proc.wait()
    done_before = _done_dirs(root)
    assert 2 <= len(done_before) < n_runs, "the kill landed after the sweep ended; make runs longer"
    # DONE implies complete: every marked run loads, with all its files
    stamps = {}
    for run_dir in done_before:
        store.load_run(run_dir)
        stamps.update({p: p.stat().st_mtime_ns for p in run_dir.iterdir()})

    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == (
        f"finished {n_runs - len(done_before)} / skipped {len(done_before)} / diverged 0 / failed 0")
    assert len(_done_dirs(root)) == n_runs == len(list(root.iterdir()))
    assert not list(root.rglob(".tmp-*"))
    for run_dir in root.iterdir():
        assert sorted(p.name for p in run_dir.iterdir()) == sorted(
            [store.CONFIG, store.TRACE, store.SUMMARY, store.DONE])
        assert store.load_run(run_dir).attrs["summary"]["steps_done"] == 200
    # finished runs were not recomputed: their files are the very same
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.mark.slow
def test_local_pool_and_dask_local_cluster_give_identical_results(tmp_path):
    axes = {"grid": {"lr": [0.05, DIVERGING_LR], "opt": ["hb", "nag"]}}
    pool_spec = tiny_spec(tmp_path / "pool", **axes)
    dask_spec = tiny_spec(tmp_path / "dask", **axes)
    want = {"finished": 4, "skipped": 0, "diverged": 2, "failed": 0,
                      "total": 4, "held": 0, "failed_before": 0}
    assert sweep.run_sweep(pool_spec, workers=2, progress=False) == want
    assert sweep.run_sweep(dask_spec, dask_local=2, progress=False) == want
    ids = [run_config.run_id(c) for c in sweep.expand(pool_spec)]
    assert sorted(p.name for p in (tmp_path / "dask").iterdir()) == sorted(ids)
    for rid in ids:
        a, b = store.load_run(tmp_path / "pool" / rid), store.load_run(tmp_path / "dask" / rid)
        assert wall_clock_free(a.attrs.pop("summary")) == wall_clock_free(b.attrs.pop("summary"))
        assert a.attrs.pop("config") == b.attrs.pop("config")
        xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
    # the in-process executor agrees too (one torch thread there as well)
    in_process = tiny_spec(tmp_path / "inproc", **axes)
    sweep.run_sweep(in_process, workers=0, progress=False)
    wall = ["wall_seconds", "tracer_seconds"]
    xr.testing.assert_identical(collect(in_process, traces=True).drop_vars(wall).drop_attrs(),
                                collect(pool_spec, traces=True).drop_vars(wall).drop_attrs())


@pytest.mark.slow
def test_dask_scheduler_address_routes_cuda_runs_to_gpu_workers_and_records_failures(tmp_path):
    from distributed import LocalCluster

    # one worker that declares a GPU (this machine has none): the CUDA run is accepted
    # there, raises inside train.run, and comes back as a recorded failure
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, resources={"GPU": 1}) as cluster:
        spec = tiny_spec(tmp_path, runs=[{"device": "cpu"}, {"device": "cuda"}])
        counts = sweep.run_sweep(spec, scheduler=cluster.scheduler_address, progress=False)
    plan = sweep.plan(spec)
    if counts["failed"] == 0:  # a CUDA machine: both ran
        assert counts["finished"] == 2
        return
    assert counts == {"finished": 1, "skipped": 0, "diverged": 0, "failed": 1,
                      "total": 2, "held": 0, "failed_before": 0}
    failed = tmp_path / plan.ids[plan.status.index("failed")]
    assert store.read_json(failed / store.CONFIG)["device"] == "cuda"
    assert "Traceback" in (failed / store.FAILED).read_text()
