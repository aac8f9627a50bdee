"""Label leakage from the gradients the data holder receives (Li et al., arXiv 2102.08504).

:class:`LabelLeakageAttack` scores each sample from its gradient (:func:`norm_scores`,
:func:`cosine_scores`) and measures leakage as a ROC AUC (:class:`LabelLeakageResult`); its docstring
gives the two attacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from splitnn.errors import ShapeMismatchError
from splitnn.privacy.metrics import AUCAccumulator


def norm_scores(grads: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm of a batch of gradients (N, ...)."""
    return grads.reshape(grads.shape[0], -1).norm(dim=1)


def cosine_scores(grads: torch.Tensor, reference: int) -> torch.Tensor:
    """Cosine similarity of each sample's gradient with sample ``reference``'s gradient."""
    flat = grads.reshape(grads.shape[0], -1)
    return F.cosine_similarity(flat, flat[reference].unsqueeze(0).expand_as(flat), dim=1)


@dataclass(frozen=True)
class LabelLeakageResult:
    """AUC of the norm and direction attacks, and how many batches they scored."""

    norm_auc: float
    cosine_auc: float
    batches: int


@dataclass
class LabelLeakageAttack:
    """Scores every training batch's cut gradients as they arrive; :meth:`result` gives the AUCs.

    ``labels`` passed to :meth:`observe` are the ground truth, used for two things
    only: to measure the attack (AUC), and, for the direction attack, to pick the
    one known positive example of the batch (the first one; the attacker is
    assumed to know one positive label per batch, as in the paper). That
    reference example is left out of the scoring.

    On a binary task, the data holder (who has no labels) scores each sample of a
    training batch from the gradient it got back for that sample:

    - **norm attack**: score = the gradient's L2 norm. With imbalanced classes the
      model predicts the majority class, so minority (positive) samples have a larger
      loss gradient.
    - **direction (cosine) attack**: score = cosine similarity between the sample's
      gradient and the gradient of one sample the attacker knows to be positive
      (the paper's assumption). Gradients of the two classes point in opposite
      directions at the cut.

    Leakage is the ROC AUC of each score against the true labels, counted over
    (positive, negative) pairs of the same batch (an attacker compares gradients of
    one step; across steps their scale drifts). 0.5 means nothing leaks, 1.0 means
    every label is recovered.
    """

    _norm: AUCAccumulator = field(default_factory=AUCAccumulator)
    _cosine: AUCAccumulator = field(default_factory=AUCAccumulator)
    _batches: int = 0

    def observe(self, grads: torch.Tensor, labels: torch.Tensor) -> None:
        """Score one batch of gradients (N, ...) with binary labels (N,)."""
        if grads.shape[0] != labels.shape[0]:
            raise ShapeMismatchError(f"{grads.shape[0]} gradients but {labels.shape[0]} labels")
        labels = labels.reshape(-1).long()
        self._batches += 1
        self._norm.add(norm_scores(grads), labels)
        positives = torch.nonzero(labels == 1).flatten()
        if positives.numel():
            ref = int(positives[0])
            keep = torch.ones_like(labels, dtype=torch.bool)
            keep[ref] = False
            self._cosine.add(cosine_scores(grads, ref)[keep], labels[keep])

    def result(self) -> LabelLeakageResult:
        """AUCs over every batch observed so far."""
        return LabelLeakageResult(self._norm.value, self._cosine.value, self._batches)
