"""The list of figures and the context they are made in."""

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

MODES = ("tiny", "quick", "full")

# One module per figure, in paper order; each defines FIGURE.
MODULES = [
    "phase_diagram",  # 1
    "modified_accuracy",  # 2
    "nqm",  # 3
    "seed_cnn",  # 4
    "oscillation",  # 5
    "link_scores",  # 6
    "sharpness_eos",  # 7
    "clipping",  # 8
    "central_flow",  # 9
    "whatif",  # 10
]


@dataclass(frozen=True)
class Context:
    """Where and how big: ``mode`` is "tiny" (tests, seconds), "quick" (``make figures``
    on a 2-core CPU) or "full" (paper scale, meant for a GPU). ``store`` is the run store
    that sweeps write to and read from, so only missing runs are computed."""

    mode: str = "quick"
    out: Path = Path("figures")
    store: Path = Path("store")
    device: str = "cpu"
    workers: int = 1

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is unknown; valid: {', '.join(MODES)}")
        if not (isinstance(self.workers, int) and self.workers >= 0):
            raise ValueError(f"workers={self.workers!r} is outside the valid range [0, inf) (0: in-process)")

    def check(self):
        """Before any figure is computed: the device exists here and ``out`` and ``store``
        are writable (ValueError naming the first that is not)."""
        from experiments.runs.loop import check_device
        from experiments.store import check_writable

        check_device(self.device)
        check_writable(self.out, "out", directory=True)
        check_writable(self.store, "store", directory=True)

    def pick(self, tiny, quick, full):
        """The setting for this mode."""
        return {"tiny": tiny, "quick": quick, "full": full}[self.mode]


@dataclass(frozen=True)
class Figure:
    name: str
    summary: str  # one sentence for the README gallery
    data: Callable[[Context], Any]
    plot: Callable[[Any, Context], Any]
    tags: tuple = field(default=())


def figures():
    """Name -> Figure for every registered module, in paper order."""
    found = {}
    for module in MODULES:
        fig = importlib.import_module(f"paper_figures.{module}").FIGURE
        found[fig.name] = fig
    return found
