"""Ready-made split networks: the tutorial's MLP and small convolutional networks.

Each builder returns a list of segments (``nn.Module``), one per party, that
``SplitNN`` places on workers; ``nn.Sequential(*segments)`` is the monolithic twin.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from splitnn.errors import ConfigurationError


def tutorial_mlp(hidden: Sequence[int] = (128, 640), *, in_features: int = 784, classes: int = 10,
                 flatten: bool = True) -> list[nn.Module]:
    """The PySyft tutorial's network, 784-128-640-10, one segment per layer.

    Every segment but the last is ``Linear + ReLU``; the last is
    ``Linear + LogSoftmax`` (pair it with the NLL loss). ``flatten`` puts an
    ``nn.Flatten`` in front so that image batches (N, 1, 28, 28) can go in as they are.
    """
    sizes = [in_features, *hidden, classes]
    if any((not isinstance(s, int)) or s < 1 for s in sizes):
        raise ConfigurationError(f"layer sizes must be positive integers, got {sizes}")
    segments: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        layers: list[nn.Module] = [nn.Flatten()] if (i == 0 and flatten) else []
        layers += [nn.Linear(a, b), nn.LogSoftmax(dim=1) if last else nn.ReLU()]
        segments.append(nn.Sequential(*layers))
    return segments


def small_cnn(*, channels: int = 1, classes: int = 10) -> list[nn.Module]:
    """A small convolutional network for 28x28 images, cut at two places (three segments)."""
    return [
        nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()),
        nn.Sequential(nn.Linear(16 * 7 * 7, classes), nn.LogSoftmax(dim=1)),
    ]
