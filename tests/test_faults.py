"""Fault injection (issue 13): nothing lost, nothing done twice, nothing stale.

Kills, races and interrupts run real processes: the parent is a small Python script (or the
``optdyn`` CLI) running tiny linreg runs, and a counting run function logs every start and
end of a training to a file, so "trained exactly once" is counted, not assumed. Those tests
start worker processes (a torch import each) and are marked slow; the rest run in-process.
"""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import store
from experiments.cli import main
from experiments.runs import RunConfig
from experiments.runs import loop
from experiments.sweeps import runner
from experiments.sweeps.executors import run_training

REPO = Path(__file__).resolve().parents[1]
LOG_ENV, SLEEP_ENV = "OPTDYN_FAULT_LOG", "OPTDYN_FAULT_SLEEP"
TINY = {"model": "linear", "data": "linreg", "data_args": {"dim": 4, "n_train": 32}, "batch_size": 8,
        "steps": 5, "threads": 1}
SMALL = ["--batch-size", "8", "--steps", "3", "--threads", "1", "--no-progress"]
QUICK = ["--model", "linear", "--data", "linreg", "--data-arg", "dim=4", "--data-arg", "n_train=32", *SMALL]
COUNTING = "tests.test_faults:counting_run"


def counting_run(config, run_dir, data_dir=None):
    """``run_training`` that logs ``start``/``end`` with the run dir and PID (append, one
    write per line: atomic for short lines), after sleeping ``$OPTDYN_FAULT_SLEEP`` seconds
    inside the claim (so a kill or a rival lands while the run is held)."""
    log = os.environ.get(LOG_ENV)

    def note(what):
        if log:
            with open(log, "a") as f:
                f.write(f"{what} {Path(run_dir).name} {os.getpid()}\n")

    note("start")
    time.sleep(float(os.environ.get(SLEEP_ENV, "0")))
    summary = run_training(config, run_dir, data_dir)
    note("end")
    return summary


def log_counts(path, what):
    """{run id: number of ``what`` lines} from a counting log."""
    counts = {}
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            kind, rid, _ = line.split()
            if kind == what:
                counts[rid] = counts.get(rid, 0) + 1
    return counts


def spec_dict(root, n, **base):
    return {"name": "faults", "root": str(root), "base": {**TINY, **base},
            "grid": {"lr": [round(0.01 * (i + 1), 2) for i in range(n)]}}


def write_spec(path, root, n, **base):
    lrs = ", ".join(str(round(0.01 * (i + 1), 2)) for i in range(n))
    keys = {"model": "linear", "data": "linreg", "batch_size": 8, "steps": 5, "threads": 1, **base}
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    path.write_text(f'name = "faults"\nroot = "{root}"\n[base]\n{lines}[base.data_args]\ndim = 4\n'
                    f'n_train = 32\n[grid]\nlr = [{lrs}]\n')
    return path


def done_ids(root):
    return sorted(p.parent.name for p in Path(root).glob(f"*/{store.DONE}"))


def exit_code(argv):
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def one_line(err, *words):
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------ 12, 4: files

@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_store_files_honour_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        store.atomic_write_json(tmp_path / "r" / store.CONFIG, {"lr": 0.1})
        store.atomic_write_text(tmp_path / "r" / store.DONE, "")
    finally:
        os.umask(old)
    for name in (store.CONFIG, store.DONE):
        assert stat.S_IMODE((tmp_path / "r" / name).stat().st_mode) == mode


def test_stale_temporaries_are_cleaned_when_the_run_is_next_written(tmp_path):
    out = tmp_path / "run"
    config = RunConfig.from_dict(TINY)
    out.mkdir()
    (out / ".tmp-abc123").write_bytes(b"half a trace")  # a kill during the final write
    store.atomic_write_json(out / store.CONFIG, config.to_dict())
    loop.run(config, out)
    assert sorted(p.name for p in out.iterdir()) == sorted([store.CONFIG, store.TRACE, store.SUMMARY, store.DONE])


