"""NoPeek (Vepakomma et al., arXiv 2008.09161): penalise distance correlation between inputs and activations."""

from __future__ import annotations

import math

import torch
from torch import nn

from splitnn.errors import ConfigurationError
from splitnn.privacy.metrics import distance_correlation


class _AddDcorGradient(torch.autograd.Function):
    """Identity forward; backward adds ``alpha * d dCor(x, a) / d a`` to the incoming gradient."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(a, x)
        ctx.alpha = alpha
        return a.view_as(a)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        a, x = ctx.saved_tensors
        with torch.enable_grad():
            leaf = a.detach().requires_grad_(True)
            (penalty_grad,) = torch.autograd.grad(distance_correlation(x, leaf), leaf)
        return grad + ctx.alpha * penalty_grad, None, None


class NoPeek(nn.Module):
    """Wrap the data holder's segment so that it also minimises ``alpha * dCor(inputs, activations)``.

    The data holder's objective becomes ``loss + alpha * dCor(x, inner(x))`` over
    each training batch, as in NoPeek: the forward output is exactly ``inner(x)``
    (nothing changes in what is sent), and in the backward pass the gradient that
    arrives at the cut is augmented by ``alpha * d dCor / d activation`` before it
    flows into ``inner``'s parameters. Only the data holder computes this, from its
    own inputs; nothing extra crosses the cut.

    With ``alpha = 0`` the module is exactly ``inner`` (the gradient is not touched).
    """

    def __init__(self, inner: nn.Module, alpha: float = 0.0) -> None:
        super().__init__()
        if not isinstance(inner, nn.Module):
            raise ConfigurationError(
                f"NoPeek wraps an nn.Module (the data holder's segment), got {type(inner).__name__}"
            )
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0 <= alpha < math.inf):
            raise ConfigurationError(f"NoPeek: alpha must be a finite number >= 0, got {alpha!r}")
        self.inner = inner
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.inner(x)
        if self.alpha == 0 or not self.training or not torch.is_grad_enabled() or not a.requires_grad:
            return a
        return _AddDcorGradient.apply(a, x.detach(), self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
