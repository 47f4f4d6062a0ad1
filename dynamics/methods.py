r"""GD, heavy-ball and Nesterov as small objects over an explicit state (optax-style).

Convention: PyTorch's ``torch.optim.SGD`` with dampening 0 (docs/theory.md §1). With gradient
:math:`g_k` taken at the iterate :math:`x_k`, learning rate :math:`\alpha` and momentum
:math:`\beta`, the momentum buffer is :math:`b_k = \beta b_{k-1} + g_k` (:math:`b_0 = 0`,
so :math:`b_1 = g_1` as in PyTorch) and

- GD:  :math:`x_{k+1} = x_k - \alpha g_k`
- HB:  :math:`x_{k+1} = x_k - \alpha b_k`
- NAG: :math:`x_{k+1} = x_k - \alpha (g_k + \beta b_k)`

On :math:`f(x) = \lambda x^2/2` with :math:`h = \alpha\lambda`, the iterates obey
:math:`x_{k+1} = c_1 x_k - c_0 x_{k-1}`, with the characteristic polynomial
:math:`z^2 - c_1 z + c_0`:

- GD:  :math:`c_1 = 1-h`, :math:`c_0 = 0`
- HB:  :math:`c_1 = 1+\beta-h`, :math:`c_0 = \beta`
- NAG: :math:`c_1 = (1+\beta)(1-h)`, :math:`c_0 = \beta(1-h)`

The simulator (:func:`dynamics.quadratic.simulate`) and the linear theory both read the
rule from here, so they cannot drift apart.

Example::

    >>> import numpy as np
    >>> from dynamics.methods import get_method
    >>> hb = get_method("hb")
    >>> x, buf = np.array([1.0]), hb.init(np.array([1.0]))
    >>> step, buf = hb.update(2.0 * x, buf, lr=0.1, momentum=0.9)
    >>> x + step
    array([0.8])

References: Polyak (1964) for heavy ball; Nesterov (1983); Sutskever et al. (2013) for
the look-ahead form whose iterate PyTorch's Nesterov iterate equals (docs/theory.md §1).
"""

from dataclasses import dataclass

import numpy as np

from dynamics._checks import check_method


@dataclass(frozen=True)
class Method:
    """One update rule. ``name`` is "gd", "hb" or "nag"; ``label`` is for plots."""

    name: str
    label: str

    @property
    def has_momentum(self):
        return self.name != "gd"

    @property
    def nesterov(self):
        return self.name == "nag"

    def init(self, params):
        """State: the momentum buffer b_0 = 0, shaped like the parameters."""
        return np.zeros_like(params)

    def update(self, grads, buf, lr, momentum):
        """Return (step, new_buf); the new iterate is ``params + step``.

        ``momentum`` is ignored by GD. Works elementwise on numpy arrays and on torch
        tensors alike, with any broadcastable lr and momentum.
        """
        if not self.has_momentum:
            return -lr * grads, buf
        buf = momentum * buf + grads
        direction = grads + momentum * buf if self.nesterov else buf
        return -lr * direction, buf

    def char_coeffs(self, h, momentum):
        """(c1, c0) of the characteristic polynomial z^2 - c1 z + c0, broadcast."""
        h = np.asarray(h, dtype=float)
        b = np.asarray(momentum, dtype=float)
        shape = np.broadcast_shapes(h.shape, b.shape)
        if self.name == "gd":  # read-only broadcast views where no arithmetic is needed
            return np.broadcast_to(1.0 - h, shape), np.broadcast_to(0.0, shape)
        if self.name == "hb":
            return np.broadcast_to(1.0 + b - h, shape), np.broadcast_to(b, shape)
        return np.broadcast_to((1.0 + b) * (1.0 - h), shape), np.broadcast_to(b * (1.0 - h), shape)

    def torch_kwargs(self, lr, momentum):
        """Keyword arguments for ``torch.optim.SGD`` that run this method."""
        if not self.has_momentum:
            return {"lr": lr, "momentum": 0.0, "nesterov": False}
        # torch refuses nesterov=True with momentum 0; NAG with beta = 0 is GD anyway.
        return {"lr": lr, "momentum": momentum, "nesterov": self.nesterov and momentum > 0}


GD = Method("gd", "GD")
HB = Method("hb", "heavy ball")
NAG = Method("nag", "Nesterov")
METHODS = {m.name: m for m in (GD, HB, NAG)}


def get_method(method):
    """The :class:`Method` for a name ("gd", "hb", "nag") or a Method itself."""
    if isinstance(method, Method):
        return method
    return METHODS[check_method(method)]
