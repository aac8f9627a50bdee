"""Losses by name, so a loss can be chosen by a string that travels to any worker."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitnn.errors import ConfigurationError, LabelError

_LOSSES = {
    "nll": F.nll_loss,
    "cross_entropy": F.cross_entropy,
}

LOSS_NAMES = tuple(sorted(_LOSSES))


def check_loss_name(name: str) -> str:
    """Return ``name`` if it is a known loss, else raise a :class:`ConfigurationError`."""
    if name not in _LOSSES:
        raise ConfigurationError(f"unknown loss {name!r}; choose one of {LOSS_NAMES}")
    return name


def compute_loss(name: str, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean loss of ``output`` against integer class ``labels``."""
    try:
        return _LOSSES[check_loss_name(name)](output, labels)
    except IndexError as exc:  # nll/cross_entropy with a label >= number of classes
        raise LabelError(
            f"a label is out of range for the model's {output.shape[-1]} outputs "
            f"(labels span {int(labels.min())}..{int(labels.max())}): {exc}"
        ) from exc
