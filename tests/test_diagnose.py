"""Each diagnose rule on a constructed trace that triggers it and one that does not."""

import numpy as np
import pytest
import xarray as xr

from dynamics.quadratic import stability_edge
from experiments.whatif.diagnose import diagnose, format_diagnosis, measured_corr, plot_diagnosis

STEPS, LAYERS, PROBES = 200, ["a", "b"], np.arange(0, 200, 20)
LR, BETA = 0.1, 0.9
EDGE = float(stability_edge("hb", BETA))  # 3.8


def trace(norm=1.0, cos=0.0, ratio=-3.0, abs_mean=None, h_edge=0.1, sharp=1.0, noise=1.0):
    """A trace of two layers; each argument is a scalar, a (step,) / (probe,) array or a dict
    {layer: value} for per-layer values."""
    def per_layer(v, n):
        cols = [v.get(la, 1.0) if isinstance(v, dict) else v for la in LAYERS]
        return np.stack([np.broadcast_to(np.asarray(c, float), (n,)) for c in cols], axis=1)

    g = per_layer(norm, STEPS)
    mean = g / 100 if abs_mean is None else per_layer(abs_mean, STEPS)
    ds = xr.Dataset({
        "grad_norm": (("step", "layer"), g), "grad_cos": (("step", "layer"), per_layer(cos, STEPS)),
        "update_ratio": (("step", "layer"), per_layer(ratio, STEPS)),
        "grad_abs_min": (("step", "layer"), mean / 10), "grad_abs_mean": (("step", "layer"), mean),
        "grad_abs_max": (("step", "layer"), mean * 10),
        "grad_norm_global": ("step", np.sqrt((g ** 2).sum(1))), "lr": ("step", np.full(STEPS, LR)),
        "sharpness_global": ("probe_step", np.broadcast_to(np.asarray(h_edge, float) * EDGE / LR,
                                                           (PROBES.size,)).copy()),
        "sharpness": (("probe_step", "layer"), per_layer(sharp, PROBES.size)),
        "grad_noise": (("probe_step", "layer"), per_layer(noise, PROBES.size)),
    }, coords={"step": np.arange(STEPS), "layer": LAYERS, "probe_step": PROBES})
    ds.attrs["config"] = {"opt": "hb", "momentum": BETA, "lr": LR}
    return ds


def rules(ds, layer="a", prefix="", **kw):
    return [f.rule for f in diagnose(ds, **kw).findings if f.layer == layer and f.rule.startswith(prefix)]


def test_ratio_bands():
    assert rules(trace(ratio=-1.5), prefix="ratio") == ["ratio.unstable"]
    assert rules(trace(ratio=-3.1), prefix="ratio") == ["ratio.healthy"]
    assert rules(trace(ratio=-4.5), prefix="ratio") == ["ratio.slow"]


def test_exploding_and_vanishing_gradients():
    rising = 0.1 * 10 ** (np.arange(STEPS) / STEPS * 4)  # a decade per 50 steps
    assert rules(trace(norm={"a": rising}), prefix="grad") == ["grad.exploding"]
    assert rules(trace(norm={"a": np.r_[np.ones(STEPS - 1), np.nan]}), prefix="grad") == ["grad.exploding"]
    assert rules(trace(abs_mean={"a": 1e-6, "b": 1e-2}), prefix="grad") == ["grad.vanishing"]
    assert rules(trace(abs_mean={"a": 1e-6, "b": 1e-2}), layer="b", prefix="grad") == ["grad.ok"]
    assert rules(trace(), prefix="grad") == ["grad.ok"]


def test_edge_bands():
    assert rules(trace(h_edge=0.95), prefix="edge") == ["edge.at"]
    assert rules(trace(h_edge=0.6), prefix="edge") == ["edge.near"]
    assert rules(trace(h_edge=0.1), prefix="edge") == ["edge.far"]


def test_oscillation_and_its_reason():
    d = diagnose(trace(cos=-0.5, h_edge=0.95))
    f = next(f for f in d.findings if f.layer == "a" and f.rule.startswith("osc"))
    assert f.rule == "osc.oscillating" and f.numbers["rho"] == pytest.approx(-0.5)
    assert f.numbers["rho_model_top_mode"] < -0.5 and "h/edge 0.95" in f.statement
    assert rules(trace(cos=0.5, h_edge=0.01), prefix="osc") == ["osc.persistent"]
    assert rules(trace(cos=0.0), prefix="osc") == ["osc.none"]


def test_measured_corr_is_the_norm_weighted_estimator():
    ds = trace(norm=np.r_[1.0, 2.0] .repeat(100), cos=-0.5).sel(layer="a")
    n = ds.grad_norm.values
    expect = np.sum(-0.5 * n[1:] * n[:-1]) / np.sqrt(np.sum(n[1:] ** 2) * np.sum(n[:-1] ** 2))
    assert measured_corr(ds) == pytest.approx(expect)


def test_norm_growth_and_its_cause():
    grow = np.r_[np.ones(STEPS - 25), np.full(25, 1.6)]  # late half of the last 50 steps higher
    rising = np.r_[np.ones(PROBES.size - 1), 3.0]  # the last probe (180) is in the late half
    assert rules(trace(norm=grow, noise={"a": rising}), prefix="growth") == ["growth.noise"]
    assert rules(trace(norm=grow, sharp={"a": rising}), prefix="growth") == ["growth.sharpness"]
    assert rules(trace(norm=grow, cos=-0.5, h_edge=0.7), prefix="growth") == ["growth.oscillation"]
    assert rules(trace(norm=grow), prefix="growth") == ["growth.unexplained"]
    assert rules(trace(), prefix="growth") == ["growth.none"]


def test_clipping_advice_global_vs_per_layer():
    ds = trace(norm={"a": 10.0, "b": 0.1})
    assert rules(ds, prefix="clip", clip=1.0) == ["clip.global_scales"]
    f = next(f for f in diagnose(ds, clip=1.0).findings if f.layer == "b" and f.rule.startswith("clip"))
    assert f.rule == "clip.global_other"
    g = 1 / np.sqrt(100 + 0.01)  # the global factor c/‖g‖
    assert f.numbers["global_mean_factor"] == pytest.approx(g) and f.numbers["layer_mean_factor"] == 1.0
    assert f.numbers["ratio_global"] == pytest.approx(-3.0 + np.log10(g))
    assert rules(ds, layer="b", prefix="clip", clip=100.0) == ["clip.none"]


def test_output_and_bad_input(tmp_path):
    d = diagnose(trace(ratio=-1.5))
    text = format_diagnosis(d)
    assert "[ratio.unstable] update:parameter ratio -1.50 > -2" in text
    assert plot_diagnosis(d, tmp_path / "d.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match=r"last=1 is outside the valid range \[2, 200\]"):
        diagnose(trace(), last=1)
    with pytest.raises(ValueError, match="clip=-1.0 is outside the valid range"):
        diagnose(trace(), clip=-1.0)
    early = diagnose(trace(ratio=np.r_[np.full(100, -1.5), np.full(100, -3.0)]), until=100)
    assert early.info["steps"] == 100 and "[ratio.unstable]" in format_diagnosis(early)
    with pytest.raises(ValueError, match=r"until=300 is outside the valid range \[2, 200\]"):
        diagnose(trace(), until=300)
