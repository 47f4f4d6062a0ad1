"""The torch adapter of the central flow (experiments.trace.central_flow_loss) against
independent routes on a tiny network: autograd through the model as the training loop runs
it, dense Hessians by torch.autograd.functional.hessian, finite differences of the top
eigenvalue."""

import numpy as np
import pytest
import torch

from experiments.runs.data import load_data
from experiments.runs.loop import make_loss_fn
from experiments.runs.models import build_model
from experiments.trace.central_flow_loss import NetworkLoss


@pytest.fixture(scope="module")
def tiny():
    data = load_data("digits", n_train=40)
    torch.manual_seed(0)
    model = build_model("mlp", data.info, hidden=(6,))
    return NetworkLoss(model, data.x_train, data.y_train, "classify"), model, data


def _dense_hessian(loss, w):
    """Independent route: autograd's dense Hessian of the flat-vector loss."""
    return torch.autograd.functional.hessian(loss._loss, torch.as_tensor(w)).numpy()


def test_value_and_grad_match_the_training_loop(tiny):
    """The loop's loss and .grad after backward (float64 model), flattened in parameter order."""
    loss, model, data = tiny
    model.zero_grad()
    value = make_loss_fn("classify")(model, (data.x_train.double(), data.y_train))
    value.backward()
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()
    assert loss.value(loss.w0) == pytest.approx(value.item(), rel=1e-14)
    np.testing.assert_allclose(loss.grad(loss.w0), flat, rtol=1e-12, atol=1e-15)
    assert loss.layers == ["fc1", "fc2"] and loss.blocks[-1].stop == loss.w0.size


def test_hvp_and_eigenpairs_against_the_dense_hessian(tiny):
    """HVPs equal H v to rounding (1e-12 relative); Lanczos's top 3 eigenvalues equal
    eigvalsh's to 1e-9 relative (Ritz-residual stop at 1e-10) and its vectors span the same
    directions (|u·u_dense| = 1 to 1e-6: the eigenvalue gaps here are ≥ 0.08)."""
    loss, _, _ = tiny
    rng = np.random.default_rng(1)
    w = loss.w0 + 0.05 * rng.standard_normal(loss.w0.size)
    dense = _dense_hessian(loss, w)
    for _ in range(3):
        v = rng.standard_normal(w.size)
        np.testing.assert_allclose(loss.hvp(w, v), dense @ v, rtol=1e-10, atol=1e-12 * np.abs(dense @ v).max())
    np.testing.assert_allclose(loss.hessian(w), dense, rtol=1e-10, atol=1e-13)
    vals, vecs = loss.top_eigs(w, 3)
    ev, evec = np.linalg.eigh(dense)
    np.testing.assert_allclose(vals, ev[::-1][:3], rtol=1e-9)
    np.testing.assert_allclose(np.abs(np.sum(vecs * evec[:, ::-1][:, :3], axis=0)), 1.0, atol=1e-6)


def test_grad_sharpness_against_finite_differences_of_the_top_eigenvalue(tiny):
    """⟨∇S, d⟩ against (S(w+εd) − S(w−εd))/2ε with S from the dense Hessian's eigvalsh, three
    random unit directions, ε = 1e-4: truncation O(ε²·S''') ~ 1e-8, measured agreement 1e-9
    relative; 1e-6 allowed."""
    loss, _, _ = tiny
    rng = np.random.default_rng(2)
    w = loss.w0
    grad_s = loss.grad_sharpness(w)
    eps = 1e-4
    for _ in range(3):
        d = rng.standard_normal(w.size)
        d /= np.linalg.norm(d)
        top = [np.linalg.eigvalsh(_dense_hessian(loss, w + s * eps * d))[-1] for s in (1, -1)]
        fd = (top[0] - top[1]) / (2 * eps)
        assert grad_s @ d == pytest.approx(fd, rel=1e-6, abs=1e-9)
    # ∇(vᵀHu) is symmetric in u, v and linear: an independent identity check
    u, v = rng.standard_normal((2, w.size))
    np.testing.assert_allclose(loss.grad_quadform(w, u, v), loss.grad_quadform(w, v, u), rtol=1e-9, atol=1e-12)


