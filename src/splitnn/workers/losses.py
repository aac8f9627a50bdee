"""Losses by name, so a loss can be chosen by a string that travels to any worker.

A loss is one of :data:`LOSS_NAMES` or, for in-process label holders only, any callable
``(output, target) -> scalar tensor`` (code does not cross the wire). Labels are integer
class indices (``nll``, ``cross_entropy``) or targets compared element by element with
the output (``bce_with_logits``, ``mse``, ``l1``, ``smooth_l1``): binary and multi-label
0/1 targets, probabilities, regression values.

:func:`check_labels` checks a dataset's labels against the loss and the model's output
shape *before training*, from the label holder's :class:`~splitnn.workers.refs.DatasetStats`
(a summary: dtype, per-sample shape, range), so labels never leave their holder.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from splitnn.errors import ConfigurationError, LabelError
from splitnn.workers.refs import DatasetStats

#: A loss as given by the user: a name, or (in-process) a callable ``(output, target) -> scalar``.
Loss = str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_LOSSES = {
    "nll": F.nll_loss,
    "cross_entropy": F.cross_entropy,
    "bce_with_logits": F.binary_cross_entropy_with_logits,
    "mse": F.mse_loss,
    "l1": F.l1_loss,
    "smooth_l1": F.smooth_l1_loss,
}

LOSS_NAMES = tuple(sorted(_LOSSES))
#: Losses whose labels are integer class indices into the output's dimension 1.
CLASS_INDEX_LOSSES = ("nll", "cross_entropy")
#: Losses that compare the output with a target of the same shape, element by element.
ELEMENTWISE_LOSSES = ("bce_with_logits", "mse", "l1", "smooth_l1")
#: Losses of classification tasks (accuracy is their default metric).
CLASSIFICATION_LOSSES = (*CLASS_INDEX_LOSSES, "bce_with_logits")


def check_loss_name(name: str) -> str:
    """Return ``name`` if it is a known loss, else raise a :class:`ConfigurationError`."""
    if not isinstance(name, str) or name not in _LOSSES:
        raise ConfigurationError(
            f"unknown loss {name!r}; choose one of {LOSS_NAMES} (or, with in-process workers, "
            f"a callable (output, target) -> scalar)"
        )
    return name


def check_loss(loss: Loss) -> Loss:
    """A loss name (checked) or a callable, else a :class:`ConfigurationError`."""
    if callable(loss) and not isinstance(loss, str):
        return loss
    return check_loss_name(loss)


def check_loss_at(loss: Loss, label_holder: object) -> Loss:
    """:func:`check_loss`, and a callable only for a label holder that runs in this process
    (``runs_callables``: :class:`~splitnn.workers.VirtualWorker`); networked workers take names."""
    loss = check_loss(loss)
    if not isinstance(loss, str) and not getattr(label_holder, "runs_callables", False):
        raise ConfigurationError(
            f"{loss_label(loss)} cannot run at label holder {getattr(label_holder, 'name', label_holder)!r}: a "
            f"networked worker takes losses by name only (code does not cross the wire); give one of {LOSS_NAMES}"
        )
    return loss


def loss_label(loss: Loss) -> str:
    """How a loss is named in messages: ``'mse'`` or ``the loss callable my_loss``."""
    if isinstance(loss, str):
        return repr(loss)
    return f"the loss callable {getattr(loss, '__name__', type(loss).__name__)}"


def target_for(loss: Loss, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The target the loss compares ``output`` with: the labels, for element-wise losses cast to the
    output's dtype and, for one output per sample (``(B, 1)``) and scalar labels (``(B,)``), viewed as
    ``(B, 1)`` (so that ``mse`` cannot silently broadcast to ``(B, B)``)."""
    if loss in ELEMENTWISE_LOSSES:
        t = labels.to(output.dtype)
        if t.shape != output.shape and output.shape == (*t.shape, 1):
            t = t.unsqueeze(-1)
        return t
    return labels


