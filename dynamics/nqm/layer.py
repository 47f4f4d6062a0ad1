r"""Layer model of the NQM: a layer is a Hessian spectrum plus a noise level per mode, and its
predicted successive-gradient correlation and gradient norm are sums over modes of the
per-mode stationary moments of :mod:`dynamics.nqm.stationary` (docs/theory.md §4).

Assumptions (what a prediction from this module takes for granted):

1. Near a minimum the layer's loss is quadratic with Hessian block H (the layer's diagonal
   block; cross-layer coupling is ignored) and the mini-batch gradient is
   :math:`g = Hx + \xi` with ξ independent across steps and independent of x.
2. The noise covariance Σ commutes with H (shares its eigenvectors), so the layer splits
   into independent modes :math:`(\lambda_i, \sigma_i^2)`. Two noise models fix
   :math:`\sigma_i^2` from the total :math:`\mathrm{tr}\,\Sigma` (``noise_total``, what the
   tracer's ``grad_noise`` measures):

   - ``"additive"``: isotropic, :math:`\sigma_i^2 = \mathrm{tr}\Sigma / n`;
   - ``"curvature"``: :math:`\sigma_i^2 = \mathrm{tr}\Sigma\,\lambda_i / \mathrm{tr} H`, i.e.
     :math:`\Sigma \propto H`, as for a mean-squared-error or cross-entropy loss near a
     minimum where the gradient covariance is close to the Fisher ≈ Hessian (per batch).
   - or an explicit array of relative per-mode weights (e.g. :math:`\lambda_i^2` for the
     DeepOBS data-shift noise of :mod:`dynamics.nqm.problems`).
3. The dynamics are stationary: lr, momentum, spectrum and noise change slowly compared with
   the mixing time of the slowest mode that matters (use
   :func:`dynamics.nqm.schedule.schedule_prediction` when they do not).
4. A trace's per-step cosine of successive gradients is compared with
   :math:`E[g_t\cdot g_{t+1}] / E\|g\|^2`. This equals :math:`E[\cos]` up to
   :math:`O(1/d_{\rm eff})` with :math:`d_{\rm eff} = (\sum_i E g_i^2)^2 / \sum_i (E g_i^2)^2`
   (the effective number of modes): :math:`\|g\|^2` concentrates when many modes carry
   comparable energy. ``effective_dim`` is returned so the caller can see when it does not.

A spectrum from a summary (top eigenvalue, trace, size) needs a shape; two are offered:

- ``"power"``: :math:`\lambda_i = \lambda_{max}\, i^{-p}`, i = 1..n, with p >= 0 fitted so
  that :math:`\sum_i \lambda_i = \mathrm{tr}\,H` (heavy-tailed spectra as reported for deep
  networks: Sagun et al. 2017, Papyan 2019). Large n is represented by the first indices
  exactly plus log-spaced index bins (eigenvalue = the bin's mean, weight = its size), so
  the trace is matched exactly and a layer of 10^7 parameters costs a few hundred modes.
- ``"two-level"``: one outlier :math:`\lambda_{max}` plus a flat bulk of n-1 modes at
  :math:`(\mathrm{tr}H - \lambda_{max})/(n-1)`.
"""

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.optimize

from dynamics._checks import broadcast, check_momentum, check_positive
from dynamics.methods import get_method
from dynamics.nqm.stationary import mode_factors
from dynamics.quadratic import stability_edge

__all__ = ["LayerPrediction", "LayerSpectrum", "layer_prediction", "NOISE_MODELS", "SHAPES"]

NOISE_MODELS = ("additive", "curvature")
SHAPES = ("power", "two-level")
ON_UNSTABLE = ("raise", "nan", "exclude")


def _index_bins(n, max_modes):
    """Lower/upper (exclusive) index edges covering 1..n: exact head, log-spaced tail."""
    if n <= max_modes:
        lo = np.arange(1, n + 1, dtype=float)
        return lo, lo + 1
    head = max_modes // 2
    edges = np.unique(np.round(np.geomspace(head + 1, n + 1, max_modes - head + 1)))
    lo = np.concatenate([np.arange(1, head + 1), edges[:-1]]).astype(float)
    hi = np.concatenate([np.arange(2, head + 2), edges[1:]]).astype(float)
    return lo, hi


def _power_bin_means(lo, hi, p):
    """Mean of i^-p over integer bins [lo, hi): exact for width-1 bins, otherwise the
    midpoint-rule integral over [lo-1/2, hi-1/2] (relative error O(p² / lo²))."""
    single = hi - lo == 1
    a, b = lo - 0.5, hi - 0.5
    if abs(1 - p) < 1e-9:
        integral = np.log(b / a)
    else:
        integral = (b ** (1 - p) - a ** (1 - p)) / (1 - p)
    return np.where(single, lo ** (-p), integral / (hi - lo))