def test_warm_starts_save_lanczos_steps(tiny):
    """At a nearby point the warm-started Lanczos needs fewer HVPs for the same accuracy (Ritz
    residual 1e-10) than from a random start: measured 25 vs 31 (the 10 % random part of the
    start, kept as in the probes so that a newly dominant direction stays reachable, limits
    the saving)."""
    loss, _, _ = tiny
    w = loss.w0
    cold = NetworkLoss(loss.model, loss.x, loss.y, "classify", seed=3)
    cold.top_eigs(w, 1)
    first = cold.n_hvp
    cold.top_eigs(w + 1e-4, 1)
    warm_cost = cold.n_hvp - first
    assert warm_cost < first, (warm_cost, first)


def test_lobpcg_path_against_the_dense_hessian(tiny):
    """``eig_solver="lobpcg"``: the first call by Lanczos, then warm calls at points moved by
    1e-4 and 1e-3 per coordinate, each against eigh of the dense Hessian: eigenvalues
    within the residual bound |θ − λ| ≤ ‖r‖ ≤ eig_tol·θ_1 (1e-8 relative; 1e-8·1.25 absolute
    allowed), vectors |u·u_dense| = 1 to 1e-6 (angle ≤ ‖r‖/gap ≈ 1e-8·1.25/0.035 here); every
    warm call converged without falling back to Lanczos, and fewer HVPs than the Lanczos path
    (residual 1e-10) over the same sequence of points."""
    loss, _, _ = tiny
    rng = np.random.default_rng(4)
    new = NetworkLoss(loss.model, loss.x, loss.y, "classify", eig_solver="lobpcg", eig_tol=1e-8, seed=1)
    old = NetworkLoss(loss.model, loss.x, loss.y, "classify", seed=1)
    w = loss.w0 + 0.05 * rng.standard_normal(loss.w0.size)
    new.top_eigs(w, 3)
    old.top_eigs(w, 3)
    n_new, n_old = new.n_hvp, old.n_hvp
    for step in (1e-4, 1e-4, 1e-3):
        w = w + step * rng.standard_normal(w.size)
        vals, vecs = new.top_eigs(w, 3)
        old.top_eigs(w, 3)
        ev, evec = np.linalg.eigh(old.hessian(w))  # equals autograd's: test_hvp_and_eigenpairs_...
        np.testing.assert_allclose(vals, ev[::-1][:3], rtol=0, atol=1e-8 * ev[-1])
        np.testing.assert_allclose(np.abs(np.sum(vecs * evec[:, ::-1][:, :3], axis=0)), 1.0, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=0), 1.0, rtol=1e-12)
    assert new.n_lobpcg_fallback == 0
    assert new.n_hvp - n_new < old.n_hvp - n_old, (new.n_hvp - n_new, old.n_hvp - n_old)
    with pytest.raises(ValueError, match=r"eig_solver='arpack' is not valid; valid: lanczos, lobpcg"):
        NetworkLoss(loss.model, loss.x, loss.y, "classify", eig_solver="arpack")
    with pytest.raises(ValueError, match=r"eig_tol=0 is outside the valid range \(0, 1\)"):
        NetworkLoss(loss.model, loss.x, loss.y, "classify", eig_tol=0)
    with pytest.raises(ValueError, match=r"lobpcg_iters=0 is outside the valid range \[1, inf\)"):
        NetworkLoss(loss.model, loss.x, loss.y, "classify", lobpcg_iters=0)


def test_mlp_activation_option():
    """The MLP's smooth activations (for the central flow) and the error naming the value."""
    data = load_data("digits", n_train=8)
    x = data.x_train.float()
    for name, fn in (("tanh", torch.tanh), ("gelu", torch.nn.functional.gelu)):
        torch.manual_seed(0)
        model = build_model("mlp", data.info, hidden=(5,), activation=name)
        expected = model.fc2(fn(model.fc1(x.flatten(1))))
        torch.testing.assert_close(model(x), expected)
    with pytest.raises(ValueError, match=r"activation='elu' is unknown; valid: relu, tanh, gelu"):
        build_model("mlp", data.info, activation="elu")


