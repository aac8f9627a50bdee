"""Marvell (Li et al., arXiv 2102.08504): optimised gradient noise against label leakage in binary tasks.

:class:`Marvell` is the layer prepended to the label holder's segment (its docstring gives the
optimisation); :func:`optimal_marvell_covariances` solves it per batch, :func:`marvell_noise` draws the noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from splitnn.errors import ConfigurationError
from splitnn.privacy.defenses._rng import GradientNoiseLayer, PassGradient, SeededStream

__all__ = ["Marvell", "marvell_noise", "optimal_marvell_covariances"]


def _sym_kl(x: np.ndarray, s1: float, s0: float, delta2: float, d: int) -> float:
    u1, u0, v1, v0 = x
    a1, a0 = s1 + u1, s0 + u0  # variances along e
    b1, b0 = s1 + v1, s0 + v0  # variances in the d - 1 other directions
    along = 0.5 * (a1 / a0 + a0 / a1 - 2 + delta2 * (1 / a0 + 1 / a1))
    across = 0.5 * (d - 1) * (b1 / b0 + b0 / b1 - 2)
    return float(along + across)


def optimal_marvell_covariances(
    s1: float, s0: float, delta2: float, p: float, d: int, power: float
) -> tuple[float, float, float, float]:
    """``(u_1, u_0, v_1, v_0)`` minimising the symmetric KL under the power budget (see :class:`Marvell`)."""
    from scipy.optimize import minimize

    s1, s0 = max(s1, 1e-12), max(s0, 1e-12)
    scale = max(s1, s0, delta2, 1e-12)  # solve in units of the problem's size

    def cost(x: np.ndarray) -> float:
        return _sym_kl(x * scale, s1, s0, delta2, d)

    budget = power / scale

    def spent(x: np.ndarray) -> float:
        return budget - (p * (x[0] + (d - 1) * x[2]) + (1 - p) * (x[1] + (d - 1) * x[3]))

    x0 = np.array([budget, budget, 0.0, 0.0])
    res = minimize(
        cost,
        x0,
        method="SLSQP",
        bounds=[(0, None)] * 4,
        constraints=[{"type": "ineq", "fun": spent}],
        options={"maxiter": 200, "ftol": 1e-10},
    )
    x = res.x if res.success and cost(res.x) <= cost(x0) else x0
    return tuple(float(max(v, 0.0)) * scale for v in x)  # type: ignore[return-value]


def marvell_noise(grad: torch.Tensor, labels: torch.Tensor, strength: float, stream: SeededStream) -> torch.Tensor:
    """``grad`` (N, ...) plus Marvell noise for binary ``labels`` (N,) (see :class:`Marvell`)."""
    n = grad.shape[0]
    g = grad.reshape(n, -1)
    d = g.shape[1]
    y = labels.reshape(-1).to(torch.bool)
    if y.all() or not y.any():
        # one class only: no difference to hide in this batch, but the norm still differs from other
        # batches'; isotropic noise of the same power keeps the defense on
        rms2 = float(g.pow(2).sum(dim=1).mean())
        return (g + math.sqrt(strength * rms2 / d) * stream.randn((n, d), g)).reshape(grad.shape)
    g1, g0 = g[y], g[~y]
    m1, m0 = g1.mean(dim=0), g0.mean(dim=0)
    diff = m1 - m0
    delta2 = float(diff.pow(2).sum())
    e = diff / max(math.sqrt(delta2), 1e-30)
    s1 = float(g1.var(dim=0, unbiased=False).mean()) if g1.shape[0] > 1 else 0.0
    s0 = float(g0.var(dim=0, unbiased=False).mean()) if g0.shape[0] > 1 else 0.0
    p = float(y.double().mean())
    u1, u0, v1, v0 = optimal_marvell_covariances(s1, s0, delta2, p, d, strength * delta2)
    z = stream.randn((n, d), g)
    along = z @ e
    rest = z - along[:, None] * e[None, :]
    u = torch.where(y, torch.tensor(u1, dtype=g.dtype), torch.tensor(u0, dtype=g.dtype)).sqrt()
    v = torch.where(y, torch.tensor(v1, dtype=g.dtype), torch.tensor(v0, dtype=g.dtype)).sqrt()
    noise = (u * along)[:, None] * e[None, :] + v[:, None] * rest
    return (g + noise).reshape(grad.shape)


class _MarvellGradient(PassGradient):
    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        m = ctx.module
        labels = m._labels
        if labels is None or labels.shape[0] != grad.shape[0]:
            raise ConfigurationError(
                "Marvell needs the batch's labels at the backward pass: train with loss=marvell.loss()"
            )
        m._labels = None
        return marvell_noise(grad, labels, m.strength, m._stream), None


class Marvell(GradientNoiseLayer):
    """Identity forward; Marvell noise on the gradient going back to the cut (prepend to the label holder's segment).

    The label holder perturbs the per-example gradients it sends back at the cut,
    with noise whose covariance depends on the example's (true) label: ``W_1`` for
    positives, ``W_0`` for negatives. Marvell chooses them to minimise the symmetric
    KL divergence between the perturbed gradient distributions of the two classes
    (an upper bound on how well *any* attack on the gradients can tell them apart)
    under a noise power budget ``P = strength * ||g_1 - g_0||^2`` (``g_k``: the
    batch's mean gradient of class ``k``, the paper's scaling of the budget):

    ``minimise KL(N_1 || N_0) + KL(N_0 || N_1)  s.t.  p tr(W_1) + (1 - p) tr(W_0) <= P``

    with ``N_k = N(g_k, s_k I + W_k)``. As in the paper the optimum is searched in the
    family ``W_k = u_k e e^T + v_k (I - e e^T)``, ``e`` the unit vector along
    ``g_1 - g_0``; the classes' own gradient covariances are approximated by isotropic
    ones (``s_k``: their mean per-coordinate variance in the batch), which turns the
    problem into four non-negative scalars, solved per batch with SciPy's SLSQP.

    The noise needs each example's label at the backward pass, which the label
    holder has: :class:`Marvell` is prepended to the label holder's segment and its
    :meth:`Marvell.loss` wraps the loss so that the labels of the batch reach the
    layer (in-process label holders; a callable loss does not travel to networked
    workers). Strength 0 leaves the gradient untouched and draws nothing.

    Args:
        strength: the noise power budget in units of ``||g_1 - g_0||^2`` (the paper's ``s``; 0: off).
        seed: seed of the module's own random stream.

    Train with ``loss=marvell.loss("nll")`` (or ``"cross_entropy"``, or a callable) so
    that the layer learns each batch's labels. Marvell is for binary tasks (labels 0/1);
    on a task of several classes, give ``positive``: the noise then hides that class
    against the rest (the paper's binary setting, one class at a time).
    """

    function = _MarvellGradient

    def __init__(self, strength: float = 0.0, *, seed: int = 0, positive: int | None = None) -> None:
        super().__init__(strength, seed, "Marvell")
        self._labels: torch.Tensor | None = None
        if positive is not None and (isinstance(positive, bool) or not isinstance(positive, int) or positive < 0):
            raise ConfigurationError(f"Marvell: positive must be a class index >= 0, got {positive!r}")
        self.positive = positive

    def loss(self, base: str | Callable = "nll") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A loss callable that hands the batch's labels to this layer, then computes ``base``."""
        fn = {"nll": F.nll_loss, "cross_entropy": F.cross_entropy}.get(base) if isinstance(base, str) else base
        if fn is None:
            raise ConfigurationError(f"Marvell.loss: base must be 'nll', 'cross_entropy' or a callable, got {base!r}")

        def loss(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            if self.positive is not None:
                self._labels = (labels == self.positive).long().detach()
            elif labels.numel() and int(labels.max()) > 1:
                raise ConfigurationError(
                    "Marvell protects binary tasks (labels 0 and 1); for more classes give Marvell(positive=c)"
                )
            else:
                self._labels = labels.detach()
            return fn(output, labels)

        return loss

    def extra_repr(self) -> str:
        return f"strength={self.strength}, seed={self.seed}"
