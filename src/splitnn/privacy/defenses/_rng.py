"""Dedicated random streams for defenses (never the global RNG), and the base of the gradient-noise layers."""

from __future__ import annotations

import math

import torch
from torch import nn

from splitnn.errors import ConfigurationError


def check_seed(seed: object, who: str) -> int:
    """``seed`` as an int, or a :class:`ConfigurationError` naming ``who``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigurationError(f"{who}: seed must be a non-negative integer, got {seed!r}")
    return seed


class SeededStream:
    """One ``torch.Generator`` per device, each seeded with ``seed`` on first use.

    A defense that draws noise owns one of these, so that its randomness is
    reproducible from the configuration and a defense that draws nothing (strength
    0) leaves every other random stream, the global one included, untouched.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        """The stream's generator for ``device``."""
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return gen

    def randn(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Standard normal samples of ``shape`` with ``like``'s dtype and device.

        On the ``meta`` device (a worker computing a received segment's sizes, :mod:`splitnn.wire.budget`)
        a meta tensor of that shape: there is no meta generator, and no stream is drawn from.
        """
        if like.device.type == "meta":
            return torch.empty(shape, dtype=like.dtype, device="meta")
        return torch.randn(shape, generator=self.generator(like.device), device=like.device, dtype=like.dtype)

    def get_rng_states(self) -> dict[str, torch.Tensor]:
        """Each device's generator state (for a party's checkpoint; empty before the first draw)."""
        return {device: gen.get_state() for device, gen in self._generators.items()}

    def set_rng_states(self, states: dict[str, torch.Tensor]) -> None:
        """Continue every device's stream from ``states`` (as :meth:`get_rng_states` returned them)."""
        self._generators.clear()
        for device, state in states.items():
            gen = self._generators[device] = torch.Generator(device=device)
            gen.set_state(state)

    def reset(self) -> None:
        """Start every device's stream again from ``seed``."""
        self._generators.clear()


def check_strength(strength: object, who: str) -> float:
    """``strength`` as a float, or a :class:`ConfigurationError` naming ``who``."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not (0 <= strength < math.inf):
        raise ConfigurationError(f"{who}: strength must be a finite number >= 0, got {strength!r}")
    return float(strength)


class PassGradient(torch.autograd.Function):
    """Identity forward that keeps the layer (``module``) for a subclass's ``backward``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module) -> torch.Tensor:  # type: ignore[override]
        ctx.module = module
        return x.view_as(x)


class GradientNoiseLayer(nn.Module):
    """Identity forward; in training, the gradient going back passes through ``function`` (a
    :class:`PassGradient`), which adds the layer's noise. Strength 0 is the identity and draws nothing."""

    function: type[PassGradient]

    def __init__(self, strength: float, seed: int, who: str) -> None:
        super().__init__()
        self.strength = check_strength(strength, who)
        self.seed = check_seed(seed, who)
        self._stream = SeededStream(self.seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strength == 0 or not self.training or not torch.is_grad_enabled() or not x.requires_grad:
            return x
        return self.function.apply(x, self)

    def reset_rng(self) -> None:
        """Restart the noise stream from ``seed``."""
        self._stream.reset()
