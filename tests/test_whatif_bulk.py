"""The bulk-versus-top diagnostic (analyses/whatif_bulk.py) on constructed traces: the fork's
log-ratios to the unchanged run at the probes after k, and the co-movement of the trace with
λ_max before k."""

import numpy as np
import pytest
import xarray as xr

from analyses.whatif_bulk import coupling_before, fork_moves, layer_moves, outliers_before


def _trace(lam, trace, noise, steps):
    layers = ["a", "b"]
    # each total split evenly over two layers; each block's top is λ_max / 2
    half = lambda v: np.repeat(np.asarray(v, float)[:, None] / 2, 2, axis=1)  # noqa: E731
    return xr.Dataset({"sharpness_global": ("probe_step", np.asarray(lam, float)),
                       "sharpness": (("probe_step", "layer"), half(lam)),
                       "hessian_trace": (("probe_step", "layer"), half(trace)),
                       "grad_noise": (("probe_step", "layer"), half(noise)),
                       "n_params": ("layer", [10, 1000])},
                      coords={"probe_step": steps, "layer": layers})


def test_fork_moves_are_the_mean_log_ratios_after_k_on_the_shared_probes():
    steps = [0, 100, 200, 300]
    unchanged = _trace([1, 2, 4, 4], [10, 20, 40, 40], [1, 1, 1, 1], steps)
    # after k = 100: λ_max halves, the trace falls by 10 %, the noise with the trace
    fork = _trace([1, 2, 2, 2], [10, 20, 36, 36], [1, 1, 0.9, 0.9], steps)
    lam, tr, noise = fork_moves(fork, unchanged, at=100)
    assert lam == pytest.approx(np.log(0.5)) and tr == pytest.approx(np.log(0.9)) and noise == pytest.approx(np.log(0.9))
    top_l, trace_l = layer_moves(fork, unchanged, at=100)
    np.testing.assert_allclose(top_l, np.log(0.5))
    np.testing.assert_allclose(trace_l, np.log(0.9))
    short = _trace([1, 2], [10, 20], [1, 1], [0, 100])  # no probe after k: nothing to compare
    assert all(np.isnan(fork_moves(short, unchanged, at=100)))
    assert all(np.isnan(layer_moves(short, unchanged, at=100)).ravel())


def test_the_coupling_before_k_is_the_log_log_slope_and_undefined_without_spread():
    steps = [0, 100, 200, 300]
    lam = np.array([1.0, 2.0, 4.0, 8.0])
    assert coupling_before(_trace(lam, 3 * lam ** 0.5, lam, steps), at=300) == pytest.approx(0.5)
    # only the probes at or before k count: a trace that breaks away after k does not
    tr = 3 * lam ** 0.5
    tr[-1] = 1e3
    assert coupling_before(_trace(lam, tr, lam, steps), at=200) == pytest.approx(0.5)
    assert np.isnan(coupling_before(_trace(np.ones(4), lam, lam, steps), at=300))  # λ_max never moved
    assert np.isnan(coupling_before(_trace([-1.0, 0.0, 1.0, 2.0], lam, lam, steps), at=100))  # fewer than two positive


def test_the_outlier_ratio_is_the_trace_weighted_log_of_top_over_mean_eigenvalue():
    # both blocks: top λ/2 = 2, trace 10/2 = 5; mean eigenvalue 5/10 and 5/1000 -> top/mean 4 and 400
    tr = _trace([4.0] * 4, [10.0] * 4, [1.0] * 4, [0, 100, 200, 300])
    assert outliers_before(tr, at=300) == pytest.approx((np.log10(4) + np.log10(400)) / 2)
    tr["hessian_trace"][:, 1] = 15.0  # the second block holds 3/4 of the trace: its ratio weighs 3/4
    assert outliers_before(tr, at=300) == pytest.approx(np.log10(2 * 10 / 5) / 4 + 3 * np.log10(2 * 1000 / 15) / 4)
