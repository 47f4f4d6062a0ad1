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


def _series(n=8, layers=2):
    steps = np.arange(0, 10 * n, 10)
    rng = np.random.default_rng(0)
    lag_flow = -1 + 0.1 * rng.random((n, layers))
    return {"step": steps, "loss_measured": np.full(n, 1.1), "loss_flow": np.full(n, 1.0),
            "loss_flow_mean_only": np.full(n, 0.5), "loss_gradient_flow": np.full(n, 2.0),
            "grad_sq_measured": np.full(n, 3.0), "grad_sq_flow": np.full(n, 4.0),
            "grad_sq_gradient_flow": np.full(n, 1.0),
            "layer_grad_sq_measured": np.full((n, layers), 2.0), "layer_grad_sq_flow": np.full((n, layers), 2.5),
            "layer_grad_sq_gradient_flow": np.full((n, layers), 1.0),
            "sharpness_measured": np.where(steps < 40, 9.0, 12.6), "sharpness_flow": np.full(n, 12.0),
            "lag1_measured": lag_flow + 0.01, "lag1_flow": lag_flow, "lag1_flow_grad_at_mean": np.full((n, layers), 0.5),
            "sigma2": np.where(steps >= 20, 0.002, 0.0), "sigma2_measured": np.where(steps >= 20, 0.0025, 0.0)}


def test_phase_scores_per_phase():
    """Relative errors |measured/predicted − 1| per probe, summarised over each mask; the lag-1
    score ranks measured against predicted over layers × probes (a monotone shift: Spearman 1)."""
    series = _series()
    late = series["step"] >= 40
    out = a.phase_scores(series, {"all": np.ones(8, bool), "late": late, "empty": np.zeros(8, bool)})
    assert set(out) == {"all", "late"}  # fewer than 3 probes: left out
    r = out["late"]
    assert r["probes"] == 4
    assert r["loss_rel_err_flow_median"] == pytest.approx(0.1)
    assert r["loss_rel_err_gradient_flow_median"] == pytest.approx(0.45)
    assert r["grad_sq_rel_err_flow_median"] == pytest.approx(0.25)
    assert r["layer_grad_sq_rel_err_flow_median"] == [0.2, 0.2]
    assert r["sharpness_abs_rel_err_median"] == pytest.approx(0.05)
    assert out["all"]["sharpness_abs_rel_err_median"] == pytest.approx(0.15)  # 4 at −25 %, 4 at +5 %
    assert r["lag1_spearman_layers_x_time"] == pytest.approx(1.0)
    assert r["lag1_median_abs_diff"] == pytest.approx(0.01)
    assert r["sigma2_rel_err_median"] == pytest.approx(0.25)  # over the probes where the flow has σ² > 0
    assert r["lag1_median_abs_diff_grad_at_mean"] == pytest.approx(
        np.median(np.abs(series["lag1_measured"][late] - 0.5)))


def test_parse_only():
    assert a._parse_only("gd:0,hb:0.5,nag") == [("gd", 0.0), ("hb", 0.5), ("nag", 0.0)]


def test_settled_from_needs_a_final_stretch_within_tolerance():
    ratio = np.r_[1.2, 0.9, 1.05, np.full(17, 1.005)]
    assert a.settled_from(ratio, tol=0.01, every=10) == 30
    assert a.settled_from(np.r_[np.full(19, 1.1), 1.0], tol=0.01, every=10) is None  # only the last probe
    assert a.settled_from(np.full(5, 1.0)) == 0
    assert a.settled_from(np.r_[1.0, np.nan, 1.0, 1.0]) == 20  # a missing probe is not within tol


