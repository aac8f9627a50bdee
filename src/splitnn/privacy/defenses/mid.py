"""MID (Zou et al., arXiv 2301.01142): a mutual-information bottleneck layer at the cut, at the label holder.

:class:`MIDLayer` is the layer; its docstring says what it computes and the choices that make it train.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from splitnn.errors import ConfigurationError
from splitnn.privacy.defenses._rng import SeededStream, check_seed

__all__ = ["MIDLayer"]


class _AddPenalty(torch.autograd.Function):
    """Identity on ``out``; backward sends ``lam`` to ``penalty`` (adds ``lam * penalty`` to the loss)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, penalty: torch.Tensor, lam: float) -> torch.Tensor:  # type: ignore[override]
        ctx.lam = lam
        ctx.penalty_shape = penalty.shape
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, torch.full(ctx.penalty_shape, ctx.lam, dtype=grad.dtype, device=grad.device), None


class MIDLayer(nn.Module):
    """Variational information bottleneck of ``bottleneck`` units over activations of ``features`` units.

    Prepend it to the label holder's segment. ``lam`` weighs the KL term, averaged per
    unit (0: the layer is still a bottleneck, with no pressure on its information). The weights are
    initialised from ``seed``; the sampling noise comes from the layer's own stream.

    The label holder passes the activation it receives through a variational
    information bottleneck before its own model: an encoder gives the mean ``mu`` and
    the standard deviation ``std = softplus(.)`` of a ``bottleneck``-dimensional
    Gaussian, a sample ``z = mu + std * eps`` of it (the mean at inference) goes
    through a decoder back to the activation's size, and the label holder's loss gains
    ``lam * KL(N(mu, std^2) || N(0, I))``, a variational upper bound on the mutual
    information between the activation and ``z``. Less information about the data
    holder's output reaches the label holder's model, and so less label information
    flows back in the gradient (the paper's defense against label inference and model
    completion).

    Two choices make it train with the tutorial network and plain SGD (with PyTorch's
    defaults, every lambda, 0 included, collapsed to one class):

    - He initialisation of the encoder and decoder (PyTorch's default initialisation
      divides the activation's mean square by about six at each added ReLU layer, and
      the layer adds four linear layers);
    - the KL term is averaged over the batch *and* the bottleneck's units, so that
      ``lam`` does not grow with ``bottleneck`` (the paper's sum over units with weight
      ``lambda`` is ``lam = lambda * bottleneck`` here).

    The KL term is added to the loss without touching the label holder's loss
    function: the layer's output carries it, in the backward pass, as an extra
    gradient ``lam`` on the KL term (the autograd equivalent of ``loss + lam * KL``).
    """

    def __init__(self, features: int, lam: float, *, bottleneck: int = 64, hidden: int = 128, seed: int = 0) -> None:
        super().__init__()
        for name, v in (("features", features), ("bottleneck", bottleneck), ("hidden", hidden)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigurationError(f"MIDLayer: {name} must be a positive integer, got {v!r}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (0 <= lam < math.inf):
            raise ConfigurationError(f"MIDLayer: lam must be a finite number >= 0, got {lam!r}")
        self.features, self.bottleneck, self.hidden, self.lam = features, bottleneck, hidden, float(lam)
        self.seed = check_seed(seed, "MIDLayer")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.encoder = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 2 * bottleneck))
            self.decoder = nn.Sequential(nn.Linear(bottleneck, hidden), nn.ReLU(), nn.Linear(hidden, features))
            # He initialisation (weights N(0, 2 / fan_in), zero biases) keeps the activation's scale through the
            # four added layers; with PyTorch's default (uniform, variance 1 / (3 fan_in)) the label holder's
            # model did not train at any lambda (see docs/privacy.md).
            for lin in (*self.encoder, *self.decoder):
                if isinstance(lin, nn.Linear):
                    nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
                    nn.init.zeros_(lin.bias)
        self._stream = SeededStream(self.seed)
        self.last_kl: float | None = None

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        shape = a.shape
        h = self.encoder(a.reshape(shape[0], -1))
        mu = h[:, : self.bottleneck]
        if not self.training:
            return self.decoder(mu).reshape(shape)
        std = F.softplus(h[:, self.bottleneck :]).clamp_min(1e-6)
        z = mu + std * self._stream.randn(tuple(mu.shape), mu)
        out = self.decoder(z).reshape(shape)
        kl = 0.5 * (mu.pow(2) + std.pow(2) - 1 - 2 * std.log()).mean()
        self.last_kl = float(kl.detach())
        if self.lam == 0 or not torch.is_grad_enabled():
            return out
        return _AddPenalty.apply(out, kl, self.lam)

    def reset_rng(self) -> None:
        """Restart the sampling stream from ``seed``."""
        self._stream.reset()

    def extra_repr(self) -> str:
        return f"features={self.features}, bottleneck={self.bottleneck}, lam={self.lam}, seed={self.seed}"
