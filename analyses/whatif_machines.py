"""The sixteenth round's choice on this machine's trajectories (issue 15; docs/findings/whatif.md,
"Seventeenth round", 1).

Training runs depend on the instruction set torch's CPU kernels dispatch to
(docs/findings/faults.md, "Instruction set and results"), so a store made on another machine is
another draw of every run. This recomputes, on this machine's store and data order 0, each named
development group's pooled scores of the former default (``bulk_trend_blend_small_loss``) and of
the predictor in use (``bulk_mix_power_held``), their group terms
(:func:`analyses.whatif_forecast_choice.group_term`) and the difference d, beside the same from
``results/whatif_forecast_choice.json`` (the sixteenth round's machine), and the former default's
scores beside those stored in ``results/whatif_scores.json``. Writes ``results/whatif_machines.json``
(groups named again replace their entries):

    .venv/bin/python -m analyses whatif_machines development evaluation_3   # ~4 min a seed-CNN group
"""

import json
from pathlib import Path

import numpy as np
import torch

from analyses import whatif_scores as ws
from analyses.whatif_forecast_choice import GROUPS, group_term
from analyses.whatif_forecast_choice import OUT as CHOICE
from experiments.runs.loop import versions
from experiments.store import atomic_write_json, read_json
from experiments.whatif.predict import BASES, PREDICTOR

OUT = Path(__file__).resolve().parents[1] / "results" / "whatif_machines.json"
FORMER, IN_USE = "bulk_trend_blend_small_loss", "bulk_mix_power_held"


def group_scores(group):
    """{FORMER, IN_USE: pooled scores} of ``group``'s checks on this machine's store, order 0."""
    _, pooled = ws.score_setting(*ws.GROUPS[group], variants={FORMER: BASES["bulk-trend-blend"], IN_USE: PREDICTOR})
    return {name: pooled[name] for name in (FORMER, IN_USE)}


def compare(here, stored):
    """d = term(in use) − term(former) from {name: scores} of two stores, and the former's terms."""
    term = {src: {n: group_term(s[n]) for n in (FORMER, IN_USE)} for src, s in (("here", here), ("stored", stored))}
    return {"d_here": term["here"][IN_USE] - term["here"][FORMER],
            "d_stored": term["stored"][IN_USE] - term["stored"][FORMER],
            "former_term_here": term["here"][FORMER], "former_term_stored": term["stored"][FORMER]}


def summary(groups):
    """Mean d and its standard error over the groups, on each store."""
    out = {}
    for src in ("here", "stored"):
        d = np.array([g[f"d_{src}"] for g in groups.values()])
        out[src] = {"mean_d": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else None}
    return {"groups": len(groups), **out}


def main(argv=()):
    bad = [g for g in argv if g not in GROUPS]
    if not argv or bad:
        raise ValueError(f"groups={list(argv)}: name one or more of the development groups {list(GROUPS)}")
    torch.set_num_threads(1)
    choice = read_json(CHOICE)["candidates"]
    scores = read_json(ws.OUT)
    out = read_json(OUT) if OUT.exists() else {"groups": {}}
    out.update(command="python -m analyses whatif_machines GROUP...",
               environment={"cpu_capability": torch.backends.cpu.get_cpu_capability(), **versions()})
    for group in argv:
        here = group_scores(group)
        stored = {n: choice[n]["groups"]["0"][group] for n in (FORMER, IN_USE)}
        out["groups"][group] = {"here": here, **compare(here, stored),
                                "former_stored_in_whatif_scores": scores[group]["pooled"].get(FORMER)}
        print(group, json.dumps({k: round(v, 4) for k, v in compare(here, stored).items()}), flush=True)
    out["summary"] = summary(out["groups"])
    atomic_write_json(OUT, out)
    print(json.dumps(out["summary"]))
    return 0
