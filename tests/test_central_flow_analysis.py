"""Helpers of analyses/central_flow.py on constructed inputs (the runs themselves are too long
for the test suite: ~25 CPU-minutes, see the module docstring)."""

import numpy as np
import pytest

from analyses import central_flow as a


def test_window_mean_is_centred_and_clipped():
    values = np.arange(30.0)
    np.testing.assert_allclose(a.window_mean(values, [0, 10, 29], width=10), [2.0, 9.5, 26.5])


def test_late_averages_are_ratios_of_time_averages():
    """Measured over predicted − 1 of the averages from ``start`` on (not the mean of ratios)."""
    steps = np.arange(0, 100, 10)
    series = {"step": steps, "loss_measured": np.where(steps >= 50, [1.0, 3.0] * 5, 9.0),
              "loss_flow": np.full(10, 2.0), "loss_flow_mean_only": np.full(10, 1.0),
              "loss_gradient_flow": np.full(10, 4.0), "grad_sq_measured": np.full(10, 3.0),
              "grad_sq_flow": np.full(10, 2.0), "sharpness_measured": np.full(10, 10.5),
              "sharpness_flow": np.full(10, 10.0), "lag1_measured": np.full((10, 2), -0.5),
              "lag1_flow": np.full((10, 2), -1.0)}
    out = a.late_averages(series, 50)
    assert out["loss_measured_over_flow"] == pytest.approx(2.2 / 2.0 - 1)  # mean of 3,1,3,1,3
    assert out["loss_measured_over_gradient_flow"] == pytest.approx(2.2 / 4.0 - 1)
    assert out["grad_sq_measured_over_flow"] == pytest.approx(0.5)
    assert out["sharpness_measured_over_edge"] == pytest.approx(0.05)
    assert out["lag1_measured_per_layer"] == [-0.5, -0.5]


def test_lrs_put_every_edge_at_the_same_sharpness():
    for method, beta in a.RUNS:
        assert a.lr_for(method, beta) * a.EDGE == pytest.approx(
            {"gd": 2.0, "hb": 2 * (1 + beta), "nag": 2 * (1 + beta) / (1 + 2 * beta)}[method])
