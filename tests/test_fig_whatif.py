"""Figure 10 (whatif): tiny-mode smoke test, checking the data has forks' measurements."""

import numpy as np
import pytest

from paper_figures import style, whatif
from paper_figures.registry import Context, figures


@pytest.mark.slow
def test_tiny_figure_is_written_with_predictions_beside_forks(tmp_path):
    ctx = Context(mode="tiny", out=tmp_path / "fig", store=tmp_path / "store")
    ds = whatif.FIGURE.data(ctx)
    assert list(ds.label.values) == ["scheduled", "lr×0.5", "lr×2", "momentum=0.6", "method=nag"]
    assert np.isfinite(ds.meas_grad_corr.isel(window=slice(1, None)).values).all()
    assert set(ds.attrs["scores"]) == {"model", "persistence", "trend"}
    fig = whatif.FIGURE.plot(ds, ctx)
    # per change: model and persistence scatters in both panels
    assert [len(ax.collections) for ax in fig.axes] == [10, 11]  # + the factor-1.5 band
    paths = style.save(fig, ctx.out, "whatif")
    assert all(p.stat().st_size > 1000 for p in paths)
    assert "whatif" in figures()
