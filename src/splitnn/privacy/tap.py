"""CutTap: an identity layer at the end of the data holder's segment that records what crosses the cut.

It sees exactly the tensors the two parties exchange: the activation the data
holder sends (after any defense applied before the cut) and the gradient it gets
back (after any defense applied by the label holder). The experiment hands the
first to the receiving party's attacks and the second to the data holder's.
Recording never changes a number: the forward returns its input itself and the
gradient hook returns nothing.
"""

from __future__ import annotations

import torch
from torch import nn


class CutTap(nn.Module):
    """Records training-time activations and gradients at the cut (see the module docstring).

    After each training step, :meth:`take` returns ``(activations, gradients)``
    recorded since the last call (one tensor per forward/backward, detached copies).
    Nothing is recorded in evaluation mode.
    """

    def __init__(self) -> None:
        super().__init__()
        self._activations: list[torch.Tensor] = []
        self._gradients: list[torch.Tensor] = []

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return a
        self._activations.append(a.detach().clone())
        if torch.is_grad_enabled() and a.requires_grad:
            a.register_hook(self._record_gradient)
        return a

    def _record_gradient(self, grad: torch.Tensor) -> None:
        self._gradients.append(grad.detach().clone())

    def take(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Activations and gradients recorded since the last call (and forget them)."""
        out = (self._activations, self._gradients)
        self._activations, self._gradients = [], []
        return out

    def __deepcopy__(self, memo: dict) -> CutTap:
        return CutTap()  # recordings stay with the experiment, never travel with the segment
