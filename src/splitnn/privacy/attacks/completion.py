"""Model completion (Fu et al., "Label Inference Attacks Against Vertical Federated Learning", USENIX Security 2022).

Threat model: the data holder (alice) is curious about the label holder's labels. After (or
during) training she holds a bottom segment that bob's gradients have shaped into a feature
extractor for bob's task. With a handful of labelled examples (the paper uses a few per class,
e.g. 4), she *completes* it: she fits a small head on her own segment's outputs for those
examples, and then labels any sample she holds, training or test, without bob.

:class:`ModelCompletion` is the passive version of the attack (the head is fitted on the
known examples' cut activations; the bottom segment is frozen). Success is the completed
model's accuracy on samples whose labels alice never saw; compare with the same head fitted on
an untrained bottom segment (what the few labels give by themselves) and with bob's model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from splitnn.checks import check_amounts, check_counts
from splitnn.errors import ConfigurationError, ShapeMismatchError

__all__ = ["ModelCompletion", "ModelCompletionConfig", "few_labels"]


@dataclass(frozen=True)
class ModelCompletionConfig:
    """The attacker's head: ``hidden`` units (0: a linear head), Adam ``lr``, full-batch ``epochs``, ``seed``."""

    hidden: int = 0
    epochs: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        check_counts(self, ("hidden",), minimum=0)
        check_counts(self, ("epochs",))
        check_amounts(self, ("lr", "weight_decay"))


def few_labels(labels: torch.Tensor, per_class: int, num_classes: int) -> torch.Tensor:
    """Indices of the first ``per_class`` examples of each class in ``labels`` (the attacker's known labels)."""
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ConfigurationError(f"per_class must be a positive integer, got {per_class!r}")
    picked = []
    for c in range(num_classes):
        rows = torch.nonzero(labels == c).flatten()[:per_class]
        if rows.numel() < per_class:
            raise ConfigurationError(f"class {c} has only {rows.numel()} examples; model completion needs {per_class}")
        picked.append(rows)
    return torch.cat(picked)


class ModelCompletion:
    """Fit a head on a few labelled examples' cut activations; predict labels from activations.

    Activations are standardised with the known examples' statistics. ``fit`` returns ``self``.
    """

    def __init__(self, num_classes: int, config: ModelCompletionConfig | None = None) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigurationError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        self.config = config or ModelCompletionConfig()
        self.head: nn.Module | None = None

    def fit(self, activations: torch.Tensor, labels: torch.Tensor) -> ModelCompletion:
        """Train the head on the known examples' activations (N, ...) and labels (N,)."""
        if activations.shape[0] != labels.shape[0]:
            raise ShapeMismatchError(f"{activations.shape[0]} activations but {labels.shape[0]} labels")
        cfg = self.config
        a = activations.detach().reshape(activations.shape[0], -1).float()
        self._mean, self._std = (
            a.mean(dim=0),
            a.std(dim=0).clamp_min(1e-6) if a.shape[0] > 1 else torch.ones(a.shape[1]),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            d = a.shape[1]
            layers = (
                [nn.Linear(d, self.num_classes)]
                if cfg.hidden == 0
                else [nn.Linear(d, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, self.num_classes)]
            )
            head = nn.Sequential(*layers)
        opt = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        x, y = (a - self._mean) / self._std, labels.long()
        with torch.enable_grad():
            for _ in range(cfg.epochs):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(head(x), y).backward()
                opt.step()
        self.head = head.eval()
        return self

    @torch.no_grad()
    def predict(self, activations: torch.Tensor) -> torch.Tensor:
        """Predicted labels for ``activations``."""
        if self.head is None:
            raise ConfigurationError("ModelCompletion: call fit() first")
        a = activations.detach().reshape(activations.shape[0], -1).float()
        return self.head((a - self._mean) / self._std).argmax(dim=1)

    def accuracy(self, activations: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of ``labels`` the completed model recovers."""
        return float((self.predict(activations) == labels).double().mean())
