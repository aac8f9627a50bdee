"""A malicious label holder for the networked FSHA test: bob's segment, built by bob (``--trust tests.privacy``).

Forward it is an ordinary head (a linear layer and log-softmax), so the label holder's loss and
training step run as usual; backward it ignores the loss's gradient at the cut and sends the FSHA
server's crafted gradient instead, training the attacker's pilot, decoder and critic on its own
public data (8x8 toy images of another seed) as it goes.
"""

from __future__ import annotations

import torch
from torch import nn

from splitnn.privacy.attacks.fsha import FSHA, FSHAConfig


class _Hijack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, head: HijackHead) -> torch.Tensor:  # type: ignore[override]
        ctx.head = head
        ctx.save_for_backward(z)
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (z,) = ctx.saved_tensors
        attacker = ctx.head.attacker()
        crafted = attacker.hijack_gradient(z.detach())
        attacker.train_attacker(z.detach())
        return crafted, None


class HijackHead(nn.Module):
    """bob's segment: a classifier head forward, the FSHA server backward."""

    def __init__(self, features: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.features, self.classes = features, classes
        self.out = nn.Linear(features, classes)
        self._attacker: FSHA | None = None

    def attacker(self) -> FSHA:
        if self._attacker is None:
            from tests.helpers import toy_dataset

            public = toy_dataset(320, shape=(1, 8, 8), seed=1).features
            self._attacker = FSHA(public, self.features, FSHAConfig(batch_size=32, hidden=32))
        return self._attacker

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and z.requires_grad:
            z = _Hijack.apply(z, self)
        return torch.log_softmax(self.out(z), dim=1)
