"""optdyn plot: the per-layer dashboard's axes, layer selection, and byte stability."""

import matplotlib.pyplot as plt
import pytest

from experiments.cli import main
from experiments.store import atomic_write_dataset
from experiments.viewers.dashboard import PANELS, dashboard, save_dashboard, select_layers
from tests.traces import small_trace


@pytest.fixture(scope="module")
def traces():
    return {n: small_trace(steps=40, probe_every=20, layers=n) for n in (3, 20)}


def test_panels_and_lines_with_few_layers(traces):
    fig, ax = dashboard(traces[3])
    assert list(ax) == list(PANELS)
    assert ax["grad_norm"].get_yscale() == "log" and ax["grad_cos"].get_ylim() == (-1.05, 1.05)
    labels = [line.get_label() for line in ax["grad_norm"].get_lines()]
    assert labels == ["0", "2", "4"]  # every layer coloured, no band needed
    assert not ax["grad_norm"].collections
    ratio_levels = sorted(line.get_ydata()[0] for line in ax["update_ratio"].get_lines()[3:])
    assert ratio_levels == [-4.0, -3.0, -2.0]  # DL4J's bands
    h = ax["h_edge"].get_lines()
    assert [line.get_label() for line in h[-2:]] == ["network", "_child4"] and h[-1].get_ydata()[0] == 1.0
    x, y = h[0].get_data()  # layer 0's h/edge at the two probes
    assert list(x) == [0, 20]
    assert y[0] == pytest.approx(0.05 * float(traces[3].sharpness.sel(layer="0")[0]) / 3.6)
    assert fig.legends and [t.get_text() for t in fig.legends[0].get_texts()] == ["0", "2", "4"]
    plt.close(fig)


def test_many_layers_are_a_band_plus_a_selection(traces):
    fig, ax = dashboard(traces[20], max_layers=4)
    labels = [line.get_label() for line in ax["grad_norm"].get_lines()]
    assert labels == ["0", "12", "26", "38"]  # evenly over depth, first and last
    assert ax["grad_norm"].collections[0].get_label() == "all 20 layers (range)"
    plt.close(fig)
    fig, ax = dashboard(traces[20], layers=["1*"])
    assert [line.get_label() for line in ax["grad_norm"].get_lines()] == ["10", "12", "14", "16", "18"]
    plt.close(fig)
    with pytest.raises(ValueError, match="match no layer"):
        select_layers(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="max_layers=9"):
        select_layers(["a"], max_layers=9)


@pytest.mark.parametrize("suffix", ["png", "pdf"])
def test_byte_stable(traces, tmp_path, suffix):
    blobs = []
    for k in range(2):
        fig, _ = dashboard(traces[3])
        blobs.append(save_dashboard(fig, tmp_path / f"d{k}.{suffix}").read_bytes())
    assert blobs[0] == blobs[1] and len(blobs[0]) > 10_000
    assert blobs[0][:4] == (b"\x89PNG" if suffix == "png" else b"%PDF")


def test_cli_plot_writes_beside_the_trace(traces, tmp_path, capsys):
    atomic_write_dataset(tmp_path / "trace.nc", traces[3])
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "dashboard.png").exists()
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "d.svg")]) == 2
    assert "valid: .png, .pdf" in capsys.readouterr().err
