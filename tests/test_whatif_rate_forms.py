"""The forms of the curvature's rate (analyses/whatif_rate_forms.py): each forecasts its own kind of
growth exactly, and the errors are summarized as medians."""

import numpy as np
import pytest

from analyses.whatif_rate_forms import FORMS, forecast, summarize

TAU = np.array([0.0, 10.0, 20.0, 40.0, 80.0])  # the probes at or before k (k at τ = 80)
LATER = np.array([100.0, 160.0])


def test_each_form_continues_its_own_kind_of_growth_exactly():
    power = 2.0 * np.maximum(TAU, 1.0) ** 0.3
    exp = 2.0 * np.exp(0.01 * TAU)
    np.testing.assert_allclose(forecast("power", TAU, power, LATER), np.log(2.0 * LATER ** 0.3), rtol=1e-12)
    np.testing.assert_allclose(forecast("lambda", TAU, exp, LATER), np.log(2.0) + 0.01 * LATER, rtol=1e-12)
    np.testing.assert_allclose(forecast("last3", TAU, exp, LATER), np.log(2.0) + 0.01 * LATER, rtol=1e-12)
    np.testing.assert_allclose(forecast("fixed", TAU, exp, LATER), np.log(exp[-1]), rtol=1e-12)
    # a curvature that rose fast early and is flat at k: the rate since the first probe keeps rising
    early = np.array([1.0, 20.0, 22.0, 23.0, 23.5])
    assert forecast("lambda", TAU, early, LATER)[-1] > forecast("power", TAU, early, LATER)[-1] > np.log(23.5)
    # last3 is not clipped: a fall continues
    assert forecast("last3", TAU, np.array([1.0, 9.0, 8.0, 4.0, 2.0]), LATER)[0] < np.log(2.0)


def test_forecast_rejects_an_unknown_form_and_a_missing_state_at_k():
    with pytest.raises(ValueError, match="form='spline' is unknown; valid: " + ", ".join(FORMS)):
        forecast("spline", TAU, np.ones(5), LATER)
    with pytest.raises(ValueError, match=r"q=nan at k \(the last probe\) is outside the valid range \(0, inf\)"):
        forecast("power", TAU, np.array([1.0, 2.0, 3.0, 4.0, np.nan]), LATER)


def test_summarize_gives_the_median_error_and_median_absolute_error():
    out = summarize({("trace", "power", 100): [-1.0, 0.5, 2.0]})
    assert out["trace"]["power"]["100"] == {"bias": 0.5, "median_abs": 1.0, "n": 3}