@dataclass(frozen=True, eq=False)
class LayerSpectrum:
    """Eigenvalues (>= 0) of a layer's Hessian block with multiplicities ``weights``
    (default 1 each; they sum to the number of parameters). Build from explicit eigenvalues
    ``LayerSpectrum(eigs)`` or from a summary with :meth:`from_summary`."""

    eigenvalues: np.ndarray
    weights: np.ndarray = None
    shape: str = "explicit"
    exponent: float = float("nan")  # the fitted p of the "power" shape

    def __post_init__(self):
        eig = np.atleast_1d(check_positive("eigenvalues", self.eigenvalues, allow_zero=True))
        if eig.ndim != 1 or eig.size == 0:
            raise ValueError(f"eigenvalues must be a non-empty 1-D array, got shape {eig.shape}")
        w = np.ones_like(eig) if self.weights is None else np.atleast_1d(
            check_positive("weights", self.weights, allow_zero=True))
        if w.shape != eig.shape:
            raise ValueError(f"weights shape {w.shape} != eigenvalues shape {eig.shape}")
        object.__setattr__(self, "eigenvalues", eig)
        object.__setattr__(self, "weights", w)

    @property
    def n_params(self):
        return float(self.weights.sum())

    @property
    def trace(self):
        return float(self.weights @ self.eigenvalues)

    @property
    def lam_max(self):
        return float(self.eigenvalues[self.weights > 0].max())

    @classmethod
    def from_summary(cls, lam_max, trace, n_params, shape="power", max_modes=400,
                     clip_trace=False):
        """A spectrum with the given top eigenvalue, trace and size (see the module doc for
        the shapes). Needs lam_max <= trace <= n_params * lam_max; ``clip_trace=True`` clips a
        measured trace into that range instead of raising (Hutchinson estimates are noisy)."""
        lam_max = float(check_positive("lam_max", lam_max))
        n = int(check_positive("n_params", n_params))
        if n != n_params:
            raise ValueError(f"n_params={n_params!r} is outside the valid range: integers >= 1")
        trace = float(trace)
        lo_t, hi_t = lam_max, n * lam_max
        if clip_trace:
            trace = min(max(trace, lo_t), hi_t)
        if not (lo_t * (1 - 1e-12) <= trace <= hi_t * (1 + 1e-12)):
            raise ValueError(f"trace={trace:g} is outside the valid range [lam_max, "
                             f"n_params*lam_max] = [{lo_t:g}, {hi_t:g}]")
        if shape == "two-level":
            if n == 1:
                return cls(np.array([lam_max]), shape=shape)
            bulk = max(trace - lam_max, 0.0) / (n - 1)
            return cls(np.array([lam_max, bulk]), np.array([1.0, n - 1.0]), shape=shape)
        if shape != "power":
            raise ValueError(f"shape={shape!r} is unknown; valid: {', '.join(SHAPES)}")
        lo, hi = _index_bins(n, int(max_modes))
        w = hi - lo
        ratio = trace / lam_max

        def excess(p):
            return w @ _power_bin_means(lo, hi, p) - ratio

        if excess(0.0) <= 0:
            p = 0.0
        else:
            p_hi = 1.0
            while excess(p_hi) > 0 and p_hi < 1e3:
                p_hi *= 2
            p = scipy.optimize.brentq(excess, 0.0, p_hi, xtol=1e-14, rtol=1e-14) \
                if excess(p_hi) < 0 else p_hi
        return cls(lam_max * _power_bin_means(lo, hi, p), w, shape=shape, exponent=p)

    def noise_per_mode(self, noise_total, noise_model="additive"):
        """σ_i² of one eigen-direction in each bin, so that Σ_i weights_i σ_i² = noise_total.
        Broadcasts ``noise_total`` (shape S) to S + (modes,)."""
        total = check_positive("noise_total", noise_total, allow_zero=True)[..., None]
        if isinstance(noise_model, str):
            if noise_model == "additive":
                rel = np.ones_like(self.eigenvalues)
            elif noise_model == "curvature":
                rel = self.eigenvalues.copy()
            else:
                raise ValueError(f"noise_model={noise_model!r} is unknown; valid: "
                                 f"{', '.join(NOISE_MODELS)} or an array of per-mode weights")
        else:
            rel = np.broadcast_to(check_positive("noise_model", noise_model, allow_zero=True),
                                  self.eigenvalues.shape)
        norm = self.weights @ rel
        if norm <= 0:
            raise ValueError(f"noise_model={noise_model!r} puts no noise on any mode of this "
                             f"spectrum (trace {self.trace:g})")
        return total * rel / norm


