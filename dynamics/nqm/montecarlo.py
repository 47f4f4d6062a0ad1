r"""Monte-Carlo simulation of the noisy quadratic model (many independent chains at once).

The same model as :mod:`dynamics.nqm.stationary`: per eigen-mode :math:`g_k = \lambda x_k +
\sigma \varepsilon_k`, :math:`\varepsilon_k \sim N(0, 1)` i.i.d., and the update is
:meth:`dynamics.methods.Method.update` itself (PyTorch's rules), so the simulator and the
analytic model cannot drift apart. State arrays have shape (chains,) + modes; the loop is
over steps only.
"""

import numpy as np

from dynamics._checks import broadcast, check_momentum, check_positive
from dynamics.methods import get_method

__all__ = ["monte_carlo"]


def _stationary_start(method, lam, lr, momentum, sigma2, chains, rng):
    """Draw (x_0, b_{-1}) from the exact stationary Gaussian, so no burn-in is needed."""
    from dynamics.nqm.stationary import stationary_state_covariance

    P = stationary_state_covariance(method, lam, lr, momentum, sigma2)
    # Cholesky of a 2x2 PSD matrix, written out so that singular P (GD: b is unused) works.
    l11 = np.sqrt(P[..., 0, 0])
    l21 = np.divide(P[..., 1, 0], l11, out=np.zeros_like(l11), where=l11 > 0)
    l22 = np.sqrt(np.maximum(P[..., 1, 1] - l21**2, 0.0))
    z1, z2 = rng.standard_normal((2, chains) + lam.shape)
    return l11 * z1, l21 * z1 + l22 * z2


def monte_carlo(method, lam, lr, momentum, sigma2, *, steps, chains, seed=0,
                start="stationary", x0=0.0, average="time"):
    """Simulate ``chains`` independent chains per mode for ``steps`` steps.

    ``lam``, ``momentum``, ``sigma2`` broadcast to the mode shape; ``lr`` is a scalar (or,
    with ``start="given"``, one lr per step: a schedule). ``start="stationary"`` draws the
    state from the exact stationary law (constant lr, stable modes only); ``start="given"``
    starts at ``x0`` with a zero buffer, like PyTorch.

    ``average="time"``: per-mode means over chains and steps of ``grad_sq`` (g_t²),
    ``full_grad_sq`` ((λx_t)²) and ``lag1`` (g_t g_{t+1}), plus ``n`` (steps per chain) and
    ``chain_means`` (the same per chain, (chains,) + modes: i.i.d. across chains, so their
    spread gives the Monte-Carlo error without modelling the autocorrelation).
    ``average="chains"``: per-step chain means, arrays (steps,) + modes, ``lag1[t]`` =
    mean g_t g_{t-1} (NaN at t = 0), indexed like :func:`dynamics.nqm.stationary.schedule_prediction`.
    """
    m = get_method(method)
    lam = check_positive("lam", lam, allow_zero=True)
    momentum = check_momentum(momentum)
    sigma2 = check_positive("sigma2", sigma2, allow_zero=True)
    lam, momentum, sigma2 = broadcast(lam=lam, momentum=momentum, sigma2=sigma2)
    lrs = np.broadcast_to(check_positive("lr", lr, allow_zero=True), (int(steps),))
    if average not in ("time", "chains"):
        raise ValueError(f"average={average!r} is unknown; valid: time, chains")
    for name, value, low in (("steps", steps, 2), ("chains", chains, 1)):
        if int(value) != value or value < low:
            raise ValueError(f"{name}={value!r} is outside the valid range: integers >= {low}")
    rng = np.random.default_rng(seed)
    sigma = np.sqrt(sigma2)
    shape = (int(chains),) + lam.shape
    if start == "stationary":
        if np.ptp(lrs) > 0:
            raise ValueError("start='stationary' needs a constant lr; use start='given'")
        x, buf = _stationary_start(m.name, lam, lrs[0], momentum, sigma2, int(chains), rng)
    elif start == "given":
        x, buf = np.broadcast_to(np.asarray(x0, dtype=float), shape).copy(), np.zeros(shape)
    else:
        raise ValueError(f"start={start!r} is unknown; valid: stationary, given")
    # Preallocated work arrays and in-place arithmetic: large temporaries would cost a fresh
    # allocation (and page faults) per step. Only Method.update allocates.
    noise, full, g, prev, tmp = (np.empty(shape) for _ in range(5))
    if average == "time":  # per-chain sums: chains are i.i.d., so their spread is the error
        acc = {k: np.zeros(shape) for k in ("grad_sq", "full_grad_sq", "lag1")}
    else:
        acc = {k: np.empty((int(steps),) + lam.shape) for k in ("grad_sq", "full_grad_sq", "lag1")}
    for t in range(int(steps)):
        np.multiply(lam, x, out=full)
        rng.standard_normal(out=noise)
        np.multiply(sigma, noise, out=g)
        g += full
        for key, a, b in (("grad_sq", g, g), ("full_grad_sq", full, full), ("lag1", prev, g)):
            if key == "lag1" and t == 0:
                if average == "chains":
                    acc[key][0] = np.nan
                continue
            np.multiply(a, b, out=tmp)
            if average == "time":
                acc[key] += tmp
            else:
                acc[key][t] = tmp.mean(axis=0)
        step, buf = m.update(g, buf, lr=lrs[t], momentum=momentum)
        x += step
        prev, g = g, prev
    if average == "time":
        per_chain = {"grad_sq": acc["grad_sq"] / steps, "full_grad_sq": acc["full_grad_sq"] / steps,
                     "lag1": acc["lag1"] / (steps - 1)}
        acc = {k: v.mean(axis=0) for k, v in per_chain.items()}
        acc.update(n=int(steps), chain_means=per_chain)
    return acc
