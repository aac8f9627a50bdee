"""Ready-made split networks: the tutorial's MLP and small convolutional networks.

Each builder returns a list of segments (``nn.Module``), one per party, that
``SplitNN`` places on workers; ``nn.Sequential(*segments)`` is the monolithic twin.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from splitnn.errors import ConfigurationError


def tutorial_mlp(
    hidden: Sequence[int] = (128, 640), *, in_features: int = 784, classes: int = 10, flatten: bool = True
) -> list[nn.Module]:
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


def vgg_cnn(
    *, channels: int = 1, classes: int = 10, widths: Sequence[int] = (32, 64, 128), hidden: Sequence[int] = (1536, 1024)
) -> list[nn.Module]:
    """A VGG-style network (3x3 convolutions, ReLU, max-pooling, a wide fully connected head)
    of about 3.6 million parameters, cut after its first convolutional block (two segments).

    The pattern is VGG-11's, narrowed for 28x28 grey images:

    * segment 0 (the client, a data holder): ``conv3x3(channels -> w1), ReLU, maxpool 2``.
      Its output is the activation at the cut: ``w1 x H/2 x W/2`` values per sample
      (32 x 14 x 14 = 6272 for Fashion-MNIST). The client holds 320 of the
      parameters and does about 1.3% of the forward FLOPs.
    * segment 1 (the server): ``conv(w1 -> w2), ReLU, maxpool``, ``conv(w2 -> w3), ReLU,
      conv(w3 -> w3), ReLU, maxpool``, ``AdaptiveAvgPool2d(3)``, then
      ``Linear(9 w3 -> h1), ReLU, Linear(h1 -> h2), ReLU, Linear(h2 -> classes), LogSoftmax``
      (pair it with the NLL loss).

    The adaptive pooling makes the parameter count independent of the image size
    (3,595,402 with the defaults). No batch normalisation, so every tensor of the
    state is a trainable parameter and federated averaging has no running
    statistics to reconcile. Weights start with He (Kaiming) normal initialisation for ReLU
    and biases at zero, drawn from torch's global generator (seed it for reproducible
    weights): without normalisation layers, PyTorch's default initialisation shrinks the
    signal at every layer and plain SGD barely moves the first epochs.
    """
    sizes = [channels, *widths, *hidden, classes]
    if len(widths) != 3 or len(hidden) != 2 or any((not isinstance(s, int)) or s < 1 for s in sizes):
        raise ConfigurationError(
            f"vgg_cnn needs 3 positive conv widths and 2 positive hidden sizes, got widths={tuple(widths)}, "
            f"hidden={tuple(hidden)}, channels={channels}, classes={classes}"
        )
    w1, w2, w3 = widths
    h1, h2 = hidden
    client = nn.Sequential(nn.Conv2d(channels, w1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    server = nn.Sequential(
        nn.Conv2d(w1, w2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(w2, w3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(w3, w3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(3),
        nn.Flatten(),
        nn.Linear(9 * w3, h1),
        nn.ReLU(),
        nn.Linear(h1, h2),
        nn.ReLU(),
        nn.Linear(h2, classes),
        nn.LogSoftmax(dim=1),
    )
    for layer in (*client, *server):
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    return [client, server]
