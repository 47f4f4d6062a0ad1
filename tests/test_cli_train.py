"""`optdyn train`: flags, TOML config with flag overrides, bad input → one line, exit 2."""

import json
import subprocess
import sys

import pytest

from experiments import store
from experiments.cli import main

QUICK = ["--model", "linear", "--data", "linreg", "--data-arg", "dim=4", "--data-arg", "n_train=32",
         "--batch-size", "8", "--steps", "3", "--threads", "1", "--no-progress"]


@pytest.mark.parametrize("argv, words", [
    (["--model", "vgg"], ["model='vgg'", "seed-cnn"]),
    (["--data", "imagenet"], ["data='imagenet'"]),
    (["--opt", "sgd"], ["opt='sgd'"]),
    (["--lr", "0"], ["lr=0.0", "(0, inf)"]),
    (["--lr", "-0.1"], ["lr=-0.1"]),
    (["--momentum", "1.0"], ["momentum=1.0", "[0, 1)"]),
    (["--momentum", "-0.5"], ["momentum=-0.5"]),
    (["--model", "transformer", "--data", "mnist1d"], ["does not fit"]),
    (["--lr", "fast"], ["--lr", "invalid float"]),
    (["--steps", "1.5"], ["--steps", "invalid int"]),
    (["--data-arg", "dim"], ["data_args entry 'dim' is not KEY=VALUE"]),
    (["--data-arg", "flavour=3"], ["data_args has unknown key(s) 'flavour'", "spectrum"]),
    (["--model-arg", "depth=3"], ["model_args has unknown key(s) 'depth'"]),
])
def test_bad_arguments_one_line_exit_2(tmp_path, capsys, argv, words):
    out = tmp_path / "run"
    assert exit_code(["train", "--out", str(out), *QUICK, *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("optdyn")
    for w in words:
        assert w in err
    assert not out.exists()


def exit_code(argv):
    """main's return value, or the status of the SystemExit that argparse raises."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("content, words", [
    ("lr = 0.1\nlearning_rate = 3\n", ["unknown RunConfig key", "'learning_rate'"]),
    ("lr = [", ["not valid TOML"]),
    ("steps = 'many'\n", ["steps='many'", "int"]),
])
def test_bad_config_files(tmp_path, capsys, content, words):
    path = tmp_path / "c.toml"
    path.write_text(content)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words)
    assert main(["train", "--config", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "r")]) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_config_file_with_flag_overrides(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text('model = "linear"\ndata = "linreg"\nopt = "nag"\nlr = 0.3\nsteps = 4\nthreads = 1\n'
                    'batch_size = 0\n[data_args]\ndim = 4\nn_train = 32\n')
    out = tmp_path / "run"
    code = main(["train", "--config", str(path), "--lr", "0.2", "--data-arg", "n_test=8",
                 "--data-arg", "spectrum=[2.0, 1.0, 0.5, 0.1]", "--out", str(out), "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps_done"] == 4 and summary["diverged"] is False
    config = store.read_json(out / store.CONFIG)
    assert config["lr"] == 0.2 and config["opt"] == "nag" and config["steps"] == 4
    assert config["data_args"] == {"dim": 4, "n_train": 32, "n_test": 8, "spectrum": [2.0, 1.0, 0.5, 0.1]}
    ds = store.load_run(out)
    assert ds.sizes["step"] == 4 and float(ds.lr[0]) == 0.2


@pytest.mark.slow
def test_cli_subprocess_with_progress_bar(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "experiments.cli", "train", "--model", "mlp", "--data", "digits", "--opt", "hb",
           "--lr", "0.05", "--momentum", "0.9", "--steps", "60", "--model-arg", "hidden=[16]",
           "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "loss=" in proc.stderr and "grad_norm=" in proc.stderr  # the tqdm postfix at step 50
    assert json.loads(proc.stdout)["steps_done"] == 60 and store.is_done(out)
    bad = subprocess.run(cmd[:-2] + ["--momentum", "2", "--out", str(tmp_path / "bad")], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "momentum=2.0" in bad.stderr
