"""Dedicated random streams for defenses (never the global RNG)."""

from __future__ import annotations

import torch

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