def test_window_sigma2_is_the_period_two_variance_along_u():
    """Iterates a + b·k + (−1)^k δ_k u (a linear drift plus an alternation of amplitude δ_k along
    the unit vector u): the window mean of (osc·u)² is the window mean of δ_k², the drift
    removed exactly; where the flow is off the edge (u = 0) it is 0."""
    rng = np.random.default_rng(1)
    d, steps = 5, 60
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    delta = 0.1 + 0.01 * np.arange(steps + 1)
    k = np.arange(steps + 1)[:, None]
    iterates = rng.standard_normal(d) + 0.3 * k * rng.standard_normal(d) + ((-1.0) ** k) * delta[:, None] * u
    probes = np.array([10, 20, 30, 40])
    vectors = np.stack([u, u, u, np.zeros(d)])
    got = a.window_sigma2(iterates, vectors, probes, width=10)
    want = [np.mean(delta[p - 5:p + 5] ** 2) for p in probes[:3]] + [0.0]
    # the filter sees δ's change over one step: (δ_{k−1} − 2δ_k + δ_{k+1})/4 = 0 for linear δ
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_window_sigma2_sums_over_the_active_edge_vectors():
    """Two orthonormal edge vectors u, v with alternations δ_k and ε_k: with both active the
    window mean of δ² + ε² (tr Σ); with one active that of δ² alone (the old single-vector value)."""
    rng = np.random.default_rng(2)
    d, steps = 6, 60
    q = np.linalg.qr(rng.standard_normal((d, 2)))[0]
    delta, eps = 0.1 + 0.01 * np.arange(steps + 1), 0.2 - 0.002 * np.arange(steps + 1)
    k = np.arange(steps + 1)[:, None]
    alternation = delta[:, None] * q[:, 0] + eps[:, None] * q[:, 1]
    iterates = 0.3 * k * rng.standard_normal(d) + ((-1.0) ** k) * alternation
    probes = np.array([10, 20, 30])
    vectors = np.repeat(q[None], 3, axis=0)
    got = a.window_sigma2(iterates, vectors, probes, width=10, active=np.array([2, 1, 2]))
    both = [np.mean(delta[p - 5:p + 5] ** 2 + eps[p - 5:p + 5] ** 2) for p in probes]
    np.testing.assert_allclose(got, [both[0], np.mean(delta[15:25] ** 2), both[2]], rtol=1e-12)
    np.testing.assert_allclose(a.window_sigma2(iterates, vectors[:, :, 0], probes, width=10),
                               [np.mean(delta[p - 5:p + 5] ** 2) for p in probes], rtol=1e-12)


def test_merge_write_keeps_the_other_settings_keys(tmp_path, monkeypatch):
    """Each setting runs as its own process and writes only its keys into the shared file."""
    import json

    monkeypatch.setattr(a, "OUT", tmp_path / "central_flow.json")
    a._merge_write(runs=[1], lr_decay={"x": 1}, complete=True)
    a._merge_write(runs_2000_steps=[2])
    a._merge_write(runs=[3])
    assert json.loads(a.OUT.read_text()) == {"runs": [3], "lr_decay": {"x": 1}, "runs_2000_steps": [2]}


def test_parse_scan_and_its_error():
    assert a._parse_scan("hb:0.3:12:2000,gd:0:10:500") == [("hb", 0.3, 12.0, 2000), ("gd", 0.0, 10.0, 500)]
    with pytest.raises(ValueError, match="method:beta:edge:steps"):
        a._parse_scan("hb:0.3:12")


def test_unknown_setting_names_the_valid_ones():
    with pytest.raises(ValueError, match="linreg, digits"):
        a.main(["--setting", "cifar", "--scan"])


def test_digits_setting_is_real_data_with_cross_entropy():
    assert a.DIGITS.data == "digits" and a._describe(a.DIGITS).count("cross-entropy") == 1
    assert a.lr_for("nag", 0.3, a.DIGITS.edge) * a.DIGITS.edge == pytest.approx(2 * 1.3 / 1.6)


def test_oscillating_probes_need_the_flow_at_the_edge_and_a_measured_oscillation():
    series = {"step": np.arange(0, 60, 10), "sigma2": np.array([0, 0, 1e-4, 1e-4, 1e-4, 0.0]),
              "sigma2_measured": np.array([1e-4, 0, 2e-4, 0, 1e-4, 1e-4])}
    assert a.oscillating_probes(series).tolist() == [False, False, True, False, True, False]


def test_compact_json_round_trips_with_scalar_lists_on_one_line():
    obj = {"series": {"loss": [0.5, 0.25, 1e-6], "layer": [[1.0, 2.0], [3.0, 4.0]]}, "names": ["a b", "c"], "n": 3}
    text = a._compact_json(obj)
    assert a.json.loads(text) == obj
    assert '"loss": [ 0.5, 0.25, 1e-06 ]' in text and "[ 1.0, 2.0 ]" in text
    assert '"a b"' in text  # strings are left as they are