def test_onehot_mse_against_its_formula_the_loop_and_the_dense_hessian():
    """The one-hot MSE (½ mean over examples and outputs) against an explicit numpy sum; its
    gradient against central finite differences of that sum (step 1e-6: O(ε²) ≈ 1e-12 truncation,
    float64 rounding ~1e-10 relative); HVPs against autograd's dense Hessian (rounding, 1e-10);
    and the training loop's one-step update with ``loss_fn=onehot_mse`` against w0 − lr·∇L."""
    from experiments.runs.config import RunConfig
    from experiments.runs.loop import train
    from experiments.trace.central_flow_loss import onehot_mse

    data = load_data("digits", n_train=30)
    torch.manual_seed(0)
    model = build_model("mlp", data.info, hidden=(3,), activation="tanh")
    loss = NetworkLoss(model, data.x_train, data.y_train, "classify", loss_fn=onehot_mse)
    y = np.eye(10)[data.y_train.numpy()]

    def explicit(w):
        with torch.no_grad():
            out = torch.func.functional_call(loss.model, loss._params(torch.as_tensor(w)), (loss.x,)).numpy()
        return 0.5 * np.mean((out - y) ** 2)

    rng = np.random.default_rng(2)
    w = loss.w0 + 0.05 * rng.standard_normal(loss.w0.size)
    assert loss.value(w) == pytest.approx(explicit(w), rel=1e-13)
    cross_entropy = NetworkLoss(model, data.x_train, data.y_train, "classify")
    assert loss.value(w) != pytest.approx(cross_entropy.value(w), rel=1e-3)
    eps, idx = 1e-6, rng.choice(w.size, 8, replace=False)
    fd = [(explicit(w + eps * np.eye(w.size)[i]) - explicit(w - eps * np.eye(w.size)[i])) / (2 * eps) for i in idx]
    np.testing.assert_allclose(loss.grad(w)[idx], fd, rtol=1e-6, atol=1e-9)
    dense = _dense_hessian(loss, w)
    v = rng.standard_normal(w.size)
    np.testing.assert_allclose(loss.hvp(w, v), dense @ v, rtol=1e-10, atol=1e-12 * np.abs(dense @ v).max())
    config = RunConfig(model="mlp", data="digits", opt="gd", lr=0.5, momentum=0.0, steps=1, batch_size=0,
                       probe_every=0, hutchinson_samples=0, noise_microbatches=0, data_args={"n_train": 30},
                       model_args={"hidden": (3,), "activation": "tanh"}, threads=1, dtype="float64")
    trace, summary = train(config, loss_fn=onehot_mse)
    assert trace["loss"].values[0] == pytest.approx(loss.value(loss.w0), rel=1e-12)


def _device_arm(device=None):
    data = load_data("digits", n_train=40)
    torch.manual_seed(0)
    model = build_model("mlp", data.info, hidden=(6,), activation="tanh")
    extra = {} if device is None else {"device": device}
    return NetworkLoss(model, data.x_train, data.y_train, "classify", eig_solver="lobpcg", **extra)


