"""Label differential privacy by randomized response, at the label holder (Ghazi et al., arXiv 2102.06062).

Each training label is replaced, once and before training, by randomized response
with parameter ``epsilon``: it is kept with probability
``e^epsilon / (e^epsilon + K - 1)`` and otherwise replaced by one of the other
``K - 1`` classes, uniformly. Everything the label holder computes afterwards
(losses, the gradients it sends back at the cut, its weights) depends on the labels
only through the randomized ones, so it is epsilon-label-DP: the data holder's view
changes by a factor of at most ``e^epsilon`` when one label changes. Labels are
randomized once (not per epoch), so the guarantee does not degrade with epochs.
"""

from __future__ import annotations

import math

import torch

from splitnn.data import Dataset
from splitnn.errors import ConfigurationError
from splitnn.privacy.defenses._rng import check_seed

__all__ = ["keep_probability", "randomized_response", "LabelDP"]


def keep_probability(epsilon: float, num_classes: int) -> float:
    """Probability that randomized response with ``epsilon`` keeps a label of ``num_classes`` classes."""
    return 1.0 / (1.0 + (num_classes - 1) * math.exp(-epsilon))


def randomized_response(
    labels: torch.Tensor, epsilon: float, num_classes: int, generator: torch.Generator
) -> torch.Tensor:
    """``labels`` (class indices) after K-ary randomized response with ``epsilon`` (a new tensor)."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
        raise ConfigurationError(f"label DP: epsilon must be a number > 0, got {epsilon!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigurationError(f"label DP needs at least 2 classes, got {num_classes!r}")
    y = labels.reshape(-1).long()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ConfigurationError(f"label DP: labels must be class indices in 0..{num_classes - 1}")
    keep = torch.rand(y.shape, generator=generator) < keep_probability(float(epsilon), num_classes)
    # another class, uniformly: shift by 1..K-1 (mod K)
    shift = torch.randint(1, num_classes, y.shape, generator=generator)
    return torch.where(keep, y, (y + shift) % num_classes).reshape(labels.shape)


class LabelDP:
    """Randomized response with ``epsilon`` on a dataset's labels (applied by the label holder, once).

    >>> noisy = LabelDP(epsilon=1.0, seed=0).apply(train)   # doctest: +SKIP
    """

    def __init__(self, epsilon: float, *, seed: int = 0) -> None:
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 < epsilon < math.inf:
            raise ConfigurationError(f"LabelDP: epsilon must be a finite number > 0, got {epsilon!r}")
        self.epsilon = float(epsilon)
        self.seed = check_seed(seed, "LabelDP")

    def apply(self, data: Dataset) -> Dataset:
        """``data`` with randomized labels (features are the same tensor)."""
        if data.num_classes is None or data.num_classes < 2:
            raise ConfigurationError(f"LabelDP needs a classification dataset, {data.name!r} has no classes")
        gen = torch.Generator().manual_seed(self.seed)
        labels = randomized_response(data.labels, self.epsilon, data.num_classes, gen)
        return Dataset(data.features, labels, f"{data.name}-label-dp-{self.epsilon:g}", data.num_classes)