def compute_loss(loss: Loss, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean loss of ``output`` against ``labels`` (see :func:`target_for`)."""
    if not isinstance(loss, str):
        value = check_loss(loss)(output, labels)
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            raise ConfigurationError(
                f"{loss_label(loss)} must return a scalar tensor, got "
                f"{type(value).__name__}{'' if not isinstance(value, torch.Tensor) else tuple(value.shape)}"
            )
        return value
    fn = _LOSSES[check_loss_name(loss)]
    target = target_for(loss, output, labels)
    if loss in ELEMENTWISE_LOSSES and target.shape != output.shape:
        raise LabelError(
            f"loss {loss!r} compares outputs of shape {tuple(output.shape)} with labels of shape "
            f"{tuple(labels.shape)}; they must match element by element"
        )
    try:
        return fn(output, target)
    except IndexError as exc:  # nll/cross_entropy with a label >= number of classes
        raise LabelError(
            f"a label is out of range for the model's {output.shape[-1]} outputs "
            f"(labels span {int(labels.min())}..{int(labels.max())}): {exc}"
        ) from exc


def check_labels(
    dataset: str, stats: DatasetStats, out_shape: tuple[int, ...], loss: Loss, holder: str, *, batch: int = 2
) -> None:
    """Refuse labels that ``loss`` cannot compare with outputs of ``out_shape``, the output for a
    probe batch of ``batch`` samples.

    Uses only the label holder's summary (``stats``); raises :class:`LabelError` naming the
    dataset, the loss and the fix. A callable loss is not checked (its needs are unknown), nor
    are shapes when the output's first dimension is not the batch (a model for single samples).
    """
    if not isinstance(loss, str):
        return
    where = f"dataset {dataset!r} (labels at {holder!r})"
    dtype = stats.label_dtype or "int64"
    integral_dtype = not dtype.startswith(("float", "bfloat", "complex"))
    if not out_shape or out_shape[0] != batch:
        if loss in CLASS_INDEX_LOSSES and not integral_dtype and loss != "cross_entropy":
            raise LabelError(
                f"{where} has {dtype} labels but loss {loss!r} needs integer class labels: convert them "
                f"with .long(), or use loss='bce_with_logits' or 'mse' for float targets"
            )
        return
    shape = tuple(stats.label_shape or ())
    per_sample = tuple(out_shape[1:])
    lo, hi = stats.label_min, stats.label_max
    if loss in CLASS_INDEX_LOSSES:
        if len(out_shape) < 2:
            raise LabelError(
                f"{where}: loss {loss!r} needs outputs of shape (batch, classes), but the model outputs "
                f"{tuple(out_shape)}; end the network with one output per class"
            )
        classes = out_shape[1]
        if not integral_dtype:
            if loss == "cross_entropy" and shape == per_sample:
                return  # class probabilities ("soft labels") of the output's shape
            raise LabelError(
                f"{where} has {dtype} labels but loss {loss!r} needs integer class labels in [0, {classes}): "
                f"convert class labels with .long(), or use loss='bce_with_logits' for binary or "
                f"multi-label 0/1 targets, or loss='mse' for regression"
            )
        if shape != per_sample[1:]:
            raise LabelError(
                f"{where} has labels of shape {shape} per sample but with loss {loss!r} and outputs "
                f"{per_sample} per sample they must have shape {per_sample[1:]} (one class index per "
                f"{'sample' if not per_sample[1:] else 'position'}); fix the labels or the last layer"
            )
        if hi is not None and hi >= classes:
            raise LabelError(
                f"dataset {dataset!r} has label {int(hi)} but the model has only {classes} outputs "
                f"(classes 0..{classes - 1}); widen the last layer or fix the labels"
            )
        if lo is not None and lo < 0:
            raise LabelError(f"dataset {dataset!r} has label {int(lo)}; class labels must be >= 0")
        return
    # element-wise losses: the target has the output's shape (or one value per sample for (B, 1))
    if shape != per_sample and per_sample != (*shape, 1):
        want = per_sample if per_sample != (1,) else "() or (1,)"
        raise LabelError(
            f"{where} has labels of shape {shape} per sample but the model outputs {per_sample} per "
            f"sample; loss {loss!r} compares them element by element, so the labels must have shape "
            f"{want} per sample: make the last layer output {shape or (1,)} values per sample, or "
            f"reshape the labels"
        )
    if loss == "bce_with_logits" and lo is not None and hi is not None and (lo < 0 or hi > 1):
        raise LabelError(
            f"{where} has targets in [{lo:g}, {hi:g}] but loss 'bce_with_logits' needs 0/1 labels or "
            f"probabilities in [0, 1]; use loss='mse' for regression targets"
        )
