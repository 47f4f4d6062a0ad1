"""Input validation shared by the analytic modules: every error names the parameter,
its value and the valid range (docs/design.md, conventions)."""

import numpy as np

METHODS = ("gd", "hb", "nag")


def check_method(method):
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; valid: {', '.join(METHODS)}")
    return method


def _show(value):
    arr = np.asarray(value)
    if arr.size == 1:
        return arr.item()
    return f"array with {arr.size} values in [{arr.min():g}, {arr.max():g}]"


def check_momentum(momentum):
    m = np.asarray(momentum, dtype=float)
    if not np.all((m >= 0) & (m < 1)):
        bad = m[~((m >= 0) & (m < 1))]
        raise ValueError(f"momentum={_show(bad)} is outside the valid range [0, 1)")
    return m


def check_positive(name, value, allow_zero=False):
    v = np.asarray(value, dtype=float)
    ok = (v >= 0) if allow_zero else (v > 0)
    ok &= np.isfinite(v)
    if not np.all(ok):
        bound = "[0, inf)" if allow_zero else "(0, inf)"
        raise ValueError(f"{name}={_show(v[~ok])} is outside the valid range {bound}")
    return v


def broadcast(**arrays):
    """Broadcast named arrays together; a shape mismatch names the parameters."""
    try:
        out = np.broadcast_arrays(*[np.asarray(a, dtype=float) for a in arrays.values()])
    except ValueError:
        shapes = ", ".join(f"{k}{np.shape(v)}" for k, v in arrays.items())
        raise ValueError(f"shapes do not broadcast: {shapes}") from None
    return out
