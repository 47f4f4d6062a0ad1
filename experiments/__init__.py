"""Real networks trained with PyTorch, per-layer traces, sweeps, and the link to theory.

The stages, one subpackage each: :mod:`experiments.runs` (config, training loop, data,
models, optimizers), :mod:`experiments.trace` (the tracer and its probes),
:mod:`experiments.sweeps` (specs, executors, collect) and :mod:`experiments.linking`
(predictions, scores, reports); :mod:`experiments.store` is the run directory on disk and
:mod:`experiments.cli` the ``optdyn`` command.

The public API::

    from experiments import RunConfig, Tracer, collect, link, load_run, run, run_sweep, train
"""

from experiments.linking import link
from experiments.runs import RunConfig, run, train
from experiments.store import load_run
from experiments.sweeps import collect, run_sweep
from experiments.trace import Tracer

__all__ = ["RunConfig", "Tracer", "collect", "link", "load_run", "run", "run_sweep", "train"]
