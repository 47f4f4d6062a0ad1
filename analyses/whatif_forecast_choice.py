"""The choice of the what-if curvature forecast (:mod:`experiments.whatif.curvature`) on the
development settings only (docs/findings/whatif.md): the forks of
``experiments/specs/whatif_seed_cnn.toml`` (HB 0.05 / 0.9, seed 0, step 400) and the seed
setting's norm growth after its step-1000 decay (``experiments/specs/seed_cnn.toml``'s run
lr 0.03, momentum 0.9, seed 0). Each candidate's scores, and the candidate the rule picks.
The rule, fixed before any candidate was scored: among the candidates whose correlation
Spearman on the development forks stays ≥ 0.7, the highest mean of the two development
settings' sign scores, one per setting: the forks' norm-change sign (the issue's target) and
the seed setting's fraction of layers whose growth has the right sign and a size within ×1.5
(the issue's seed target); ties go to the candidate with fewer parts on (the simpler model).
The earlier forecast (the run-level cap whether or not the run sits at its stochastic edge)
is scored for the record and not a candidate (its assumption is not checked).
Writes ``results/whatif_forecast_choice.json``:

    .venv/bin/python -m analyses whatif_forecast_choice     # ~5 CPU-minutes (the forks are in the store)
"""

import functools
from pathlib import Path

from analyses.whatif_scores import KEYS, ROOT, changes_for, seed_decay_growth
from experiments.runs.config import run_id
from experiments.store import atomic_write_json
from experiments.sweeps import SPECS_DIR, expand, load_spec, run_sweep
from experiments.whatif.check import check
from experiments.whatif.curvature import CurvatureForecast as CF
from experiments.whatif.predict import FORECAST, nqm_predictor

OUT = Path(__file__).resolve().parents[1] / "results" / "whatif_forecast_choice.json"
SPEARMAN_FLOOR = 0.7
RECORD_ONLY = "cap=run noise (earlier forecast)"


def candidates():
    """name -> CurvatureForecast (None: the curvature held fixed)."""
    return {"fixed": None,
            "cap=stochastic": CF(noise=False),
            "cap=stochastic noise": CF(),
            "cap=stochastic noise sharpening(flow, all)": CF(sharpening=True),
            "cap=stochastic noise sharpening(flow, last 3)": CF(sharpening=True, last=3),
            RECORD_ONLY: CF(level="run")}


def parts_on(forecast):
    if forecast is None:
        return 0
    return sum((forecast.cap, forecast.noise, forecast.sharpening))


def choose(rows, forecasts):
    """The rule of the module docstring over {name: {"dev": scores, "seed_right": float}}."""
    ok = [n for n in rows if n != RECORD_ONLY and rows[n]["dev"]["corr_spearman"] >= SPEARMAN_FLOOR]
    return max(ok, key=lambda n: (rows[n]["score"], -parts_on(forecasts[n])))


def main(argv=()):
    import torch

    torch.set_num_threads(1)
    spec = load_spec(SPECS_DIR / "whatif_seed_cnn.toml")
    run_sweep(spec, root=ROOT, workers=0, progress=False)
    (config,) = expand(spec)
    forecasts = candidates()
    predictors = {n: functools.partial(nqm_predictor, curvature=fc) for n, fc in forecasts.items()}
    seed = seed_decay_growth(predictors)
    rows = {}
    for name in forecasts:
        ds = check(ROOT / run_id(config), 400, changes_for(config), n_windows=2, predictor=predictors[name])
        dev = {k: ds.attrs["scores"]["model"][k] for k in KEYS}
        rows[name] = {"dev": dev, "seed": seed[name], "score": 0.5 * (dev["norm_sign"] + seed[name]["right"])}
        print(f"{name:50s} dev Spearman {dev['corr_spearman']:.3f} norm sign {dev['norm_sign']:.3f}; seed right "
              f"{seed[name]['right']:.3f} growth {min(seed[name]['predicted_growth']):.2f}-"
              f"{max(seed[name]['predicted_growth']):.2f}; score {rows[name]['score']:.3f}", flush=True)
    chosen = choose(rows, forecasts)
    out = {"command": "python -m analyses whatif_forecast_choice", "rule": __doc__.split("The rule")[1].split(
        "Writes")[0].strip(), "candidates": rows, "seed_measured_growth": seed["measured_growth"],
           "seed_measured_sharpness_rise": seed["measured_sharpness_rise"], "chosen": chosen,
           "chosen_is_the_default": forecasts[chosen] == FORECAST}
    atomic_write_json(OUT, out)
    print("seed measured growth", [round(g, 2) for g in seed["measured_growth"]])
    print("chosen:", chosen, "(the default FORECAST)" if out["chosen_is_the_default"] else "(NOT the default)")
    return 0
