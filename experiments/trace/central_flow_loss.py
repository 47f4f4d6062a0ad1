r"""A torch model on a fixed full batch as the loss object of :mod:`dynamics.central_flow`.

:class:`NetworkLoss` flattens the model's parameters into one float64 vector w and answers,
with ``torch.func`` on the whole batch (the loop's task loss, :func:`experiments.runs.loop.make_loss_fn`):

- ``value(w)``, ``grad(w)``; ``hvp(w, v)`` = reverse-over-reverse ``vjp(grad L, w)(v)``;
- ``top_eigs(w, k)``: Lanczos from the probes (:func:`experiments.trace.probes.lanczos_top`,
  full reorthogonalisation, Ritz-residual stop), warm-started from the previous call's Ritz
  vectors plus 10 % of a random direction (as the probes do); eigenpairs after the first by
  deflation, :math:`H - \sum_{j<i}\lambda_j u_j u_j^\top`; or, with ``eig_solver="lobpcg"``,
  the first call by that Lanczos and every later one by ``scipy.sparse.linalg.lobpcg``
  (Knyazev 2001) on the block of the previous call's k eigenvectors (no random part: along a
  flow the top eigenvectors move little between solver evaluations, and a block method needs
  no deflation), its products one batched HVP per block (``torch.func.vmap``); converged
  when every residual ‖Hx − θx‖ ≤ ``eig_tol``·|θ_1|, so an eigenvalue is off by about
  (eig_tol·θ_1)²/gap and a vector by eig_tol·θ_1/gap. Caveat: started from the previous
  block, LOBPCG reaches a direction outside it only through its residuals, so an eigenvalue
  rising from below the k-th past it can go unseen for a while (the Lanczos path's random
  part guards against that); on the scored flows the two paths give the same events and
  λ_max to 3e-7 (docs/findings/central_flow.md §7), which is a check, not a guarantee;
  ``top_eigs(w, k, tol)`` runs one LOBPCG call to the relative residual ``tol`` instead (the
  central flow's entering event far from the edge, docs/findings/central_flow.md §8);
- ``grad_quadform(w, u, v)`` = :math:`\nabla_w (v^\top H(w) u)`, by differentiating the HVP
  once more; ``grad_sharpness(w)`` that with the top eigenvector;
- ``hessian(w)`` (dense, for tiny networks and tests); ``blocks``: one index slice per layer
  (owning module, as the tracer names layers).

``device`` ("cpu", "cuda", ...): the model, the batch and every product live there in float64;
w and the results cross as numpy arrays (one host copy per call; the warm-start vectors stay on
the device), or as tensors on the device through ``value_and_grad_t``.

Counters ``n_grad``, ``n_hvp``, ``n_third`` record the work done (for the benchmark; a batched
product of a block of b vectors counts b HVPs).

Example::

    >>> import torch
    >>> from experiments.runs.data import load_data
    >>> from experiments.runs.models import build_model
    >>> data = load_data("digits", n_train=50)
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> loss = NetworkLoss(build_model("mlp", data.info, hidden=(8,)), data.x_train, data.y_train, "classify")
    >>> loss.w0.shape, [loss.layers[i] for i in range(2)]
    ((610,), ['fc1', 'fc2'])
"""

import warnings

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, lobpcg
import torch.nn.functional as F
from torch.func import functional_call, grad, vjp

from experiments.runs.loop import make_loss_fn
from experiments.trace.probes import WARM_START_NOISE, lanczos_top
from experiments.trace.tracer import layer_name


