"""Evaluation metrics, computed where the labels are: at the label holder.

The label holder keeps its outputs and labels over an evaluation (:class:`KeptEvaluations`) and hands
only the metric values to the researcher. Metrics, by name (:data:`METRIC_NAMES`):

* ``accuracy`` -- classification: the arg-max class for class-index losses (``nll``,
  ``cross_entropy``), ``logit > 0`` for ``bce_with_logits`` (a sample is correct when all
  its labels are: subset accuracy, as scikit-learn's ``accuracy_score``);
* ``auc`` -- binary tasks: scikit-learn's ``roc_auc_score`` of the 0/1 labels against the
  scores (one logit per sample, or ``out[:, 1] - out[:, 0]`` for two class scores);
* ``mse``, ``mae`` -- regression: scikit-learn's ``mean_squared_error`` /
  ``mean_absolute_error`` over every element (the target viewed as the output, see
  :func:`splitnn.workers.losses.target_for`).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from splitnn.errors import ConfigurationError, LabelError, WorkerError
from splitnn.workers.base import MetricWorker
from splitnn.workers.losses import (
    CLASS_INDEX_LOSSES,
    CLASSIFICATION_LOSSES,
    ELEMENTWISE_LOSSES,
    Loss,
    loss_label,
    target_for,
)
from splitnn.workers.refs import DatasetStats

METRIC_NAMES = ("accuracy", "auc", "mse", "mae")
#: Metrics of regression losses.
REGRESSION_METRICS = ("mse", "mae")
#: Evaluations whose outputs one label holder keeps at once (the oldest is dropped beyond).
MAX_KEPT = 4


def default_metrics(loss: Loss) -> tuple[str, ...]:
    """Accuracy for classification losses (and callables, as before metrics had names); none for regression."""
    if isinstance(loss, str) and loss not in CLASSIFICATION_LOSSES:
        return ()
    return ("accuracy",)


def check_metric_names(names: Sequence[str] | str | None, loss: Loss) -> tuple[str, ...]:
    """The metric names to compute (``None``: :func:`default_metrics`); ConfigurationError for unknown
    names or a metric the loss's task does not have (accuracy of a regression, mse of a classifier)."""
    if names is None:
        return default_metrics(loss)
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for name in names:
        if name not in METRIC_NAMES:
            raise ConfigurationError(f"unknown metric {name!r}; choose from {METRIC_NAMES}")
        if name not in out:
            out.append(name)
    if isinstance(loss, str):
        classifies = loss in CLASSIFICATION_LOSSES
        for name in out:
            if name in ("accuracy", "auc") and not classifies:
                raise ConfigurationError(
                    f"metric {name!r} needs a classification loss {CLASSIFICATION_LOSSES}, but the loss is "
                    f"{loss!r} (regression); use metrics=['mse', 'mae']"
                )
            if name in REGRESSION_METRICS and classifies:
                raise ConfigurationError(
                    f"metric {name!r} is for regression losses, but the loss is {loss!r}; use "
                    f"metrics=['accuracy', 'auc'] for classification"
                )
    return tuple(out)


def check_metrics_for(
    dataset: str, names: Sequence[str], labels: DatasetStats, out_shape: tuple[int, ...], loss: Loss
) -> None:
    """Refuse, before training, metrics that a dataset's labels (their summary) or the model's output
    cannot have: AUC needs 0/1 labels of both classes and one score per sample."""
    if "auc" not in names:
        return
    per_sample = tuple(out_shape[1:])
    if per_sample not in ((), (1,), (2,)):
        raise ConfigurationError(
            f"metric 'auc' is for binary tasks: the model must output one logit per sample or two class "
            f"scores, but it outputs {per_sample} per sample"
        )
    lo, hi = labels.label_min, labels.label_max
    if lo is None or hi is None or not labels.label_integral or lo < 0 or hi > 1:
        raise LabelError(
            f"metric 'auc' needs 0/1 labels, but dataset {dataset!r} has labels in [{lo}, {hi}]"
            f"{'' if labels.label_integral else ' (not whole numbers)'}"
        )
    if lo == hi:
        raise LabelError(
            f"metric 'auc' needs both classes in dataset {dataset!r}, but every label is {hi:g}; "
            f"evaluate on data with positive and negative samples"
        )


def label_holder_metrics(label_holder: object, keep: str, names: Sequence[str]) -> dict[str, float]:
    """``label_holder.metrics(keep, names)``, or a clear error when that worker cannot compute metrics."""
    if not isinstance(label_holder, MetricWorker):
        raise ConfigurationError(
            f"label holder {getattr(label_holder, 'name', label_holder)!r} cannot compute metrics {list(names)} "
            f"(it lacks metrics(keep, names)); ask for accuracy only"
        )
    return label_holder.metrics(keep, names)


