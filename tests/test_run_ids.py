"""Run ids (experiments/runs/config.py): every field reaches the id, equal configs share one,
and the id of a fixed config is pinned (checked in a fresh interpreter, so it depends on
nothing but the config: not on dict order, hash seeds or what the test process imported)."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from experiments.runs.config import RunConfig, canonical_config, canonical_key, run_id

LINREG = dict(model="linear", data="linreg")

# one valid change per field (from the defaults, or from LINREG for the data/model args)
CHANGES = {
    "model": {"model": "linear"},
    "data": {"data": "mnist1d"},
    "opt": {"opt": "nag"},
    "lr": {"lr": 0.0500001},
    "momentum": {"momentum": 0.8},
    "weight_decay": {"weight_decay": 1e-4},
    "schedule": {"schedule": "cosine"},
    "warmup_steps": {"warmup_steps": 1},
    "step_every": {"step_every": 1},
    "step_gamma": {"step_gamma": 0.5},
    "final_lr_factor": {"final_lr_factor": 0.1},
    "steps": {"steps": 1001},
    "batch_size": {"batch_size": 0},
    "clip": {"clip": "global"},
    "clip_value": {"clip_value": 2.0},
    "line_search": {"line_search": True},
    "line_search_evals": {"line_search_evals": 11},
    "line_search_max": {"line_search_max": 2.0},
    "seed": {"seed": 1},
    "device": {"device": "cuda"},
    "probe_every": {"probe_every": 10},
    "probe_batch_size": {"probe_batch_size": 64},
    "hutchinson_samples": {"hutchinson_samples": 2},
    "noise_microbatches": {"noise_microbatches": 0},
    "eval_every": {"eval_every": 5},
    "per_tensor": {"per_tensor": True},
    "threads": {"threads": 1},
    "dtype": {"dtype": "float64"},
    "data_args": {"data_args": {"n_train": 100}},
    "model_args": {"model_args": {"hidden": [16]}},
    "probe_curvature": {"probe_curvature": True},
    "checkpoint_every": {"checkpoint_every": 10},
    "fork_from": {"fork_from": "0123456789abcdef@10"},
    "fork_data_seed": {"fork_from": "0123456789abcdef@10", "fork_data_seed": 1},
}


def test_the_change_table_covers_every_field():
    """A new RunConfig field must get a row here, so its reaching the id is tested."""
    assert set(CHANGES) == {f.name for f in dataclasses.fields(RunConfig)}


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_every_field_reaches_the_run_id(name):
    base = RunConfig()
    changed = RunConfig(**CHANGES[name])
    assert getattr(changed, name) != getattr(base, name)
    assert run_id(changed) != run_id(base), name
    # fields added late (LATE_DEFAULTS) are absent from the hash at their default
    assert canonical_config(changed)[name] != canonical_config(base).get(name, "absent")


@pytest.mark.parametrize("args", [{"dim": 6}, {"dim": 20}, {"noise_std": 0.2}, {"seed": 1},
                                  {"spectrum": "linear"}, {"spectrum": [1.0, 0.5]}])
def test_data_args_values_reach_the_run_id(args):
    dim = {"dim": 2} if isinstance(args.get("spectrum"), list) else {}
    with_args = RunConfig(**LINREG, data_args={**args, **dim})
    assert run_id(with_args) != run_id(RunConfig(**LINREG, data_args=dim))
    assert run_id(RunConfig(**LINREG, data_args={"dim": 6})) != run_id(RunConfig(**LINREG, data_args={"dim": 20}))


@pytest.mark.parametrize("a, b", [
    (dict(data_args={"dim": 2, "spectrum": [1, 2]}), dict(data_args={"dim": 2, "spectrum": [1.0, 2.0]})),
    (dict(data_args={"dim": 2, "spectrum": (1.0, 2)}), dict(data_args={"spectrum": [1, 2.0], "dim": 2})),
    (dict(data_args={"lam_max": 1, "noise_std": 0.5}), dict(data_args={"noise_std": 0.5, "lam_max": 1.0})),
    (dict(data_args={"lam_min": -0.0}), dict(data_args={"lam_min": 0})),
    (dict(lr=1), dict(lr=1.0)),
    (dict(weight_decay=-0.0), dict(weight_decay=0.0)),
    (dict(opt="gd", momentum=0.9), dict(opt="gd", momentum=0.0)),
])
def test_equal_configs_give_equal_ids(a, b):
    assert run_id(RunConfig(**LINREG, **a)) == run_id(RunConfig(**LINREG, **b))


@pytest.mark.parametrize("a, b", [
    (dict(data_args={"dim": 2, "spectrum": [1.0, 2.0]}), dict(data_args={"dim": 2, "spectrum": [1.0, 2.0000001]})),
    (dict(data_args={"dim": 2, "spectrum": [1.0, 2.0]}), dict(data_args={"dim": 2, "spectrum": [2.0, 1.0]})),
    (dict(data_args={"exact": True}), dict(data_args={"exact": 1})),
    (dict(data_args={"spectrum": "linear"}), dict(data_args={"spectrum": ["linear"]})),
])
def test_different_configs_give_different_ids(a, b):
    assert run_id(RunConfig(**LINREG, **a)) != run_id(RunConfig(**LINREG, **b))


def test_canonical_key_equal_numbers():
    assert canonical_key([1, 2]) == canonical_key([1.0, 2.0]) == "[1, 2]"
    assert canonical_key({"a": -0.0}) == canonical_key({"a": 0}) == '{"a": 0}'
    assert canonical_key(0.5) == "0.5" and canonical_key(True) == "true"
    assert canonical_key(2 ** 60) != canonical_key(2 ** 60 + 1)  # ints stay exact
    assert canonical_key(float("inf")) == '"inf"'
    assert canonical_key({"b": 1, "a": [2.0]}) == canonical_key({"a": [2], "b": 1.0}) == '{"a": [2], "b": 1}'
    with pytest.raises(TypeError, match=r"config value \{1, 2\} of type set has no canonical JSON form"):
        canonical_key({1, 2})


# ids pinned on this code (RESULT_FORMAT 1); a change here recomputes every stored run, so it
# must come with a RESULT_FORMAT bump or an explained canonicalisation change
GOLDEN = {
    "RunConfig()": "9bc6bac2555bef00",
    "RunConfig(model='linear', data='linreg', lr=0.5, data_args={'dim': 2, 'spectrum': [1, 0.5]})":
        "ef2ce7414b770871",
    "RunConfig(opt='gd', schedule='step', step_every=10, clip='layer', seed=3, model_args={'hidden': [8]})":
        "237afd46f04b7b64",
}


def test_golden_run_ids_in_a_fresh_interpreter():
    code = ("import json, sys\nfrom experiments.runs.config import RunConfig, run_id\n"
            "print(json.dumps({e: run_id(eval(e)) for e in json.loads(sys.argv[1])}))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(list(GOLDEN))], capture_output=True,
                         text=True, check=True, env=env, timeout=120)
    assert json.loads(out.stdout) == GOLDEN
    # and this process agrees (the id does not depend on the interpreter's state)
    assert {e: run_id(eval(e)) for e in GOLDEN} == GOLDEN
