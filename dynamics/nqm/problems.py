r"""Ready noisy quadratic test problems with known spectra.

``quadratic_deep`` follows DeepOBS (Schneider, Balles, Hennig, ICLR 2019; docs/theory.md §6):
loss :math:`\tfrac12 (\theta - x)^\top Q (\theta - x)` averaged over a batch of data
:math:`x \sim N(0, s^2 I)` (``noise_level`` s = 0.6), 100 dimensions, 90 eigenvalues of Q
~ U(0, 1) and 10 ~ U(30, 60), a Haar-random rotation, :math:`\theta_0 = (1, \dots, 1)`.
The mini-batch gradient is :math:`Q\theta - Q\bar x`: the NQM with H = Q and
:math:`\Sigma = s^2 Q^2 / B` (B = batch size; infinite-data idealisation of DeepOBS's
1000-point training set), so Σ commutes with H and the per-mode theory applies with
:math:`\sigma_i^2 = s^2\lambda_i^2/B`. Same distribution as DeepOBS, not the same draw
(we use numpy's Generator and scipy's Haar sampler).
"""

from dataclasses import dataclass

import numpy as np
import scipy.stats

__all__ = ["QuadraticProblem", "quadratic_deep"]


@dataclass(frozen=True, eq=False)
class QuadraticProblem:
    """H = V diag(eigenvalues) V^T, noise covariance Σ = V diag(noise_eigenvalues) V^T,
    start x0 (distance from the minimum at 0)."""

    name: str
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    noise_eigenvalues: np.ndarray
    x0: np.ndarray

    @property
    def hessian(self):
        V = self.eigenvectors
        return (V * self.eigenvalues) @ V.T

    @property
    def noise_cov(self):
        V = self.eigenvectors
        return (V * self.noise_eigenvalues) @ V.T

    @property
    def x0_modes(self):
        """The start in the eigenbasis (per-mode x0)."""
        return self.eigenvectors.T @ self.x0

    def layer_spectrum(self):
        """The problem as a one-layer :class:`dynamics.nqm.layer.LayerSpectrum`; pass
        ``noise_model=problem.noise_eigenvalues`` and ``noise_total=problem.noise_eigenvalues.sum()``
        to :func:`dynamics.nqm.layer.layer_prediction` for its exact noise."""
        from dynamics.nqm.layer import LayerSpectrum

        return LayerSpectrum(self.eigenvalues)


def quadratic_deep(batch_size=128, noise_level=0.6, dim=100, seed=42):
    """The DeepOBS ``quadratic_deep`` problem (module doc): 90% of eigenvalues ~ U(0, 1),
    10% ~ U(30, 60), seeded Haar rotation, Σ = noise_level² H² / batch_size."""
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is outside the valid range: integers >= 1")
    if int(dim) != dim or dim < 10:
        raise ValueError(f"dim={dim!r} is outside the valid range: integers >= 10")
    rng = np.random.default_rng(seed)
    n_top = int(dim) // 10
    lam = np.concatenate([rng.uniform(0.0, 1.0, int(dim) - n_top), rng.uniform(30.0, 60.0, n_top)])
    V = scipy.stats.special_ortho_group.rvs(int(dim), random_state=rng)
    return QuadraticProblem("quadratic_deep", lam, V, noise_level**2 * lam**2 / batch_size,
                            np.ones(int(dim)))