# ------------------------------------------------------------------------------ per batch
def count_correct(loss: Loss, output: torch.Tensor, labels: torch.Tensor) -> int:
    """Correct predictions in one batch (samples whose every label is right), or -1 when the
    output is not a classification the loss lets us read (regression, unknown shapes)."""
    integer = not labels.is_floating_point()
    if loss in CLASS_INDEX_LOSSES or (not isinstance(loss, str) and integer):
        if not integer or output.dim() < 2 or labels.shape != output.shape[:1] + output.shape[2:]:
            return -1
        hit = output.argmax(dim=1) == labels
    elif loss == "bce_with_logits":
        target = target_for(loss, output, labels)
        if target.shape != output.shape:
            return -1
        hit = (output > 0) == (target > 0.5)
    else:
        return -1
    return int(hit.reshape(len(hit), -1).all(dim=1).sum()) if hit.dim() > 1 else int(hit.sum())


# ------------------------------------------------------------------------- whole evaluation
@dataclass
class KeptOutputs:
    """What a label holder keeps over one evaluation: outputs and labels, batch after batch."""

    loss: Loss
    outputs: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)

    def add(self, output: torch.Tensor, labels: torch.Tensor) -> None:
        self.outputs.append(output.detach().cpu())
        self.labels.append(labels.detach().cpu())

    def compute(self, names: Sequence[str]) -> dict[str, float]:
        """The metrics ``names`` over everything kept (see :func:`compute_metrics`)."""
        if not self.outputs:
            raise WorkerError("no evaluation outputs were kept for these metrics; evaluate with keep= first")
        return compute_metrics(self.loss, torch.cat(self.outputs), torch.cat(self.labels), names)


class KeptEvaluations:
    """The evaluations a label holder is keeping outputs for, by id (at most :data:`MAX_KEPT`).

    Some metrics are averages over samples (accuracy, mse, mae), but AUC is not: it ranks
    every output of an evaluation against every other. So the label holder *keeps* its
    outputs and labels over an evaluation (``Worker.loss(..., train=False, keep=ID)`` for
    each batch) and computes the metrics at the end (``MetricWorker.metrics(ID, names)``),
    handing only the metric values to the researcher; the kept tensors are dropped then.

    The ``metrics`` command of networked workers is encoded and decoded by
    :mod:`splitnn.common.serde` (``metrics_to_args`` / ``metrics_from_args``, ``metrics_to_result`` /
    ``metrics_from_result``).
    """

    def __init__(self) -> None:
        self._by_id: collections.OrderedDict[str, KeptOutputs] = collections.OrderedDict()

    def add(self, keep: str, loss: Loss, output: torch.Tensor, labels: torch.Tensor) -> None:
        kept = self._by_id.get(keep)
        if kept is None:
            while len(self._by_id) >= MAX_KEPT:
                self._by_id.popitem(last=False)  # an evaluation nobody asked the metrics of
            kept = self._by_id[keep] = KeptOutputs(loss)
        kept.add(output, labels)

    def take(self, keep: str, worker: str) -> KeptOutputs:
        kept = self._by_id.pop(keep, None)
        if kept is None:
            raise WorkerError(f"worker {worker!r} kept no evaluation outputs under {keep!r}")
        return kept

    def clear(self) -> None:
        self._by_id.clear()


def binary_scores(output: torch.Tensor) -> torch.Tensor:
    """One score per sample for AUC: the single output (a logit) or the difference of two class scores."""
    if output.dim() == 1 or (output.dim() == 2 and output.shape[1] == 1):
        return output.reshape(-1)
    if output.dim() == 2 and output.shape[1] == 2:
        return output[:, 1] - output[:, 0]  # log p1 - log p0 (or its logit form): ranks like p1
    raise ConfigurationError(
        f"metric 'auc' is for binary tasks: the model must output one logit per sample or two class "
        f"scores, but it outputs {tuple(output.shape[1:])} per sample"
    )


def compute_metrics(loss: Loss, outputs: torch.Tensor, labels: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    """Metrics ``names`` of ``outputs`` against ``labels`` (all samples of an evaluation)."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error, roc_auc_score  # imported when used

    n = len(outputs)
    values: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            correct = count_correct(loss, outputs, labels)
            values[name] = correct / n if correct >= 0 else math.nan
        elif name == "auc":
            scores = binary_scores(outputs).double().numpy()
            y = labels.reshape(-1)
            if y.numel() != len(scores):
                raise LabelError(
                    f"metric 'auc' needs one 0/1 label per sample, got labels of shape {tuple(labels.shape)}"
                )
            classes = torch.unique(y).tolist()
            if not set(classes) <= {0, 1}:
                raise LabelError(f"metric 'auc' needs 0/1 labels, got values {classes[:5]}")
            if len(classes) < 2:
                raise LabelError(
                    f"metric 'auc' needs both classes among the evaluated samples, but every label is {classes[0]:g}"
                )
            values[name] = float(roc_auc_score(y.numpy(), scores))
        elif name in REGRESSION_METRICS:
            target = target_for(loss if loss in ELEMENTWISE_LOSSES else "mse", outputs, labels)
            if target.shape != outputs.shape:
                raise LabelError(
                    f"metric {name!r} with {loss_label(loss)}: outputs {tuple(outputs.shape)} and labels "
                    f"{tuple(labels.shape)} do not match element by element"
                )
            fn = mean_squared_error if name == "mse" else mean_absolute_error
            values[name] = float(fn(target.reshape(-1).numpy(), outputs.reshape(-1).numpy()))
        else:
            raise ConfigurationError(f"unknown metric {name!r}; choose from {METRIC_NAMES}")
    return values
