"""Tests of experiments.link: the scores on constructed inputs, and (below) the link
end to end on the quadratic network."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from experiments.link import agreement_scores, calibration_error

N = 2000


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def test_perfect_prediction_scores_one(rng):
    meas = rng.normal(size=N)
    s = agreement_scores(meas, meas)
    assert s["n"] == N
    assert s["pearson"] == pytest.approx(1.0) and s["spearman"] == pytest.approx(1.0)
    assert s["sign_agreement"] == 1.0
    assert s["calibration_error"] == pytest.approx(0.0, abs=1e-12)
    assert s["mean_abs_error"] == pytest.approx(0.0, abs=1e-12)


def test_anticorrelated_prediction_scores_minus_one(rng):
    meas = rng.normal(size=N)
    s = agreement_scores(-meas, meas)
    assert s["pearson"] == pytest.approx(-1.0) and s["spearman"] == pytest.approx(-1.0)
    assert s["sign_agreement"] == 0.0
    # bins of sorted -meas pair the lowest predictions with the highest measurements:
    # the binned gap is 2·E|mean of a decile| > 0, far from calibrated
    assert s["calibration_error"] > 1.0


def test_random_prediction_scores_match_null_distribution(rng):
    pred, meas = rng.normal(size=(2, N))
    s = agreement_scores(pred, meas)
    # under independence Pearson and Spearman have null sd 1/sqrt(n-1) and the sign
    # agreement is Binomial(n, 1/2)/n with sd 1/(2 sqrt n): 4 sd bounds
    sd = 1 / np.sqrt(N - 1)
    assert abs(s["pearson"]) < 4 * sd and abs(s["spearman"]) < 4 * sd
    assert abs(s["sign_agreement"] - 0.5) < 4 * 0.5 / np.sqrt(N)


def test_spearman_null_sd_is_one_over_sqrt_n_minus_1(rng):
    # the tolerance above rests on this: 400 independent samples of Spearman at n=50;
    # the sample sd of the sd estimate is ~ sd/sqrt(2*400) = 3.5 %, so 15 % is > 4 sd
    n = 50
    pred, meas = rng.normal(size=(2, 400, n))
    rho = [agreement_scores(p, m)["spearman"] for p, m in zip(pred, meas)]
    assert np.std(rho) == pytest.approx(1 / np.sqrt(n - 1), rel=0.15)


@given(st.floats(-5, 5), st.floats(0.1, 10), st.integers(0, 2**32 - 1))
def test_scores_invariances(shift, scale, seed):
    meas = np.random.default_rng(seed).normal(size=200)
    pred = scale * meas + shift  # affine: Pearson 1; monotone: Spearman 1
    s = agreement_scores(pred, meas)
    assert s["pearson"] == pytest.approx(1.0, abs=1e-9)
    assert s["spearman"] == pytest.approx(1.0, abs=1e-12)
    assert agreement_scores(np.exp(meas), meas)["spearman"] == pytest.approx(1.0, abs=1e-12)


@given(st.floats(-3, 3))
def test_calibration_error_of_a_constant_bias_is_the_bias(bias):
    meas = np.linspace(-1, 1, 101)
    assert calibration_error(meas + bias, meas) == pytest.approx(abs(bias), abs=1e-12)


def test_calibrated_noisy_prediction_has_small_calibration_error(rng):
    # meas = pred + noise(sd s): each of the 10 bins (m = 200 pairs) has gap |mean noise|
    # ~ s/sqrt(m); the MAE instead stays ~ s*sqrt(2/pi)
    s_noise = 0.5
    pred = rng.uniform(-1, 1, size=N)
    meas = pred + rng.normal(scale=s_noise, size=N)
    scores = agreement_scores(pred, meas)
    assert scores["calibration_error"] < 4 * s_noise / np.sqrt(N / 10)
    assert scores["mean_abs_error"] == pytest.approx(s_noise * np.sqrt(2 / np.pi), rel=0.1)


def test_nonfinite_pairs_are_dropped():
    pred = np.array([0.1, np.nan, 0.3, 0.4, -0.5])
    meas = np.array([0.1, 0.2, np.inf, 0.4, -0.5])
    s = agreement_scores(pred, meas)
    assert s["n"] == 3 and s["pearson"] == pytest.approx(1.0) and s["sign_agreement"] == 1.0
    empty = agreement_scores([np.nan], [1.0])
    assert empty["n"] == 0 and np.isnan(empty["spearman"]) and np.isnan(empty["calibration_error"])


def test_bad_bins_is_a_value_error():
    with pytest.raises(ValueError, match="bins=0"):
        calibration_error([1.0, 2.0], [1.0, 2.0], bins=0)
