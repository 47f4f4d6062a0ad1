"""Running: a :class:`RunConfig` → the training loop → a run directory (config, trace,
summary, DONE). Data sets, models and optimizers live beside the loop."""

from experiments.runs.config import RunConfig, run_id
from experiments.runs.loop import run, train

__all__ = ["RunConfig", "run", "run_id", "train"]
