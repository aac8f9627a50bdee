"""Defenses at the cut, each an ``nn.Module`` that lives in the segment of the party that applies it.

- ``nopeek``: :class:`NoPeek` wraps the data holder's segment (it needs the raw inputs);
- ``noise``: :class:`CutNoise` is appended to the data holder's segment (before the cut);
- ``label``: :class:`LabelProtection` is prepended to the label holder's segment (after the cut).

Because a defense is a layer of a segment, it works with any worker (in-process
or networked: the layers have wire specs) and changes only what its party sends.
At strength 0 every defense is the identity, bit for bit, and draws no random
numbers, so training equals undefended training exactly.

:func:`apply_defense` places a :class:`DefenseSetting` on a list of per-party segments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from splitnn.errors import ConfigurationError
from splitnn.privacy.defenses._rng import check_seed
from splitnn.privacy.defenses.dp import DPSegment, dp_noise_multiplier, rdp_epsilon
from splitnn.privacy.defenses.label import LabelProtection, protect_gradient
from splitnn.privacy.defenses.noise import CutNoise
from splitnn.privacy.defenses.nopeek import NoPeek
from splitnn.privacy.defenses.specs import register_defense_layers

__all__ = [
    "DEFENSE_NAMES",
    "DefenseSetting",
    "DefenseOptions",
    "apply_defense",
    "NoPeek",
    "CutNoise",
    "LabelProtection",
    "protect_gradient",
    "DPSegment",
    "dp_noise_multiplier",
    "rdp_epsilon",
    "register_defense_layers",
]

#: Defense names, as the command line takes them. ``none`` is the undefended baseline.
DEFENSE_NAMES = ("none", "nopeek", "noise", "label")

#: What ``strength`` means for each defense.
STRENGTH_MEANING = {
    "none": "(no defense)",
    "nopeek": "alpha, the weight of dCor(inputs, activations) in the data holder's loss",
    "noise": "sigma, the noise std per coordinate in units of the clip norm C (clip to C when > 0)",
    "label": "noise std along the gradients' principal direction, in units of their RMS norm",
}


@dataclass(frozen=True)
class DefenseSetting:
    """One defense at one strength (``none`` always has strength 0)."""

    name: str
    strength: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in DEFENSE_NAMES:
            raise ConfigurationError(f"unknown defense {self.name!r}; choose one of {', '.join(DEFENSE_NAMES)}")
        s = self.strength
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0 <= s < math.inf):
            raise ConfigurationError(f"defense {self.name!r}: strength must be a finite number >= 0, got {s!r}")
        if self.name == "none" and s != 0:
            raise ConfigurationError("defense 'none' has no strength; give 0")
        object.__setattr__(self, "strength", float(s))

    @property
    def label(self) -> str:
        """Short display name, e.g. ``nopeek 0.5``."""
        return "none" if self.name == "none" else f"{self.name} {self.strength:g}"


@dataclass(frozen=True)
class DefenseOptions:
    """Settings shared by the defenses.

    Attributes:
        clip: the per-sample activation norm bound C of the ``noise`` defense.
        label_directions: principal directions that receive noise in the ``label`` defense.
        seed: seed of the defenses' own random streams.
    """

    clip: float = 1.0
    label_directions: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)) or not (0 < self.clip < math.inf):
            raise ConfigurationError(f"clip must be a finite number > 0, got {self.clip!r}")
        if (
            isinstance(self.label_directions, bool)
            or not isinstance(self.label_directions, int)
            or self.label_directions < 1
        ):
            raise ConfigurationError(f"label_directions must be a positive integer, got {self.label_directions!r}")
        check_seed(self.seed, "DefenseOptions")


def apply_defense(
    segments: Sequence[nn.Module], setting: DefenseSetting, options: DefenseOptions | None = None
) -> list[nn.Module]:
    """Place ``setting`` on ``segments``, one segment per party in chain order.

    The first segment is the data holder's (the cut follows it), the last the
    label holder's. Returns a new list; the segments' layers (and weights) are the
    same objects, wrapped or extended with the defense module. Segments a party
    hosts consecutively should be merged into one first.
    """
    segs = list(segments)
    if len(segs) < 2:
        raise ConfigurationError(f"a defense needs at least two parties' segments, got {len(segs)}")
    if not isinstance(setting, DefenseSetting):
        raise ConfigurationError(f"setting must be a DefenseSetting, got {type(setting).__name__}")
    opts = options or DefenseOptions()
    s = setting.strength
    if setting.name == "nopeek":
        segs[0] = NoPeek(segs[0], alpha=s)
    elif setting.name == "noise":
        noise = CutNoise(opts.clip, s, seed=opts.seed) if s > 0 else CutNoise()
        segs[0] = nn.Sequential(segs[0], noise)
    elif setting.name == "label":
        segs[-1] = nn.Sequential(LabelProtection(s, directions=opts.label_directions, seed=opts.seed), segs[-1])
    return segs


register_defense_layers()
