"""The seed-setting target's noise ceiling (analyses/whatif_seed_ceiling.py): the scores on
constructed replicates, and replicate continuations of a small run from its checkpoint."""

import numpy as np
import pytest

from analyses import whatif_seed_ceiling as sc
from experiments import store
from experiments.runs.config import RunConfig, run_id
from experiments.runs.loop import run
from experiments.whatif.core import measure_windows
from experiments.whatif.predict import window_bounds
from tests.test_whatif import TINY


def test_right_scores_sign_and_size_as_the_target():
    out = sc.right([1.2, 1.2, 0.9, 2.0], [1.1, 0.95, 0.8, 1.2])
    assert out["sign"].tolist() == [True, False, True, True]
    assert out["within"].tolist() == [True, True, True, False]  # 2.0 / 1.2 = 1.67 > 1.5
    assert out["right"].tolist() == [True, False, True, False]


def test_the_ceiling_is_perfect_on_identical_replicates_and_counts_disagreement():
    same = np.tile([1.3, 0.7, 1.1], (3, 1))
    assert all(v == 1.0 for v in sc.ceiling(same).values())
    # two replicates straddling 1: every pair and every leave-one-out mean has the other sign
    straddle = sc.ceiling([[1.2, 1.2], [0.9, 1.3]])
    assert straddle["pairwise_sign"] == 0.5 and straddle["ceiling_sign"] == 0.5
    assert straddle["pairwise_within"] == 1.0
    with pytest.raises(ValueError, match="replicates has 1 row"):
        sc.ceiling([[1.2, 1.0]])


def test_the_leave_one_out_prediction_is_the_geometric_mean_of_the_others():
    # replicates 2, 0.5, 1.6 of one layer: for row 0 the others' geometric mean is √0.8 = 0.89
    # (sign wrong), for row 1 √3.2 = 1.79 (sign wrong), for row 2 exactly 1 (sign 0 ≠ +1: wrong)
    out = sc.ceiling([[2.0], [0.5], [1.6]])
    assert out["ceiling_sign"] == 0.0
    # within ×1.5: 2/0.894 = 2.24 no, 1.789/0.5 = 3.6 no, 1.6/1 = 1.6 no
    assert out["ceiling_within"] == 0.0
    # pairs: (2, 1.6) and (1.6, 2) share the sign and are within ×1.5; the other four are not
    assert out["pairwise_sign"] == pytest.approx(2 / 6) and out["pairwise_within"] == pytest.approx(2 / 6)


def test_against_averages_over_replicates_and_pooled_weights_by_layers():
    out = sc.against([1.2, 0.8], [[1.1, 0.9], [1.1, 1.1]])
    assert out == {"sign": 0.75, "within": 1.0, "right": 0.75}
    entries = [{"layers": ["a"], "data": {"ceiling_right": 1.0, "spread": [1.1], "model": out, "trend": out}},
               {"layers": ["a", "b", "c"], "data": {"ceiling_right": 0.0, "spread": [1.0, 1.2, 1.3],
                                                     "model": out, "trend": out}}]
    pooled = sc.pooled(entries, "data")
    assert pooled["ceiling_right"] == 0.25 and pooled["layers"] == 4 and pooled["median_spread"] == 1.15
    assert sc.pooled(entries, "kernels") == {}


def test_seed_configs_names_the_valid_entries():
    assert len(sc.seed_configs("seed_decay_growth")) == 1
    with pytest.raises(ValueError, match="name='seed_decay'.*valid entries"):
        sc.seed_configs("seed_decay")


@pytest.fixture
def small_at():
    return window_bounds(30, 10, 2)  # continue from step 30 of TINY's 60


def test_a_continuation_is_the_run_itself_and_a_replicate_another_draw(tmp_path, small_at):
    cfg = RunConfig(**TINY)
    run_dir = tmp_path / run_id(cfg)
    run(cfg, run_dir)
    own = sc.growth(measure_windows(store.load_run(run_dir), small_at, "hb", 0.9, after=30)["grad_norm"].values)
    np.testing.assert_array_equal(sc.continuation(run_dir, tmp_path, small_at), own)  # bit-identical (CPU)
    other = sc.continuation(run_dir, tmp_path, small_at, data_seed=1)
    assert other.shape == own.shape and not np.allclose(other, own)


@pytest.mark.slow
def test_a_kernel_continuation_runs_on_the_lowered_instruction_set(tmp_path, small_at, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the kernel forks go to ./store/kernel_default
    cfg = RunConfig(**TINY)
    run_dir = tmp_path / "runs" / run_id(cfg)
    run(cfg, run_dir)
    g, capability = sc.kernel_continuation(run_dir, small_at, "default")
    assert capability == "DEFAULT" and g.shape == (len(store.load_run(run_dir).layer),)
    assert (tmp_path / "store" / "kernel_default" / run_id(cfg)).is_symlink()


def test_the_climatology_leaves_out_the_entry_and_the_held_out_ones():
    def entry(g):
        return {"layers": ["a", "b"], "data": {"growth": [[g, g], [g, g]]}}

    entries = {"dev1": [entry(1.3)], "dev2": [entry(1.5), entry(0.8)], "held": [entry(10.0)]}
    sc.add_climatology(entries, held_out=("held",))
    assert entries["dev1"][0]["climatology_growth"] == pytest.approx(np.sqrt(1.5 * 0.8))  # 1.095: not its own 1.3
    assert entries["dev2"][1]["climatology_growth"] == pytest.approx(1.3)
    assert entries["held"][0]["climatology_growth"] == pytest.approx((1.3 * 1.5 * 0.8) ** (1 / 3))  # development only
    assert entries["dev2"][1]["data"]["climatology"] == {"sign": 0.0, "within": 0.0, "right": 0.0}  # 1.3 vs 0.8
    assert entries["dev1"][0]["data"]["climatology"] == {"sign": 1.0, "within": 1.0, "right": 1.0}


def test_stored_predictions_scores_the_stored_growth_and_the_measured_rise_against_the_replicates():
    ceilings = {"entries": {"seed_decay_growth": [
        {"run": "r0", "data": {"growth": [[1.3, 0.8], [1.2, 0.9]], "model": {"right": 0.25}}}]}}
    scores = {"seed_decay_growth": {"run": "r0", "measured_sharpness_rise": [1.69, 0.81],
                                    "former": {"predicted_growth": [0.9, 0.9], "predicted_sharpness_rise": 1.0}},
              "development": {"pooled": {}}}
    (row,) = sc.stored_predictions(ceilings, scores, name="former")
    assert row["run"] == "r0" and row["model"] == 0.25
    assert row["former"] == 0.5  # 0.9 is right on the falling layer only, in both replicates
    # × √(s/ŝ) = 1.3 and 0.9: right on both layers of both replicates; √s alone the same here
    assert row["measured_rise_scaled"] == 1.0 and row["measured_rise_alone"] == 1.0
