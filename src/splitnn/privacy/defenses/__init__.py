"""Defenses at the cut, each an ``nn.Module`` that lives in the segment of the party that applies it.

- ``nopeek``: :class:`NoPeek` wraps the data holder's segment (it needs the raw inputs);
- ``noise``: :class:`CutNoise` is appended to the data holder's segment (before the cut);
- ``label``: :class:`LabelProtection` is prepended to the label holder's segment (after the cut);
- ``dp``: :class:`DPSegment` wraps the data holder's segment (DP-SGD on its weights, opacus's accountant);
- ``label-dp``: :class:`LabelDP`, randomized response on the label holder's training labels
  (applied to the dataset by :func:`defend_labels`, not to a segment);
- ``marvell``: :class:`Marvell` is prepended to the label holder's segment (train with its ``loss()``);
- ``mid``: :class:`MIDLayer`, an information bottleneck prepended to the label holder's segment.

A defense works with any worker (the layers have wire specs) and changes only what its party sends;
at strength 0 each one with a strength scale is the identity, bit for bit (docs/privacy.md).

:func:`apply_defense` places a :class:`DefenseSetting` on a list of per-party segments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from splitnn.data import Dataset
from splitnn.errors import ConfigurationError
from splitnn.privacy.defenses._rng import check_seed
from splitnn.privacy.defenses.dp import DPSegment, dp_noise_multiplier, rdp_epsilon
from splitnn.privacy.defenses.label import LabelProtection, protect_gradient
from splitnn.privacy.defenses.label_dp import LabelDP, randomized_response
from splitnn.privacy.defenses.marvell import Marvell, marvell_noise
from splitnn.privacy.defenses.mid import MIDLayer
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
    "LabelDP",
    "randomized_response",
    "Marvell",
    "marvell_noise",
    "MIDLayer",
    "defend_labels",
    "defense_loss",
    "register_defense_layers",
]

#: Defense names, as the command line takes them. ``none`` is the undefended baseline.
DEFENSE_NAMES = ("none", "nopeek", "noise", "label", "dp", "label-dp", "marvell", "mid")

#: Defenses whose strength is a privacy budget epsilon (must be > 0).
EPSILON_DEFENSES = ("dp", "label-dp")

#: What ``strength`` means for each defense.
STRENGTH_MEANING = {
    "none": "(no defense)",
    "nopeek": "alpha, the weight of dCor(inputs, activations) in the data holder's loss",
    "noise": "sigma, the noise std per coordinate in units of the clip norm C (clip to C when > 0)",
    "label": "noise std along the gradients' principal direction, in units of their RMS norm",
    "dp": "target epsilon of DP-SGD at the data holder (at delta, over the training run)",
    "label-dp": "epsilon of randomized response on the training labels",
    "marvell": "noise power budget, in units of the squared distance between the classes' mean gradients",
    "mid": "lambda, the weight of the bottleneck's KL term in the label holder's loss",
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
        if self.name in EPSILON_DEFENSES and s == 0:
            raise ConfigurationError(f"defense {self.name!r}: strength is a privacy budget epsilon; give a number > 0")
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
        delta: the delta of ``dp``'s (epsilon, delta) budget.
        sample_rate: batch size / training set size, for ``dp``'s accountant.
        epochs: the training run's epochs, over which ``dp`` spends its budget.
        dp_clip: ``dp``'s per-example gradient norm bound.
        mid_bottleneck: units of ``mid``'s bottleneck.
    """

    clip: float = 1.0
    label_directions: int = 1
    seed: int = 0
    delta: float = 1e-5
    sample_rate: float | None = None
    epochs: int = 1
    dp_clip: float = 1.0
    mid_bottleneck: int = 64

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
        if not (isinstance(self.delta, float) and 0 < self.delta < 1):
            raise ConfigurationError(f"delta must be a float in (0, 1), got {self.delta!r}")
        if self.sample_rate is not None and not (isinstance(self.sample_rate, float) and 0 < self.sample_rate <= 1):
            raise ConfigurationError(f"sample_rate must be a float in (0, 1], got {self.sample_rate!r}")
        for name in ("epochs", "mid_bottleneck"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigurationError(f"{name} must be a positive integer, got {v!r}")
        if (
            isinstance(self.dp_clip, bool)
            or not isinstance(self.dp_clip, (int, float))
            or not 0 < self.dp_clip < math.inf
        ):
            raise ConfigurationError(f"dp_clip must be a finite number > 0, got {self.dp_clip!r}")


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
    elif setting.name == "dp":
        if opts.sample_rate is None:
            raise ConfigurationError("defense 'dp' needs DefenseOptions.sample_rate (batch size / training set size)")
        segs[0] = DPSegment.for_target_epsilon(
            segs[0],
            s,
            opts.delta,
            sample_rate=opts.sample_rate,
            epochs=opts.epochs,
            max_grad_norm=opts.dp_clip,
            seed=opts.seed,
        )
    elif setting.name == "marvell":
        segs[-1] = nn.Sequential(Marvell(s, seed=opts.seed), segs[-1])
    elif setting.name == "mid":
        mid = MIDLayer(_cut_width(segs[0]), s, bottleneck=opts.mid_bottleneck, seed=opts.seed)
        segs[-1] = nn.Sequential(mid, segs[-1])
    return segs


def _cut_width(segment: nn.Module) -> int:
    """Units at the cut: the ``out_features`` of the data holder's last linear layer."""
    width = None
    for m in segment.modules():
        if isinstance(m, nn.Linear):
            width = m.out_features
    if width is None:
        raise ConfigurationError("defense 'mid' needs the cut's width: the data holder's segment has no nn.Linear")
    return width


def defend_labels(data: Dataset, setting: DefenseSetting, options: DefenseOptions | None = None) -> Dataset:
    """The label holder's training labels under ``setting``: randomized for ``label-dp``, else ``data`` itself."""
    if setting.name != "label-dp":
        return data
    return LabelDP(setting.strength, seed=(options or DefenseOptions()).seed).apply(data)


def defense_loss(segments: Sequence[nn.Module], base: str = "nll"):
    """The loss the label holder trains with: ``base``, or a Marvell layer's label-passing wrapper of it."""
    for m in segments[-1].modules():
        if isinstance(m, Marvell) and m.strength > 0:
            return m.loss(base)
    return base


register_defense_layers()