class LayerPrediction(NamedTuple):
    """One layer's predicted stationary gradient statistics (see :func:`layer_prediction`)."""

    grad_corr: np.ndarray
    grad_sq_norm: np.ndarray
    full_grad_sq_norm: np.ndarray
    lag1: np.ndarray
    effective_dim: np.ndarray
    n_unstable: np.ndarray
    eigenvalues: np.ndarray
    weights: np.ndarray
    h: np.ndarray
    sigma2: np.ndarray
    mode_grad_sq: np.ndarray
    mode_lag1: np.ndarray
    mode_corr: np.ndarray
    unstable: np.ndarray


def layer_prediction(method, lr, momentum, spectrum, noise_total, noise_model="additive",
                     on_unstable="raise"):
    r"""Predicted stationary gradient oscillation and norm of one layer.

    ``lr``, ``momentum`` and ``noise_total`` broadcast together (shape S, e.g. one per
    logged step); per-mode arrays have shape S + (modes,). Returns a :class:`LayerPrediction`:

    - ``grad_corr`` = Σ_i w_i E[g_t g_{t+1}]_i / Σ_i w_i E g_i² (the trace's successive-gradient
      cosine, see assumption 4), ``grad_sq_norm`` = E‖g‖², ``full_grad_sq_norm`` = E‖Hx‖²,
      ``lag1`` = E[g_t·g_{t+1}], ``effective_dim`` (shape S);
    - per mode: ``h``, ``sigma2``, ``mode_grad_sq``, ``mode_lag1``, ``mode_corr``, ``unstable``
      (bool), plus ``eigenvalues``, ``weights`` and ``n_unstable`` (weighted count, shape S).

    Modes with h = lr·λ at or beyond the stability edge have no stationary state.
    ``on_unstable``: ``"raise"`` (ValueError naming the modes), ``"nan"`` (those modes'
    values and the layer aggregates are NaN where any mode is unstable — the layer then
    diverges: its norm grows like ρ(T)^t and, because past the edge the dominant root is real
    and negative for all three methods, its successive-gradient correlation tends to -1), or
    ``"exclude"`` (aggregate over the stable modes only; ``n_unstable`` tells how many were
    left out).
    """
    if on_unstable not in ON_UNSTABLE:
        raise ValueError(f"on_unstable={on_unstable!r} is unknown; valid: {', '.join(ON_UNSTABLE)}")
    if not isinstance(spectrum, LayerSpectrum):
        spectrum = LayerSpectrum(spectrum)
    m = get_method(method)
    lr, momentum, noise_total = broadcast(lr=check_positive("lr", lr),
                                          momentum=check_momentum(momentum),
                                          noise_total=noise_total)
    sigma2 = spectrum.noise_per_mode(noise_total, noise_model)
    lam, w = spectrum.eigenvalues, spectrum.weights
    h = lr[..., None] * lam
    beta = np.broadcast_to(momentum[..., None], h.shape)
    edge = stability_edge(m, beta)
    unstable = (h >= edge) & (w > 0)
    if on_unstable == "raise" and np.any(unstable):
        bad = np.argwhere(unstable)[:8]
        shown = ", ".join(f"lam={lam[i[-1]]:.4g} (h={h[tuple(i)]:.4g} >= {edge[tuple(i)]:.4g})"
                          for i in bad)
        raise ValueError(f"the dynamics diverge for {int(unstable.sum())} mode(s) of this layer "
                         f"under {m.name!r}: {shown}; pass on_unstable='nan' or 'exclude' for "
                         f"a non-raising prediction")
    v, rho = mode_factors(m, np.where(unstable, 0.0, h), beta)
    grad_sq = sigma2 * (1 + v)
    lag1 = rho * grad_sq
    nan = np.where(unstable, np.nan, 1.0)
    keep = np.where(unstable, 0.0, w)
    total_sq = np.einsum("...i,...i->...", grad_sq, keep)
    total_lag = np.einsum("...i,...i->...", lag1, keep)
    total_full = np.einsum("...i,...i->...", sigma2 * v, keep)
    eff = total_sq**2 / np.einsum("...i,...i->...", grad_sq**2, keep)
    n_unstable = np.einsum("...i,...i->...", unstable.astype(float), w)
    if on_unstable == "nan":
        any_bad = np.where(n_unstable > 0, np.nan, 1.0)
        total_sq, total_lag, total_full, eff = (a * any_bad for a in
                                                (total_sq, total_lag, total_full, eff))
    return LayerPrediction(grad_corr=total_lag / total_sq, grad_sq_norm=total_sq, full_grad_sq_norm=total_full,
                           lag1=total_lag, effective_dim=eff, n_unstable=n_unstable, eigenvalues=lam, weights=w,
                           h=h, sigma2=sigma2, mode_grad_sq=grad_sq * nan, mode_lag1=lag1 * nan,
                           mode_corr=rho * nan, unstable=unstable)
