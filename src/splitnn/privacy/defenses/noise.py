"""Noise at the cut: clip each sample's activation to norm C, then add Gaussian noise of std sigma x C."""

from __future__ import annotations

import math

import torch
from torch import nn

from splitnn.errors import ConfigurationError
from splitnn.privacy.defenses._rng import SeededStream, check_seed


class CutNoise(nn.Module):
    """Clip then noise the activations that leave the data holder (append to its last segment).

    Each sample's activation ``a`` (flattened) becomes
    ``a * min(1, clip / ||a||) + sigma * clip * N(0, I)``: the clipping bounds how
    much any one sample can move the output, the noise (the Gaussian mechanism's
    shape) hides what remains. Gradients flow through the clipping; the noise is
    additive, so its gradient is the identity.

    Args:
        clip: the per-sample L2 norm bound C (``math.inf``: no clipping).
        sigma: noise standard deviation per coordinate, in units of ``clip``;
            needs a finite ``clip`` when positive.
        seed: seed of the module's own random stream (the global RNG is never used).
        at_inference: also clip and noise in evaluation mode (activations leave
            the holder at inference too). Default ``True``.

    With ``sigma = 0`` and ``clip = inf`` the module returns its input unchanged
    (the very same tensor) and draws no random numbers.
    """

    def __init__(self, clip: float = math.inf, sigma: float = 0.0, *, seed: int = 0, at_inference: bool = True) -> None:
        super().__init__()
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0:
            raise ConfigurationError(f"CutNoise: clip must be a positive number or math.inf, got {clip!r}")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (0 <= sigma < math.inf):
            raise ConfigurationError(f"CutNoise: sigma must be a finite number >= 0, got {sigma!r}")
        if sigma > 0 and math.isinf(clip):
            raise ConfigurationError(
                "CutNoise: noise of sigma x clip needs a finite clip; give clip=C (an activation norm scale)"
            )
        if not isinstance(at_inference, bool):
            raise ConfigurationError(f"CutNoise: at_inference must be True or False, got {at_inference!r}")
        self.clip, self.sigma = float(clip), float(sigma)
        self.seed, self.at_inference = check_seed(seed, "CutNoise"), at_inference
        self._stream = SeededStream(self.seed)

    @property
    def is_identity(self) -> bool:
        """True when the module changes nothing (no clipping, no noise)."""
        return self.sigma == 0 and math.isinf(self.clip)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if self.is_identity or (not self.training and not self.at_inference):
            return a
        flat = a.reshape(a.shape[0], -1)
        if not math.isinf(self.clip):
            norms = flat.norm(dim=1, keepdim=True)
            flat = flat * (self.clip / norms.clamp_min(1e-12)).clamp(max=1.0)
        if self.sigma > 0:
            flat = flat + (self.sigma * self.clip) * self._stream.randn(tuple(flat.shape), flat)
        return flat.reshape(a.shape)

    def reset_rng(self) -> None:
        """Restart the noise stream from ``seed``."""
        self._stream.reset()

    def extra_repr(self) -> str:
        return f"clip={self.clip}, sigma={self.sigma}, seed={self.seed}, at_inference={self.at_inference}"