@pytest.mark.slow
def test_kill_during_the_final_write_then_rerun(tmp_path):
    """SIGKILL inside the trace's atomic write (after the temporary is written, before the
    rename): nothing is taken as finished; the rerun trains once and leaves no temporary."""
    out = tmp_path / "run"
    script = (
        "import os, signal\n"
        "from experiments import store\n"
        "from experiments.runs import RunConfig, loop\n"
        "real = store.atomic_write_bytes\n"
        "def dying(path, data):\n"
        "    if str(path).endswith('trace.nc'):\n"
        "        open(os.path.join(os.path.dirname(path), '.tmp-killed'), 'wb').write(data[:100])\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(path, data)\n"
        "store.atomic_write_bytes = dying\n"
        f"loop.run(RunConfig.from_dict({TINY!r}), {str(out)!r})\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert (out / ".tmp-killed").exists() and not store.is_done(out) and (out / store.LOCK).exists()
    summary = loop.run(RunConfig.from_dict(TINY), out)  # the dead PID's lock is stale: taken over
    assert summary["steps_done"] == 5
    assert sorted(p.name for p in out.iterdir()) == sorted([store.CONFIG, store.TRACE, store.SUMMARY, store.DONE])
    store.load_run(out)


# ------------------------------------------------------------------ 2: claims

def test_claim_writes_owner_and_releases(tmp_path):
    with store.claim(tmp_path / "r"):
        info = store.read_lock(tmp_path / "r")
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert isinstance(info["start"], int)
        with store.claim(tmp_path / "r"):  # re-entrant in one process
            pass
        assert (tmp_path / "r" / store.LOCK).exists()
    assert not (tmp_path / "r" / store.LOCK).exists()


def _lock(run_dir, **info):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / store.LOCK).write_text(json.dumps({"host": socket.gethostname(), "time": time.time(), **info}))


@pytest.fixture
def live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_run_held_by_a_live_process_is_refused(tmp_path, live_process, capsys):
    out = tmp_path / "run"
    _lock(out, pid=live_process.pid, start=store._process_start(live_process.pid)[0])
    with pytest.raises(store.RunHeld, match=f"held by pid {live_process.pid}"):
        loop.run(RunConfig.from_dict(TINY), out)
    assert exit_code(["train", "--out", str(out), *QUICK]) == 2
    one_line(capsys.readouterr().err, "optdyn train: error:", f"held by pid {live_process.pid}")
    assert not store.is_done(out) and not (out / store.FAILED).exists()


@pytest.mark.parametrize("which", ["dead pid", "reused pid", "unreadable and old"])
def test_a_stale_lock_is_taken_over_and_the_run_trained_once(tmp_path, which, monkeypatch):
    out = tmp_path / "run"
    if which == "dead pid":
        _lock(out, pid=dead_pid(), start=1)
    elif which == "reused pid":  # a live PID, but started at another time than the lock says
        _lock(out, pid=os.getppid(), start=store._process_start(os.getppid())[0] + 1)
    else:
        out.mkdir()
        (out / store.LOCK).write_text("{trunc")
        old = time.time() - store.UNREADABLE_LOCK_SECONDS - 1
        os.utime(out / store.LOCK, (old, old))
    log = tmp_path / "log"
    monkeypatch.setenv(LOG_ENV, str(log))
    summary = counting_run(RunConfig.from_dict(TINY).to_dict(), out)
    assert summary["steps_done"] == 5
    assert log_counts(log, "end") == {"run": 1} and store.is_done(out)
    assert not (out / store.LOCK).exists()


