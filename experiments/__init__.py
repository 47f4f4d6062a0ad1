"""Real networks trained with PyTorch, per-layer traces, sweeps, and the link to theory."""

from experiments.store import load_run

__all__ = ["load_run"]
