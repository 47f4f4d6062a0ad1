"""Input validation shared by the analytic modules: every error names the parameter,
its value and the valid range (docs/design.md, conventions)."""

import numpy as np

METHODS = ("gd", "hb", "nag")


def check_method(method):
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; valid: {', '.join(METHODS)}")
    return method


def as_float(name, value):
    """``value`` as a float array; a ValueError naming ``name`` if it is not numeric."""
    try:
        return np.asarray(value, dtype=float)
    except (ValueError, TypeError):
        raise ValueError(f"{name}={value!r} is not a number or an array of numbers") from None


def _show(value):
    arr = np.asarray(value)
    if arr.size == 1:
        return arr.item()
    return f"array with {arr.size} values in [{arr.min():g}, {arr.max():g}]"


def check_momentum(momentum):
    m = as_float("momentum", momentum)
    if not np.all((m >= 0) & (m < 1)):
        bad = m[~((m >= 0) & (m < 1))]
        raise ValueError(f"momentum={_show(bad)} is outside the valid range [0, 1)")
    return m


def check_positive(name, value, allow_zero=False):
    v = as_float(name, value)
    ok = (v >= 0) if allow_zero else (v > 0)
    ok &= np.isfinite(v)
    if not np.all(ok):
        bound = "[0, inf)" if allow_zero else "(0, inf)"
        raise ValueError(f"{name}={_show(v[~ok])} is outside the valid range {bound}")
    return v


def broadcast(**arrays):
    """Broadcast named arrays together; a shape mismatch names the parameters."""
    try:
        out = np.broadcast_arrays(*[as_float(k, a) for k, a in arrays.items()])
    except ValueError:
        shapes = ", ".join(f"{k}{np.shape(v)}" for k, v in arrays.items())
        raise ValueError(f"shapes do not broadcast: {shapes}") from None
    return out