def test_digits_mse_setting_is_the_same_data_with_the_one_hot_mse():
    from experiments.trace.central_flow_loss import LOSSES, onehot_mse

    s = a.SETTINGS["digits_mse"]
    assert s.data == a.DIGITS.data and s.n_train == a.DIGITS.n_train and LOSSES[s.loss] is onehot_mse
    assert "MSE against one-hot" in a._describe(s) and "cross-entropy" not in a._describe(s)
    assert s.prefix.rstrip("_") not in ("", a.DIGITS.prefix.rstrip("_"))  # its own block of the results file


def test_edge_space_splits_the_period_two_part_by_ritz_vectors_and_the_flow_span():
    """Constructed run: a linear drift plus (−1)^k (a e_1 + b e_3) in R^5, the loss's Ritz
    vectors the coordinate axes (eigenvalues 2, 1.9, 1.5, 1, 0.5), the flow's edge span e_1
    with σ² = a²: the filter removes the drift exactly, so the cumulative shares are
    a²/(a²+b²) after e_1 and e_2, 1 after e_3; the flow span's share a²/(a²+b²); the total
    over the flow's σ² (a²+b²)/a²; the run's top Ritz vector is the flow's (cosine 1)."""
    from types import SimpleNamespace

    d, steps, a_amp, b_amp = 5, 300, 0.3, 0.1
    k = np.arange(steps + 1)[:, None]
    e = np.eye(d)
    iterates = 0.01 * k * np.ones(d) + (-1.0) ** k * (a_amp * e[0] + b_amp * e[2])
    vals = np.array([2.0, 1.9, 1.5, 1.0, 0.5])
    loss = SimpleNamespace(top_eigs=lambda w, n: (vals[:n], e[:, :n]))
    probes = np.arange(0, steps, 10)
    flow = SimpleNamespace(t=probes * 1.0, active=np.ones(probes.size, int),
                           vectors=np.tile(e[:, :1], (probes.size, 1, 1)), sigma2=np.full(probes.size, a_amp**2))
    out = a.edge_space(loss, flow, iterates, probes, start=100, edge=2.0, k=4, every=50)
    assert [r["step"] for r in out["points"]] == [100, 150, 200, 250]
    share = a_amp**2 / (a_amp**2 + b_amp**2)
    np.testing.assert_allclose(out["mean"]["share_top_cumulative"], [share, share, 1.0, 1.0], atol=1e-4)
    assert out["mean"]["share_flow_span"] == pytest.approx(share, abs=1e-4)
    assert out["mean"]["total_over_flow_sigma2"] == pytest.approx(1 / share, rel=1e-4)
    np.testing.assert_allclose(out["mean"]["ritz_over_edge"], vals[:4] / 2.0)
    assert out["mean"]["run_top_vs_flow_span_cosines"] == [1.0]


def test_tag_must_be_a_plain_name():
    with pytest.raises(ValueError, match="--tag='Bad!'"):
        a.main(["--setting", "digits_mse", "--tag", "Bad!", "--rescore"])


def test_rescore_with_a_tag_touches_only_that_key(tmp_path, monkeypatch):
    """Runs added under their own key are rescored without rewriting the stored runs' scores."""
    import json

    monkeypatch.setattr(a, "OUT", tmp_path / "central_flow.json")
    monkeypatch.setattr(a, "phase_scores", lambda series, phases: {"oscillating": {"n": len(series["step"])}})
    monkeypatch.setattr(a, "oscillating_probes", lambda series: None)
    run = {"method": "hb", "momentum": 0.2, "scores": {}, "series": {"step": [0, 10]}}
    a._merge_write(digits_mse={"runs_2000_steps": [run], "runs_2000_steps_two": [dict(run, momentum=0.4)]})
    a.main(["--setting", "digits_mse", "--tag", "two", "--rescore"])
    got = json.loads(a.OUT.read_text())["digits_mse"]
    assert got["runs_2000_steps"][0]["scores"] == {}
    assert got["runs_2000_steps_two"][0]["scores"] == {"oscillating": {"n": 2}}
