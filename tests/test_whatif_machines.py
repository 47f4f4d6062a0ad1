"""analyses/whatif_machines.py: the comparison of the choice's difference on two machines' stores."""

import pytest

from analyses import whatif_machines as wm


def _scores(corr, sign, effect, size):
    return {"corr_spearman": corr, "norm_sign": sign, "effect_sign": effect, "norm_factor_1p5": size}


def test_compare_gives_the_difference_of_the_group_terms_on_each_store():
    here = {wm.FORMER: _scores(0.8, 0.6, 0.4, 0.2), wm.IN_USE: _scores(0.8, 0.7, 0.4, 0.3)}
    stored = {wm.FORMER: _scores(0.8, 0.6, float("nan"), 0.1), wm.IN_USE: _scores(0.8, 0.5, float("nan"), 0.1)}
    out = wm.compare(here, stored)
    assert out["d_here"] == pytest.approx(0.2 / 4)  # four terms defined
    assert out["d_stored"] == pytest.approx(-0.1 / 3)  # the effect sign undefined: three terms
    assert out["former_term_stored"] == pytest.approx(1.5 / 3)


def test_summary_and_bad_group_names():
    s = wm.summary({"a": {"d_here": 0.1, "d_stored": 0.0}, "b": {"d_here": 0.3, "d_stored": 0.0}})
    assert s["here"]["mean_d"] == pytest.approx(0.2) and s["here"]["se"] == pytest.approx(0.1)
    assert s["stored"]["se"] == 0.0 and s["groups"] == 2
    with pytest.raises(ValueError, match="groups=\\['evaluation_19'\\].*development groups"):
        wm.main(["evaluation_19"])
    with pytest.raises(ValueError, match="name one or more"):
        wm.main([])
