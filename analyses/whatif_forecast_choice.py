"""The choice of the what-if curvature forecast (:mod:`experiments.whatif.curvature`) on the
development setting only (``experiments/specs/whatif_seed_cnn.toml``, HB 0.05 / 0.9, seed 0,
step 400; docs/findings/whatif.md): each candidate's scores over the forks there, and the
candidate the rule picks. The rule, fixed before the evaluation settings were scored: the
highest norm-change sign score (the issue's target) among the candidates whose correlation
Spearman stays ≥ 0.7; ties go to the candidate with fewer parts on (the simpler model).
Writes ``results/whatif_forecast_choice.json``:

    .venv/bin/python -m analyses whatif_forecast_choice     # ~2 CPU-minutes (the forks are in the store)
"""

import functools
from pathlib import Path

from analyses.whatif_scores import KEYS, ROOT, changes_for
from experiments.runs.config import run_id
from experiments.store import atomic_write_json
from experiments.sweeps import SPECS_DIR, expand, load_spec, run_sweep
from experiments.whatif.check import check
from experiments.whatif.curvature import CurvatureForecast as CF
from experiments.whatif.predict import FORECAST, nqm_predictor

OUT = Path(__file__).resolve().parents[1] / "results" / "whatif_forecast_choice.json"
SPEARMAN_FLOOR = 0.7


def candidates():
    """name -> CurvatureForecast (None: the curvature held fixed)."""
    out = {"fixed": None}
    for level in ("edge", "run"):
        for noise in (False, True):
            out[f"cap={level} noise={noise}"] = CF(level=level, noise=noise)
    for below, last in ((0.5, 0), (0.5, 3), (0.25, 2)):
        out[f"cap=run noise=True sharpening(below={below}, last={last})"] = CF(sharpening=True, below=below, last=last)
    return out


def parts_on(forecast):
    if forecast is None:
        return 0
    return sum((forecast.cap, forecast.noise, forecast.sharpening))


def choose(rows, forecasts):
    """The rule of the module docstring over {name: scores}."""
    ok = [n for n in rows if rows[n]["corr_spearman"] >= SPEARMAN_FLOOR]
    return max(ok, key=lambda n: (rows[n]["norm_sign"], -parts_on(forecasts[n])))


def main(argv=()):
    import torch

    torch.set_num_threads(1)
    spec = load_spec(SPECS_DIR / "whatif_seed_cnn.toml")
    run_sweep(spec, root=ROOT, workers=0, progress=False)
    (config,) = expand(spec)
    forecasts = candidates()
    rows = {}
    for name, fc in forecasts.items():
        ds = check(ROOT / run_id(config), 400, changes_for(config), n_windows=2,
                   predictor=functools.partial(nqm_predictor, curvature=fc))
        rows[name] = {k: ds.attrs["scores"]["model"][k] for k in KEYS}
        print(f"{name:60s} Spearman {rows[name]['corr_spearman']:.3f} norm sign {rows[name]['norm_sign']:.3f}",
              flush=True)
    chosen = choose(rows, forecasts)
    out = {"command": "python -m analyses whatif_forecast_choice", "rule": __doc__.split("The rule")[1].split(
        "Writes")[0].strip(), "candidates": rows, "chosen": chosen,
           "chosen_is_the_default": forecasts[chosen] == FORECAST}
    atomic_write_json(OUT, out)
    print("chosen:", chosen, "(the default FORECAST)" if out["chosen_is_the_default"] else "(NOT the default)")
    return 0
