"""The README's "Your own training loop" snippets run as written (Python blocks executed in
order in one namespace, then each ``optdyn`` line through the CLI's main), in a temporary
directory."""

import re
import shlex
from pathlib import Path

import pytest

from experiments.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def section(title):
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def blocks(text, lang):
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
def test_own_loop_snippets_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: pip install 'optdyn[tensorboard]'")
    monkeypatch.chdir(tmp_path)
    text = section("Your own training loop")
    python, shell = blocks(text, "python")[:1], blocks(text, "sh")[:1]  # the plain loop
    namespace = {}
    for code in python:
        exec(compile(code, str(README), "exec"), namespace)
    assert namespace["tracer"].dataset().sizes["step"] == 300
    for code in shell:
        for line in code.splitlines():
            argv = shlex.split(line, comments=True)
            assert argv[0] == "optdyn"
            assert main(argv[1:]) == 0, line
    out = capsys.readouterr().out
    assert "grad_corr: n=" in out
    for name in ("mytrace.link.nc", "mytrace.csv", "dashboard.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_lightning_snippet_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lightning", reason="lightning is not installed: pip install 'optdyn[lightning]'")
    monkeypatch.chdir(tmp_path)
    text = section("Your own training loop")
    (python,), (shell,) = blocks(text, "python")[1:], blocks(text, "sh")[1:]
    namespace = {}
    exec(compile(python, str(README), "exec"), namespace)
    assert namespace["trace"].trace.sizes["step"] == 200
    for line in shell.splitlines():
        assert main(shlex.split(line, comments=True)[1:]) == 0, line
    assert (tmp_path / "runs" / "lit" / "dashboard.png").stat().st_size > 0
