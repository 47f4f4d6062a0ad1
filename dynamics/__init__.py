"""Analytic models of GD, heavy-ball and Nesterov: exact linear theory (:mod:`.quadratic`),
the noisy quadratic model (:mod:`.nqm`), modified-equation ODEs (:mod:`.modified`), their
symbolic derivations (:mod:`.symbolic`), central flows at the edge of stability
(:mod:`.central_flow`) and lr schedules (:mod:`.schedules`). Pure
numpy/scipy/sympy; the formulas and their sources are in docs/theory.md.

The public API::

    >>> from dynamics import spectral_radius, stability_edge
    >>> float(stability_edge("hb", 0.9))
    3.8
    >>> float(spectral_radius("hb", 1.0, 0.81))  # complex roots: |z| = sqrt(beta)
    0.9
"""

from dynamics.central_flow import predict as central_flow_predict
from dynamics.central_flow import solve_central_flow
from dynamics.methods import get_method
from dynamics.modified import global_error, solve_flow
from dynamics.nqm import (LayerSpectrum, gradient_autocorrelation, layer_prediction, monte_carlo,
                          schedule_prediction, stationary_gradient_moments)
from dynamics.quadratic import (char_roots, iteration_matrix, max_transient_gain, optimal_hyperparameters, regime,
                                simulate, spectral_radius, stability_edge)
from dynamics.schedules import lr_schedule

__all__ = ["LayerSpectrum", "central_flow_predict", "char_roots", "get_method", "global_error", "gradient_autocorrelation",
           "iteration_matrix", "layer_prediction", "lr_schedule", "max_transient_gain", "monte_carlo",
           "optimal_hyperparameters", "regime", "schedule_prediction", "simulate", "solve_central_flow", "solve_flow", "spectral_radius",
           "stability_edge", "stationary_gradient_moments"]
