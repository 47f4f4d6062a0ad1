"""Analytic models of GD, heavy-ball and Nesterov: exact linear theory, the noisy quadratic
model, modified-equation ODEs and their symbolic derivations. Pure numpy/scipy/sympy."""
