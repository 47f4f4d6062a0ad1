"""The device entry point of the central-flow scores (analyses/central_flow_gpu.py): its budget
guard, its sizing rule, its lag-1 estimator, its argument errors, and (slow) a tiny run end to end
on the CPU within its budget."""

import json
import time

import numpy as np
import pytest
import torch

from analyses import central_flow_gpu as g


def test_budgeted_loss_refuses_calls_after_the_deadline():
    class Oracle:
        w0 = np.zeros(3)

        def grad(self, w):
            return w + 1

    live = g.BudgetedLoss(Oracle(), g.Budget(g.MARGIN_S + 60))
    assert live.grad(np.zeros(3)).tolist() == [1, 1, 1] and live.w0.size == 3
    spent = g.BudgetedLoss(Oracle(), g.Budget(g.MARGIN_S - 1))  # the margin is already past
    assert spent.w0.size == 3  # attributes pass; oracle calls do not
    with pytest.raises(g.OutOfBudget):
        spent.grad(np.zeros(3))


def test_planned_steps_fit_gd_into_its_share_of_the_budget():
    steps, per_step = g.planned_steps(1000, s_hvp=0.01, s_grad=0.005, seconds=300)
    assert per_step == pytest.approx(g.EVALS_PER_STEP * (g.HVPS_PER_EVAL * 0.01 + 0.005))
    gd_step = per_step + len(g.EDGE_FACTORS) * (0.005 + g.PROBE_HVPS * 0.01 / g.EVERY)
    assert steps % g.EVERY == 0 and steps * gd_step <= g.GD_SHARE * 300 < (steps + g.EVERY) * gd_step
    assert g.planned_steps(1000, 1e-6, 1e-6, 300)[0] == 1000      # cheap: as asked
    assert g.planned_steps(1000, 10.0, 10.0, 300)[0] == g.MIN_STEPS  # hopeless: the floor


def test_lag1_window_estimator_on_alternating_and_persistent_gradients():
    """g_t = (-1)^t a in layer 0 (correlation −1) and g_t = a in layer 1 (+1)."""
    steps = 40
    sq = np.ones((steps, 2)) * np.array([4.0, 9.0])
    dots = np.stack([-4.0 * np.ones(steps), 9.0 * np.ones(steps)], 1)
    dots[0] = np.nan
    run = {"sq": sq, "dots": dots}
    out = g.lag1(run, np.array([10, 20, 30]))
    np.testing.assert_allclose(out, [[-1.0, 1.0]] * 3)


@pytest.mark.parametrize("argv, needle", [
    (["--budget-s", "5"], "--budget-s=5"), (["--models", "vgg"], "--models=vgg"),
    (["--steps", "5"], "--steps=5"), (["--loss", "hinge"], "--loss=hinge"),
    (["--edge-factors", "0.5"], "--edge-factors")])
def test_bad_arguments_print_one_line_and_return_2(argv, needle, capsys, tmp_path):
    assert g.main(["--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a CUDA device")
def test_cuda_without_a_device_is_refused(capsys, tmp_path):
    assert g.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "--device=cuda" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_run_end_to_end_within_its_budget(tmp_path):
    """A tiny CNN on 64 examples: the scan, GD's discrete run, flows and scores, written as JSON
    while it runs; the whole run stays within --budget-s (plus one oracle call past the margin)."""
    budget = 45
    t0 = time.monotonic()
    assert g.main(["--device", "cpu", "--out", str(tmp_path), "--budget-s", str(budget), "--quick",
                   "--models", "seed_cnn"]) == 0
    assert time.monotonic() - t0 <= budget
    rec = json.loads((tmp_path / "seed_cnn.json").read_text())
    assert rec["d"] == 1050 and rec["n_train"] == 64 and rec["seconds_per_hvp"] > 0
    assert "scan_gd_c2" in rec["stages"] and "edge" in rec
    gd = rec["stages"]["gd_0"]
    # stopped before its first piece, or scored over the probes its flow reached
    assert "interrupted" in gd or (gd["flow_cost"]["probes_reached"] >= 1 and "scores" in gd
                                   and gd["end_step"] == 10 * (gd["flow_cost"]["probes_reached"] - 1))


def test_chunked_flow_equals_the_flow_in_one_piece():
    """Restarting the flow at chunk ends (one of them inside the edge phase) gives the same flow
    as one piece, to the solver's tolerance: same events, same edge phase, same iterate."""
    from dynamics import central_flow as cf
    loss = cf.sharpening_toy(scale=100.0)  # edge of GD at lr 0.01: 200; enters t ≈ 6, leaves ≈ 17
    lr = 0.01
    t_eval = lr * np.arange(0, 2500, 50)
    one, done1 = g.chunked_flow(loss, "gd", 0.0, lr, t_eval, max_edge=1, chunks=1)
    four, done4 = g.chunked_flow(loss, "gd", 0.0, lr, t_eval, max_edge=1, chunks=4)
    assert done1 == 1 and done4 == 4 and one.success and four.success
    assert [k for _, k, _ in four.events] == [k for _, k, _ in one.events] == ["enter", "leave"]
    np.testing.assert_allclose([t for t, _, _ in four.events], [t for t, _, _ in one.events], rtol=1e-4)
    np.testing.assert_array_equal(four.t, one.t)
    assert np.mean(four.active == one.active) > 0.99  # at most a sample at an event differs
    np.testing.assert_allclose(four.w, one.w, atol=1e-4 * np.abs(one.w).max())
    np.testing.assert_allclose(four.sigma2, one.sigma2, atol=1e-3 * one.sigma2.max())
