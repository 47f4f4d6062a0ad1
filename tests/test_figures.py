"""Every registered figure, in tiny mode: written as non-empty PDF + PNG, same bytes on a rerun
(deterministic output is a promise of paper_figures.style.save), and the CLI's contract."""

import hashlib

import pytest

from paper_figures import style
from paper_figures.__main__ import main
from paper_figures.registry import Context, figures

NAMES = list(figures())


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("name", NAMES)
def test_figure_is_written_and_deterministic(name, tmp_path):
    fig = figures()[name]
    ctx = Context(mode="tiny", out=tmp_path / "a", store=tmp_path / "store")
    data = fig.data(ctx)
    paths = style.save(fig.plot(data, ctx), ctx.out, name)
    assert [p.suffix for p in paths] == [".pdf", ".png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    # Redraw from a second data call (the store is now filled): identical bytes.
    style.save(fig.plot(fig.data(ctx), ctx), tmp_path / "b", name)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")


def test_list_names_every_figure(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in NAMES)


def test_unknown_figure_is_one_line_and_exit_2(capsys):
    assert main(["no-such-figure", "--tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-figure" in err[0]


def test_context_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode='huge'"):
        Context(mode="huge")
