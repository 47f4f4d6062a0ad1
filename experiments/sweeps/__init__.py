"""Sweeping: a TOML spec → run configs (:mod:`.spec`) → executors (:mod:`.runner`,
:mod:`.executors`) → the finished runs stacked into one Dataset (:mod:`.collect`)."""

from experiments.sweeps.collect import collect, tidy, to_table
from experiments.sweeps.runner import Plan, format_counts, plan, run_sweep
from experiments.sweeps.spec import SPECS_DIR, Spec, expand, load_spec, parse_spec

__all__ = ["SPECS_DIR", "Plan", "Spec", "collect", "expand", "format_counts", "load_spec", "parse_spec",
           "plan", "run_sweep", "tidy", "to_table"]