def test_a_sweep_skips_runs_another_process_holds(tmp_path, live_process, monkeypatch, capsys):
    root = tmp_path / "store"
    spec = write_spec(tmp_path / "s.toml", root, 3)
    the_plan = runner.plan(spec)
    held = root / the_plan.ids[1]
    _lock(held, pid=live_process.pid, start=store._process_start(live_process.pid)[0])
    log = tmp_path / "log"
    monkeypatch.setenv(LOG_ENV, str(log))
    counts = runner.run_sweep(spec, workers=0, progress=False, run_fn=COUNTING)
    assert (counts["finished"], counts["held"], counts["failed"]) == (2, 1, 0)
    assert log_counts(log, "end") == {the_plan.ids[0]: 1, the_plan.ids[2]: 1}  # 2 trained, as it should
    assert not store.is_done(held) and store.read_lock(held)["pid"] == live_process.pid
    assert "held 1" in runner.format_counts(counts)
    assert any("another process" in h for h in runner.format_hints(counts))



def test_a_finished_run_keeps_no_lock_of_a_claimant_killed_after_done(tmp_path, live_process, monkeypatch):
    """A claimant killed between writing DONE and releasing its claim leaves its LOCK in a
    finished run; the next plan of the sweep removes it (a live owner's lock stays)."""
    root = tmp_path / "store"
    spec = write_spec(tmp_path / "s.toml", root, 2)
    monkeypatch.setenv(LOG_ENV, str(tmp_path / "log"))
    runner.run_sweep(spec, workers=0, progress=False, run_fn=COUNTING)
    dead, live = (root / rid for rid in runner.plan(spec).ids)
    _lock(dead, pid=dead_pid(), start=1)
    _lock(live, pid=live_process.pid, start=store._process_start(live_process.pid)[0])
    assert runner.plan(spec).status == ["done", "done"]
    assert not (dead / store.LOCK).exists()
    assert store.read_lock(live)["pid"] == live_process.pid

# ------------------------------------------------------------------ 5, 6: stale or silent results

def test_train_into_a_finished_out_says_nothing_was_trained(tmp_path, capsys):
    out = tmp_path / "run"
    assert exit_code(["train", "--out", str(out), *QUICK]) == 0
    first = json.loads(capsys.readouterr().out)
    stamp = (out / store.TRACE).stat().st_mtime_ns
    assert exit_code(["train", "--out", str(out), *QUICK]) == 0
    captured = capsys.readouterr()
    one_line(captured.err, "nothing trained", str(out))
    assert json.loads(captured.out) == first and (out / store.TRACE).stat().st_mtime_ns == stamp
    assert exit_code(["train", "--out", str(out), *QUICK, "--lr", "0.2"]) == 2  # another config
    one_line(capsys.readouterr().err, "another config")


