"""Smoke test of the phase-diagram figure in tiny mode, and its data against the theory."""

import numpy as np
from matplotlib.lines import Line2D

from dynamics.methods import get_method
from paper_figures import phase_diagram, style
from paper_figures.registry import Context, figures


def test_phase_diagram_builds_and_saves(tmp_path):
    ctx = Context(mode="tiny", out=tmp_path, store=tmp_path / "store")
    d = phase_diagram.FIGURE.data(ctx)
    fig = phase_diagram.FIGURE.plot(d, ctx)
    # two panels (HB, NAG) and the colour bar; each panel: ripple band (2 lines) + edge
    assert len(fig.axes) == 3
    for ax in fig.axes[:2]:
        assert sum(isinstance(a, Line2D) for a in ax.get_lines()) == 3
        assert len(ax.collections) == 1  # the heatmap
    paths = style.save(fig, tmp_path, "phase_diagram")
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    assert "phase_diagram" in figures()


def _radius_from_the_update_rule(method, h, beta):
    """Spectral radius of one optimizer step on f(x) = x²/2 with lr = h, from the method's own
    update rule (dynamics.methods.Method.update) applied to the state basis (x, buf) = (1, 0),
    (0, 1), and numpy's eigenvalues: a route independent of the characteristic-polynomial
    formulas in dynamics.quadratic that the figure uses."""
    m = get_method(method)
    cols = []
    for x0, b0 in ((1.0, 0.0), (0.0, 1.0)):
        x0, b0 = np.broadcast_arrays(np.float64(x0), np.zeros(np.broadcast_shapes(h.shape, beta.shape)) + b0)
        step, b1 = m.update(x0, b0, h, beta)  # the gradient of x²/2 at x0 is x0
        cols.append(np.stack([x0 + step, np.broadcast_to(b1, x0.shape)], -1))
    A = np.stack(cols, -1)
    return np.abs(np.linalg.eigvals(A)).max(-1)


def test_phase_diagram_lines_separate_the_heatmaps_regimes():
    d = phase_diagram.FIGURE.data(Context(mode="tiny"))
    for m, p in d.items():
        # at a double root (the ripple band's edges) a 2x2 eigenvalue solve is accurate to
        # ~sqrt(machine eps)·|A| ≈ 1.5e-8·3; elsewhere to ~1e-15: atol 1e-7
        np.testing.assert_allclose(p["rho"], _radius_from_the_update_rule(m, p["h"][None, :], p["beta"][:, None]),
                                   rtol=0, atol=1e-7)
        assert p["rho"].shape == (p["beta"].size, p["h"].size)
        # on each β row, points left of the stability edge converge and right of it do not
        edge = np.interp(p["beta"], p["beta_line"], p["edge"])
        left = p["h"][None, :] < edge[:, None] * (1 - 1e-3)
        right = p["h"][None, :] > edge[:, None] * (1 + 1e-3)
        assert np.all(p["rho"][left & (p["h"][None, :] > 0)] < 1) and np.all(p["rho"][right] >= 1)
        # inside the ripple band ρ = √(c0): for HB that is √β, constant along h
        if m == "hb":
            lo = np.interp(p["beta"], p["beta_line"], p["lo"])
            hi = np.interp(p["beta"], p["beta_line"], p["hi"])
            band = (p["h"][None, :] > lo[:, None] + 1e-3) & (p["h"][None, :] < hi[:, None] - 1e-3)
            beta = np.broadcast_to(p["beta"][:, None], band.shape)
            np.testing.assert_allclose(p["rho"][band], np.sqrt(beta[band]), rtol=1e-12)
