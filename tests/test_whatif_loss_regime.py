"""The small-loss split of the norm-sign scores (analyses/whatif_loss_regime.py)."""

import numpy as np
import pytest

from analyses.whatif_loss_regime import loss_around, split


def test_loss_around_takes_the_window_before_k_and_the_second_after():
    loss = np.concatenate([np.full(100, 9.0), np.full(100, 2.0), np.full(100, 7.0), np.full(100, 0.5)])
    assert loss_around(loss, 200) == (2.0, 0.5)
    with pytest.raises(ValueError, match="at=300 is outside the valid range"):
        loss_around(loss, 300)


def test_split_separates_the_small_loss_checks_and_averages_each_side():
    rows = [{"L_k": 0.1, "L_after": 0.01, "model": 0.2, "fixed": 0.8},
            {"L_k": 0.05, "L_after": 0.02, "model": 0.4, "fixed": np.nan},
            {"L_k": 2.0, "L_after": 1.8, "model": 0.9, "fixed": 0.6}]
    out = split(rows, variants=("model", "fixed"))
    assert out["small"]["checks"] == 2 and out["other"]["checks"] == 1
    assert out["small"]["model"] == pytest.approx(0.3) and out["small"]["fixed"] == pytest.approx(0.8)
    assert out["small"]["loss_ratio_median"] == pytest.approx(np.median([0.1, 0.4]))
    assert out["other"]["model"] == pytest.approx(0.9)
