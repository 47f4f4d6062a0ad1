"""The noisy quadratic model (docs/theory.md §4): stationary moments per eigen-mode
(:mod:`.stationary`), a layer as a spectrum of modes (:mod:`.layer`), the second moments run
through an lr schedule (:mod:`.schedule`), the Monte-Carlo simulator (:mod:`.montecarlo`) and
test problems (:mod:`.problems`)."""

from dynamics.nqm.layer import LayerSpectrum, layer_prediction
from dynamics.nqm.montecarlo import monte_carlo
from dynamics.nqm.schedule import schedule_prediction
from dynamics.nqm.stationary import (gradient_autocorrelation, lyapunov_covariance, stationary_gradient_moments,
                                     stationary_iterate_variance)

__all__ = ["LayerSpectrum", "gradient_autocorrelation", "layer_prediction", "lyapunov_covariance", "monte_carlo",
           "schedule_prediction", "stationary_gradient_moments", "stationary_iterate_variance"]
