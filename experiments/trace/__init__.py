"""Measuring: the every-step per-layer :class:`Tracer` and the curvature/noise probes it runs."""

from experiments.trace.tracer import Tracer

__all__ = ["Tracer"]