def _compare_device_arms(loss, ref):
    """Same value, gradient, HVP, third-order pass and top eigenpair (float64: only the summation
    order may differ between devices; the eigenvalue to the solvers' tolerance)."""
    w = ref.w0 + 0.01 * np.random.default_rng(1).standard_normal(ref.w0.size)
    v = np.random.default_rng(2).standard_normal(ref.w0.size)
    assert loss.value(w) == pytest.approx(ref.value(w), rel=1e-12)
    np.testing.assert_allclose(loss.grad(w), ref.grad(w), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(loss.hvp(w, v), ref.hvp(w, v), rtol=1e-10, atol=1e-12)
    value, g = loss.value_and_grad_t(loss._t(w))
    assert g.device == loss.device and float(value) == pytest.approx(ref.value(w), rel=1e-12)
    np.testing.assert_allclose(loss._np(g), ref.grad(w), rtol=1e-10, atol=1e-14)
    (lam, u), (lam_ref, u_ref) = loss.top_eigs(w, 2), ref.top_eigs(w, 2)
    np.testing.assert_allclose(lam, lam_ref, rtol=1e-7)
    for j in range(2):  # each device's eigenvector is one of the reference's Hessian (residual, basis-free)
        assert np.linalg.norm(ref.hvp(w, u[:, j]) - lam[j] * u[:, j]) <= 1e-6 * abs(lam[0])
    np.testing.assert_allclose(loss.grad_quadform(w, u_ref[:, 0], u_ref[:, 0]),
                               ref.grad_quadform(w, u_ref[:, 0], u_ref[:, 0]), rtol=1e-9, atol=1e-12)


def test_device_argument_cpu_path_and_bad_device():
    """device='cpu' gives the default's numbers (and the tensor path, value_and_grad_t); an
    unknown device is a ValueError naming it."""
    _compare_device_arms(_device_arm("cpu"), _device_arm())
    with pytest.raises(ValueError, match="device='nodevice'"):
        _device_arm("nodevice")


@pytest.mark.gpu
def test_cuda_loss_equals_the_cpu_loss():
    """The same tiny network on CUDA and on the CPU (float64): grad, HVP, ∇(uᵀHu), top eigenpairs."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _compare_device_arms(_device_arm("cuda"), _device_arm("cpu"))


@pytest.mark.slow
def test_adaptive_event_tolerance_on_a_tiny_network_gives_the_same_flow():
    """Warm LOBPCG with the entering event's adaptive tolerance against every event solve at
    eig_tol (``adaptive_eigs=False``): a tanh MLP (d = 460) on 40 digits with one-hot MSE, GD at
    S* = 1.2 λ_max(w0), RK23 over 25 steps, which enters, leaves and re-enters the edge. The
    same events, their times to 1e-8 relative (brentq's roots at full accuracy; the warm starts
    differ), the samples and λ_max to 1e-6 relative (eigenvalues off by ~(eig_tol·θ_1)²/gap
    move the events and the iterate far less), and fewer HVPs. A bad ``tol`` names itself."""
    from dynamics import central_flow as cf
    from experiments.trace.central_flow_loss import LOSSES
    data = load_data("digits", n_train=40)

    def make():
        torch.manual_seed(0)
        model = build_model("mlp", data.info, hidden=(6,), activation="tanh")
        return NetworkLoss(model, data.x_train, data.y_train, "classify", eig_solver="lobpcg", eig_tol=1e-8,
                           lanczos_tol=1e-10, loss_fn=LOSSES["onehot_mse"])

    probe = make()
    edge = 1.2 * probe.top_eigs(probe.w0, 1)[0][0]
    lr = 2.0 / edge
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"tol=.* is outside the valid range \(0, 1\)"):
            probe.top_eigs(probe.w0, 1, tol=bad)
    flows, hvps = {}, {}
    for adaptive in (True, False):
        loss = make()
        flows[adaptive] = cf.solve_central_flow(loss, loss.w0, "gd", lr, 0.0, 25 * lr, t_eval=lr * np.arange(26.0),
                                                max_edge=2, ode_method="RK23", rtol=1e-6, atol=1e-9,
                                                adaptive_eigs=adaptive)
        hvps[adaptive] = loss.n_hvp
    new, old = flows[True], flows[False]
    assert [e[1:] for e in new.events] == [e[1:] for e in old.events] == [("enter", 1), ("leave", 0), ("enter", 1)]
    np.testing.assert_allclose([e[0] for e in new.events], [e[0] for e in old.events], rtol=1e-8)
    np.testing.assert_array_equal(new.active, old.active)
    np.testing.assert_allclose(new.w, old.w, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(new.eigenvalues[:, 0], old.eigenvalues[:, 0], rtol=1e-6)
    assert hvps[True] < hvps[False], hvps