def write_mnist(directory, seed, n_train=64, n_test=16):
    """Four small IDX files in MNIST's format (random pixels, labels 0..9)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)

    def idx(name, array):
        header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        (directory / name).write_bytes(header + array.astype(np.uint8).tobytes())

    idx("train-images-idx3-ubyte", rng.integers(0, 256, (n_train, 28, 28)))
    idx("train-labels-idx1-ubyte", rng.integers(0, 10, n_train))
    idx("t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28)))
    idx("t10k-labels-idx1-ubyte", rng.integers(0, 10, n_test))


MNIST = ["--model", "linear", "--data", "mnist", "--batch-size", "16", "--steps", "3", "--threads", "1",
         "--no-progress"]


def test_changed_data_files_are_not_returned_as_the_finished_run(tmp_path, capsys):
    data, out = tmp_path / "mnist", tmp_path / "run"
    write_mnist(data, seed=0)
    assert exit_code(["train", "--out", str(out), "--data-dir", str(data), *MNIST]) == 0
    fingerprint = json.loads(capsys.readouterr().out)["data_fingerprint"]
    write_mnist(data, seed=1)  # same paths and sizes, other contents
    assert exit_code(["train", "--out", str(out), "--data-dir", str(data), *MNIST]) == 2
    one_line(capsys.readouterr().err, "other data", fingerprint)
    write_mnist(data, seed=0)  # the original files again: the finished run is current
    assert exit_code(["train", "--out", str(out), "--data-dir", str(data), *MNIST]) == 0
    assert "nothing trained" in capsys.readouterr().err

    # a sweep over the same files finds the run finished; over changed files it refuses
    root = tmp_path / "store"
    spec = tmp_path / "m.toml"
    spec.write_text(f'name = "m"\nroot = "{root}"\n[base]\nmodel = "linear"\ndata = "mnist"\n'
                    f'batch_size = 16\nsteps = 3\nthreads = 1\n[grid]\nlr = [0.01, 0.02]\n')
    assert exit_code(["sweep", str(spec), "--data-dir", str(data), "--workers", "0", "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("finished 2 / skipped 0")
    write_mnist(data, seed=1)
    assert exit_code(["sweep", str(spec), "--data-dir", str(data), "--workers", "0", "--no-progress"]) == 2
    one_line(capsys.readouterr().err, "optdyn sweep: error:", "other data files")


def run_on_lowered_kernels(config, out_dir):
    """Train the config dict ``config`` into ``out_dir`` in a subprocess whose torch kernels have
    no vector instructions (``ATEN_CPU_CAPABILITY=default``): another machine, as far as the
    round-off goes."""
    code = ("import sys; from experiments.runs import RunConfig, loop; "
            f"loop.run(RunConfig.from_dict({config!r}), sys.argv[1])")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    subprocess.run([sys.executable, "-c", code, str(out_dir)], env=env, check=True, timeout=300)


def test_summary_records_the_kernels_instruction_set(tmp_path):
    """The same config on another machine can dispatch torch's CPU kernels to another
    instruction set, which changes a long run's trajectory (docs/findings/faults.md): the
    summary says which one ran. ``ATEN_CPU_CAPABILITY=default`` stands in for another machine."""
    import torch

    native = loop.run(RunConfig.from_dict(TINY), tmp_path / "native")
    assert native["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    run_on_lowered_kernels(TINY, tmp_path / "lowered")
    assert store.read_json(tmp_path / "lowered" / store.SUMMARY)["cpu_capability"] == "DEFAULT"


@pytest.mark.skipif(__import__("torch").backends.cpu.get_cpu_capability() == "DEFAULT",
                    reason="needs kernels above DEFAULT to stand in for another machine with ATEN_CPU_CAPABILITY")
def test_a_checkpoint_is_not_remade_from_a_run_another_machine_made(tmp_path, capsys):
    """``whatif --check`` remakes a missing checkpoint by training the run again up to k. A run
    made on another machine (kernels dispatched to another instruction set; here simulated with
    ATEN_CPU_CAPABILITY=default) is not repeated bit for bit: the forks would start from another
    trajectory than the one the prediction reads. The remade losses are compared with the trace."""
    from experiments.runs.config import run_id
    from experiments.whatif.check import ensure_checkpoint
    from tests.test_whatif import TINY

    cfg = RunConfig(**TINY)
    elsewhere = tmp_path / "elsewhere" / run_id(cfg)
    run_on_lowered_kernels(cfg.to_dict(), elsewhere)
    with pytest.raises(ValueError, match=r"does not repeat the run .*made with cpu_capability=DEFAULT"):
        ensure_checkpoint(elsewhere, 30)
    assert not (elsewhere / "checkpoints").exists() or not any((elsewhere / "checkpoints").iterdir())
    assert exit_code(["whatif", str(elsewhere), "--at", "30", "--lr-factor", "0.5", "--check"]) == 2
    one_line(capsys.readouterr().err, "optdyn whatif: error:", "does not repeat the run", "step 30")
    here = tmp_path / "here" / run_id(cfg)
    loop.run(cfg, here)
    ensure_checkpoint(here, 30)  # made on this machine: repeated, saved
    assert (here / "checkpoints" / "step-00000030.pt").exists()


def test_summary_records_threads_versions_and_device(tmp_path, capsys):
    import torch

    for threads in (2, 0):
        summary = loop.run(RunConfig.from_dict({**TINY, "threads": threads}), tmp_path / f"t{threads}")
        assert summary["threads"] == (threads or torch.get_num_threads())
        assert summary["versions"]["torch"] == torch.__version__
        assert summary["versions"]["numpy"] == np.__version__
        assert summary["versions"]["optdyn"] not in ("", "unknown") and summary["device"] == "cpu"
        assert store.read_json(tmp_path / f"t{threads}" / store.SUMMARY) == summary
    assert exit_code(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("optdyn ") and f"torch {torch.__version__}" in out


# ------------------------------------------------------------------ 7, 8: collect, link, sweep

@pytest.fixture
def partial_store(tmp_path):
    """A 4-point spec under ROOT/runs: 2 finished (one diverged), 1 failed, 1 never run."""
    root = tmp_path / "store" / "runs"
    spec = write_spec(tmp_path / "p.toml", root, 4, probe_every=2)
    ids = runner.plan(spec).ids
    text = spec.read_text().replace("lr = [0.01, 0.02, 0.03, 0.04]", "lr = [0.01, 0.02, 0.03, 1e9]")
    spec.write_text(text)
    ids = runner.plan(spec).ids
    for rid, config in zip(ids[:1] + ids[3:], [runner.plan(spec).configs[i] for i in (0, 3)]):
        loop.run(config, root / rid)
    store.write_failure(root / ids[1], runner.plan(spec).configs[1].to_dict(), "Traceback: boom")
    return spec, root, ids


def test_collect_finds_store_runs_and_reports_missing_and_failed(partial_store, tmp_path, capsys):
    spec, root, ids = partial_store
    csv = tmp_path / "summary.csv"
    assert exit_code(["collect", str(root.parent), "--csv", str(csv)]) == 0  # the README's command
    captured = capsys.readouterr()
    assert captured.out == f"wrote 2 rows to {csv}\n"
    one_line(captured.err, "2 of 3 points finished (1 of them diverged), 0 missing, 1 failed", str(root))
    assert exit_code(["collect", str(spec), "--csv", str(csv), "--strict"]) == 1
    one_line(capsys.readouterr().err, "2 of 4 points finished (1 of them diverged), 1 missing, 1 failed")
    assert exit_code(["link", str(spec)]) == 0
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("optdyn link: 2 of 4 points finished (1 of them diverged), 1 missing")
    assert exit_code(["link", str(spec), "--strict"]) == 1
    capsys.readouterr()


def test_sweep_with_failed_runs_hints_at_retry(partial_store, capsys):
    spec, root, ids = partial_store
    assert exit_code(["sweep", str(spec), "--workers", "0", "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1] == "finished 1 / skipped 2 / diverged 0 / failed 1"
    one_line(captured.err, "1 run(s) had failed before", "--retry-failed")
    assert exit_code(["sweep", str(spec), "--workers", "0", "--no-progress", "--retry-failed"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1] == "finished 1 / skipped 3 / diverged 0 / failed 0"
    assert "--retry-failed" not in captured.err


# ------------------------------------------------------------------ 9, 10, 11: bad input up front

@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("trained although the input was checkable up front")

    monkeypatch.setattr(loop, "_train", refuse)


def test_unwritable_outputs_fail_before_any_work(partial_store, tmp_path, capsys, no_training):
    spec, root, _ = partial_store
    afile = tmp_path / "afile"
    afile.write_text("")
    for argv, words in [
        (["train", "--out", "/proc/x", *QUICK], ["out_dir='/proc/x'", "not writable"]),
        (["train", "--out", str(afile / "run"), *QUICK], ["out_dir=", "not writable"]),
        (["train", "--out", str(afile), *QUICK], ["exists and is not a directory"]),
        (["sweep", str(spec), "--root", "/proc/x", "--workers", "0"], ["root='/proc/x'", "not writable"]),
        (["collect", str(root), "--csv", "/proc/x.csv"], ["csv='/proc/x.csv'", "not writable"]),
        (["collect", str(root), "--parquet", str(afile / "x.parquet")], ["parquet=", "not writable"]),
        (["link", str(spec), "--json", "/proc/x.json"], ["json='/proc/x.json'", "not writable"]),
    ]:
        assert exit_code(argv) == 2, argv
        one_line(capsys.readouterr().err, f"optdyn {argv[0]}: error:", *words)
    assert not list(root.glob("*/link.nc"))  # link did no work


@pytest.mark.parametrize("argv, words", [
    (["--out", "/proc/x"], ["out='/proc/x'", "not writable"]),
    (["--device", "cuda:99"], ["device='cuda:99'", "not available"]),
    (["--device", "tpu"], ["device='tpu'"]),
    (["--workers", "-1"], ["workers=-1"]),
])
def test_paper_figures_bad_options_are_one_line_before_any_run(tmp_path, capsys, argv, words):
    from paper_figures.__main__ import main as figures_main

    assert figures_main(["seed_cnn", "--tiny", "--store", str(tmp_path / "store"),
                         *(["--out", str(tmp_path / "fig")] if "--out" not in argv else []), *argv]) == 2
    one_line(capsys.readouterr().err, "paper_figures: error:", *words)
    assert not (tmp_path / "store" / "runs").exists()


@pytest.mark.parametrize("argv, words", [
    (["--model", "mlp", "--model-arg", "hidden=-5"], ["model_args={'hidden': -5}", ">= 1"]),
    (["--model", "mlp", "--model-arg", "hidden=[-5]"], ["model_args={'hidden': [-5]}", ">= 1"]),
    (["--model", "mlp", "--model-arg", "hidden=[0]"], ["empty layer", "fc1.weight"]),
    (["--model", "seed-cnn", "--data", "digits", *SMALL, "--model-arg", "channels=0"], ["model_args={'channels': 0}"]),
    (["--model", "gru", "--data", "digits", *SMALL, "--model-arg", "hidden=0"], ["model_args={'hidden': 0}"]),
    (["--model", "mlp", "--model-arg", "hidden='wide'"], ["model_args={'hidden': 'wide'}"]),
    (["--device", "tpu"], ["device='tpu'"]),
])
def test_bad_model_args_and_devices_are_one_line(tmp_path, capsys, argv, words):
    out = tmp_path / "run"
    assert exit_code(["train", "--out", str(out), *(QUICK if "--data" not in argv else []), *argv]) == 2
    one_line(capsys.readouterr().err, "optdyn train: error:", *words)
    assert not out.exists()


@pytest.mark.parametrize("argv, words", [
    (["--data", "mnist", "--model", "linear", *SMALL, "--data-dir", "EMPTY"], ["data='mnist' needs the files"]),
    ([*QUICK, "--batch-size", "100000"], ["batch_size=100000"]),
    ([*QUICK, "--device", "cuda:99"], ["device='cuda:99'", "not available"]),
    (["--data", "mnist1d", "--model", "linear", *SMALL, "--data-arg", "n_train=0"], ["n_train=0"]),
])
def test_checkable_errors_come_before_the_run_directory(tmp_path, capsys, argv, words, no_training):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    argv = [str(tmp_path / "empty") if a == "EMPTY" else a for a in argv]
    assert exit_code(["train", "--out", str(out), *argv]) == 2
    one_line(capsys.readouterr().err, "optdyn train: error:", *words)
    assert not out.exists()


def test_sweep_bad_workers_and_unreachable_scheduler(tmp_path, capsys):
    from experiments.sweeps.executors import DaskExecutor

    spec = write_spec(tmp_path / "s.toml", tmp_path / "store", 2)
    assert exit_code(["sweep", str(spec), "--workers", "-1"]) == 2
    one_line(capsys.readouterr().err, "workers=-1")
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"scheduler='tcp://127.0.0.1:1' cannot be reached within 1 s"):
        with DaskExecutor("tcp://127.0.0.1:1", connect_timeout=1):
            pass
    assert time.monotonic() - start < 20  # the timeout applies (was 30 s before the fix)


def test_tracer_and_dynamics_name_the_bad_parameter():
    import torch

    from dynamics import spectral_radius
    from experiments import Tracer

    with pytest.raises(ValueError, match="optimizer=None is not a torch.optim.Optimizer"):
        Tracer(torch.nn.Linear(2, 1), None)
    with pytest.raises(ValueError, match=r"^h='abc' is not a number"):
        spectral_radius("hb", "abc", 0.5)
    with pytest.raises(ValueError, match=r"^momentum='x' is not a number"):
        spectral_radius("hb", 0.5, "x")


# ------------------------------------------------------------------ 1, 2, 3: processes

def sweep_script(spec, workers, run_fn=COUNTING):
    return (f"import sys\nfrom experiments.sweeps.runner import run_sweep, format_counts\n"
            f"c = run_sweep({str(spec)!r}, workers={workers}, progress=False, run_fn={run_fn!r})\n"
            f"print(format_counts(c))\n")


def env_with(log, sleep):
    return {**os.environ, LOG_ENV: str(log), SLEEP_ENV: str(sleep), "PYTHONPATH": str(REPO)}


def wait_for(predicate, timeout, what, proc=None):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) before {what}: {proc.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def alive(pid):
    return store._alive(pid, None)


@pytest.mark.slow
def test_sigkill_of_the_sweep_parent_kills_its_workers(tmp_path):
    """SIGKILL of the parent only (not its group): the pool workers stop with it, no run is
    finished after the kill, and an immediate restart trains each remaining run once."""
    root, log = tmp_path / "store", tmp_path / "log"
    n = 6
    spec = write_spec(tmp_path / "s.toml", root, n)
    proc = subprocess.Popen([sys.executable, "-c", sweep_script(spec, 2)], cwd=REPO, env=env_with(log, 1.5),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: len(log_counts(log, "start")) >= 3, 120, "the third run to start", proc)
    workers = {int(line.split()[2]) for line in log.read_text().splitlines()}
    assert len(workers) == 2
    proc.kill()
    proc.wait()
    wait_for(lambda: not any(alive(pid) for pid in workers), 15, "the workers to die with their parent")
    done_at_kill = done_ids(root)
    time.sleep(2)
    assert done_ids(root) == done_at_kill and len(done_at_kill) < n
    restart = subprocess.run([sys.executable, "-c", sweep_script(spec, 2)], cwd=REPO, env=env_with(log, 0),
                             capture_output=True, text=True, timeout=300)
    assert restart.returncode == 0, restart.stderr
    assert restart.stdout.strip() == (f"finished {n - len(done_at_kill)} / skipped {len(done_at_kill)} "
                                      f"/ diverged 0 / failed 0")
    assert log_counts(log, "end") == {rid: 1 for rid in done_ids(root)} and len(done_ids(root)) == n
    assert not list(root.rglob(".tmp-*")) and not list(root.rglob(store.LOCK))
    print(f"sigkill parent: {len(done_at_kill)} finished before the kill, {sum(log_counts(log, 'end').values())} "
          f"trainings completed for {n} runs, {sum(log_counts(log, 'start').values())} started")


@pytest.mark.slow
def test_two_sweeps_racing_on_one_root_train_each_run_once(tmp_path):
    root, log = tmp_path / "store", tmp_path / "log"
    n = 6
    spec = write_spec(tmp_path / "s.toml", root, n)
    procs = [subprocess.Popen([sys.executable, "-c", sweep_script(spec, 1)], cwd=REPO, env=env_with(log, 0.5),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    counts = [dict(zip(o.split()[::3], map(int, o.split()[1::3]))) for o, _ in outs]
    assert log_counts(log, "end") == {rid: 1 for rid in done_ids(root)} and len(done_ids(root)) == n
    assert sum(c["finished"] for c in counts) == n
    assert not list(root.rglob(store.LOCK))
    print(f"two sweeps: counts {counts}; {sum(log_counts(log, 'end').values())} trainings for {n} runs")


@pytest.mark.slow
def test_ctrl_c_on_a_sweep_stops_cleanly_and_a_rerun_resumes(tmp_path):
    root, log = tmp_path / "store", tmp_path / "log"
    n = 8
    # 5-7 s a run here: after the first run is done the other seven take >= 20 s on 2 workers, so
    # the Ctrl-C lands mid-sweep even if this process is starved for seconds (with 400 steps a
    # loaded CI machine once let the whole sweep finish before the signal was sent; with 2000, a
    # fresh-clone CI run did so once in about eight)
    spec = write_spec(tmp_path / "s.toml", root, n, steps=4000)
    command = [sys.executable, "-m", "experiments.cli", "sweep", str(spec), "--workers", "2", "--no-progress"]
    # a terminal's foreground command starts with SIGINT at its default, whatever this (pytest
    # worker) process's disposition is: an ignored SIGINT would be inherited across exec
    proc = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(lambda: len(done_ids(root)) >= 1, 180, "a first finished run", proc)
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C: the whole group
    out, err = proc.communicate(timeout=60)
    stop_seconds = time.monotonic() - started
    assert proc.returncode == 130, (f"exit {proc.returncode} {stop_seconds:.1f} s after the signal with "
                                    f"{len(done_ids(root))} of {n} runs done; stdout {out!r}; stderr {err!r}")
    done = done_ids(root)
    assert err == f"interrupted: {len(done)} of {n} runs finished; rerun to resume\n"
    assert len(done) < n and stop_seconds < 8
    assert not list(root.rglob(".tmp-*")) and not list(root.rglob(store.FAILED))
    assert not list(root.rglob(store.LOCK))
    for rid in done:
        store.load_run(root / rid)
    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.splitlines()[-1] == f"finished {n - len(done)} / skipped {len(done)} / diverged 0 / failed 0"
    print(f"ctrl-c: stopped in {stop_seconds:.1f} s with {len(done)} of {n} finished; "
          f"the rerun trained {n - len(done)}")


def test_another_thread_of_the_same_process_is_refused(tmp_path):
    import threading

    seen = []
    with store.claim(tmp_path / "r"):
        def rival():
            try:
                with store.claim(tmp_path / "r"):
                    seen.append("claimed")
            except store.RunHeld:
                seen.append("held")

        thread = threading.Thread(target=rival)
        thread.start()
        thread.join()
    assert seen == ["held"]


def interrupting_run(config, run_dir, data_dir=None):
    """Ctrl-C while the second run of a sweep trains (in-process executor)."""
    if config["lr"] == 0.02:
        raise KeyboardInterrupt
    return run_training(config, run_dir, data_dir)


def run_then_interrupt(config, run_dir, data_dir=None):
    """The first run writes DONE, then Ctrl-C arrives before its outcome reaches the sweep."""
    run_training(config, run_dir, data_dir)
    raise KeyboardInterrupt


@pytest.mark.parametrize("run_fn", ["interrupting_run", "run_then_interrupt"])
def test_ctrl_c_in_process_leaves_nothing_and_reports_one_line(tmp_path, monkeypatch, capsys, run_fn):
    # run_then_interrupt: the race a loaded CI machine hit ("0 of 8 runs finished" with one run's
    # DONE on disk): the count must come from the store, not from the outcomes received
    import experiments.cli as cli

    root = tmp_path / "store"
    spec = write_spec(tmp_path / "s.toml", root, 3)
    real = runner.run_sweep
    monkeypatch.setattr(cli, "run_sweep", lambda *a, **k: real(*a, **{**k, "run_fn": f"{__name__}:{run_fn}"}))
    assert exit_code(["sweep", str(spec), "--workers", "0", "--no-progress"]) == 130
    captured = capsys.readouterr()
    assert captured.err == "interrupted: 1 of 3 runs finished; rerun to resume\n" and captured.out == ""
    assert len(done_ids(root)) == 1
    assert not list(root.rglob(store.LOCK)) and not list(root.rglob(store.FAILED)) and not list(root.rglob(".tmp-*"))