class NetworkLoss:
    """The full-batch loss of ``model`` on ``(x, y)`` for ``task`` ("classify", "regress",
    "lm"), as a function of the flat float64 parameter vector (module docstring).

    ``lanczos_iters`` caps the Lanczos steps (and ``lanczos_tol`` stops them by the Ritz
    residual, relative to the eigenvalue); ``seed`` seeds the random part of the starts;
    ``loss_fn(model, (x, y))`` replaces the task's loss (e.g. :func:`onehot_mse`);
    ``eig_solver`` "lanczos" (every call) or "lobpcg" (warm calls; module docstring), whose
    relative residual tolerance is ``eig_tol`` and iteration cap ``lobpcg_iters`` (a call that
    does not converge within it falls back to Lanczos).
    """

    EIG_SOLVERS = ("lanczos", "lobpcg")

    def __init__(self, model, x, y, task, lanczos_iters=60, lanczos_tol=1e-10, seed=0, loss_fn=None,
                 eig_solver="lanczos", eig_tol=1e-8, lobpcg_iters=40, device="cpu"):
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device={device!r} is not valid; valid: a torch device such as 'cpu' or 'cuda'") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} is not available; valid: 'cpu' (no CUDA device here)")
        if eig_solver not in self.EIG_SOLVERS:
            raise ValueError(f"eig_solver={eig_solver!r} is not valid; valid: {', '.join(self.EIG_SOLVERS)}")
        if not 0 < eig_tol < 1:
            raise ValueError(f"eig_tol={eig_tol!r} is outside the valid range (0, 1)")
        if int(lobpcg_iters) < 1:
            raise ValueError(f"lobpcg_iters={lobpcg_iters!r} is outside the valid range [1, inf)")
        self.eig_solver, self.eig_tol, self.lobpcg_iters = eig_solver, float(eig_tol), int(lobpcg_iters)
        self.n_lobpcg_fallback = 0
        self.model = model.to(dtype=torch.float64, device=self.device)
        self.x = (x.to(torch.float64) if x.is_floating_point() else x).to(self.device)
        self.y = (y.to(torch.float64) if y.is_floating_point() else y).to(self.device)
        self.device = self.x.device  # resolved: 'cuda' becomes 'cuda:0', as the tensors report it
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.sizes = [p.numel() for _, p in model.named_parameters()]
        self.w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().cpu().numpy().copy()
        self._task_loss = loss_fn or make_loss_fn(task)
        self.layers, self.blocks = _layer_slices(self.names, self.sizes)
        self.lanczos_iters, self.lanczos_tol = int(lanczos_iters), float(lanczos_tol)
        self._gen = torch.Generator().manual_seed(seed)  # the starts: the same on every device
        # Lanczos' breakdown restarts draw on the device
        self._dev_gen = self._gen if self.device.type == "cpu" else torch.Generator(self.device).manual_seed(seed)
        self._warm = []
        self.n_grad = self.n_hvp = self.n_third = 0
        self._grad_fn = grad(self._loss)

    # -- the function of the flat vector
    def _params(self, w):
        return dict(zip(self.names, (c.view(s) for c, s in zip(torch.split(w, self.sizes), self.shapes))))

    def _loss(self, w):
        params = self._params(w)
        return self._task_loss(lambda inp: functional_call(self.model, params, (inp,)), (self.x, self.y))

    def _hvp_t(self, w, v):
        # reverse over reverse (H symmetric: vᵀH = Hv): forward-over-reverse jvp fails on
        # mse_loss's backward ("ZeroTensors are immutable", torch 2.x)
        return vjp(self._grad_fn, w)[1](v)[0]

    def _t(self, a):
        """numpy in: a float64 tensor on the loss's device."""
        if isinstance(a, torch.Tensor):
            return a.to(device=self.device, dtype=torch.float64)
        return torch.as_tensor(np.asarray(a, dtype=np.float64)).to(self.device)

    @staticmethod
    def _np(t):
        """numpy out (copied to the host from a device)."""
        return t.detach().cpu().numpy()

    # -- the protocol of dynamics.central_flow
    def value(self, w):
        with torch.no_grad():
            return float(self._loss(self._t(w)))

    def grad(self, w):
        self.n_grad += 1
        return self._np(self._grad_fn(self._t(w)))

    def value_and_grad_t(self, wt):
        """(loss, gradient) as tensors on the device for a float64 tensor ``wt`` there: the
        path of the discrete runs, which stay on the device (no host transfer per step)."""
        self.n_grad += 1
        g, value = torch.func.grad_and_value(self._loss)(wt)
        return value, g

    def hvp(self, w, v):
        self.n_hvp += 1
        return self._np(self._hvp_t(self._t(w), self._t(v)))

    def hessian(self, w):
        """Dense Hessian (d x d), one HVP per column through ``torch.func.vmap``."""
        wt = self._t(w)
        eye = torch.eye(wt.numel(), dtype=torch.float64, device=self.device)
        self.n_hvp += wt.numel()
        return self._np(torch.func.vmap(lambda v: self._hvp_t(wt, v))(eye))

    def _hvp_block(self, wt, vs):
        """H(w) applied to the columns of ``vs`` (d, b), one batched pass."""
        self.n_hvp += vs.shape[1]
        return torch.func.vmap(lambda v: self._hvp_t(wt, v))(vs.T).T

    def top_eigs(self, w, k, tol=None):
        """Top k eigenvalues (descending) and unit eigenvectors (columns) of H(w).

        ``tol`` (optional, in (0, 1)): this call's relative residual tolerance for the LOBPCG
        path in place of ``eig_tol`` (every residual ‖Hx − θx‖ ≤ tol·|θ_1|, so each θ_i lies
        within tol·|θ_1| of an eigenvalue); the Lanczos path (the first call, a fallback, and
        ``eig_solver="lanczos"``) ignores it and runs to ``lanczos_tol``."""
        if tol is not None and not 0 < tol < 1:
            raise ValueError(f"tol={tol!r} is outside the valid range (0, 1)")
        if self.eig_solver == "lobpcg" and len(self._warm) >= k:
            out = self._top_eigs_lobpcg(w, k, self.eig_tol if tol is None else float(tol))
            if out is not None:
                return out
            self.n_lobpcg_fallback += 1
        return self._top_eigs_lanczos(w, k)

    def _top_eigs_lobpcg(self, w, k, tol):
        """``scipy.sparse.linalg.lobpcg`` from the previous call's k vectors; None if it does
        not reach the relative residual tolerance ``tol`` within ``lobpcg_iters`` iterations."""
        wt = self._t(w)
        start = self._np(torch.stack(self._warm[:k], 1))
        op = LinearOperator((wt.numel(),) * 2, dtype=np.float64,
                            matvec=lambda v: self._np(self._hvp_block(wt, self._t(v).reshape(-1, 1))).ravel(),
                            matmat=lambda v: self._np(self._hvp_block(wt, self._t(v))))
        scale = abs(self._warm_value)  # θ_1 of the previous call
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "not converged": checked below
            vals, vecs, hist = lobpcg(op, start, largest=True, tol=tol * scale,
                                      maxiter=self.lobpcg_iters, retResidualNormsHistory=True)
        if np.max(hist[-1]) > tol * scale:
            return None
        order = np.argsort(vals)[::-1]
        vals, vecs = vals[order], vecs[:, order]
        vecs = vecs / np.linalg.norm(vecs, axis=0)
        self._warm = [self._t(v.copy()) for v in vecs.T] + self._warm[k:]
        self._warm_value = float(vals[0])
        return vals, vecs

    def _top_eigs_lanczos(self, w, k):
        wt = self._t(w)
        vals, vecs = [], []
        for i in range(k):
            def matvecs(vs, i=i):
                out = {}
                for key, v in vs.items():
                    hv = self._hvp_t(wt, v)
                    for lam, u in zip(vals[:i], vecs[:i]):  # deflation of the pairs found
                        hv = hv - lam * torch.dot(u, v) * u
                    out[key] = hv
                    self.n_hvp += 1
                return out

            r = torch.randn(wt.numel(), generator=self._gen, dtype=torch.float64).to(self.device)
            r = r / r.norm()
            start = self._warm[i] + WARM_START_NOISE * r if i < len(self._warm) else r
            value, vector, _ = lanczos_top(matvecs, [start], self.lanczos_iters, self._dev_gen, tol=self.lanczos_tol)
            vals.append(float(value[0]))
            vecs.append(vector[0])
        self._warm = [v.clone() for v in vecs] + self._warm[k:]
        self._warm_value = max(vals)
        order = np.argsort(vals)[::-1]  # deflation can return them slightly out of order
        return np.array(vals)[order], self._np(torch.stack(vecs, 1))[:, order]

    def grad_quadform(self, w, u, v):
        """∇_w (vᵀ H(w) u) for fixed u, v: a third derivative by one more reverse pass."""
        self.n_third += 1
        ut, vt = self._t(u), self._t(v)
        return self._np(grad(lambda x: torch.dot(self._hvp_t(x, ut), vt))(self._t(w)))

    def grad_sharpness(self, w):
        u = self.top_eigs(w, 1)[1][:, 0]
        return self.grad_quadform(w, u, u)


def onehot_mse(model, batch):
    r"""MSE against one-hot targets for a classification batch ``(x, labels)``:
    :math:`\tfrac12 \cdot \frac{1}{NC}\sum_{n,c} (f_c(x_n) - [y_n = c])^2` over the N examples
    and the C outputs (the loop's ``regress`` loss, ½·mean squared error, with the labels one-hot)."""
    out = model(batch[0])
    return 0.5 * F.mse_loss(out, F.one_hot(batch[1], out.shape[-1]).to(out.dtype))


LOSSES = {"task": None, "onehot_mse": onehot_mse}


def _layer_slices(names, sizes):
    """Consecutive index slices of the flat vector, one per layer (owning module)."""
    layers, blocks, start = [], [], 0
    for name, size in zip(names, sizes):
        layer = layer_name(name)
        if layers and layers[-1] == layer:
            blocks[-1] = slice(blocks[-1].start, start + size)
        else:
            layers.append(layer)
            blocks.append(slice(start, start + size))
        start += size
    return layers, blocks
