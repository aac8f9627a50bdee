"""Handles to things that live at a worker.

The orchestrator never holds a party's tensors: it holds these small handles and
passes them to the worker that needs the tensor, which fetches it from its owner
(peer to peer) and records the transfer in the ledger.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from splitnn.data.batching import BatchDraw


def fresh_name(prefix: str) -> str:
    """``prefix`` followed by 64 random bits in hex: a segment key or dataset name that two models,
    two processes or two researchers cannot both pick (unlike a counter), and nobody can guess."""
    return f"{prefix}{secrets.token_hex(8)}"


@dataclass(frozen=True)
class TensorRef:
    """A tensor stored at worker ``owner`` under ``id``.

    ``fused`` marks a gradient that in-process workers already propagated
    through one autograd graph (see :class:`~splitnn.workers.VirtualWorker`);
    the receiver has nothing left to do with it.
    """

    owner: str
    id: int
    fused: bool = False


@dataclass(frozen=True)
class BatchRef:
    """Rows ``indices`` of the dataset ``dataset`` held locally by whichever worker reads it.

    ``draw`` is how the rows were drawn (:class:`~splitnn.data.batching.BatchDraw`; by default the
    one :func:`~splitnn.data.epoch_batches` attached to ``indices``, if any): a data holder whose
    policy draws its own rows (``draw_rows``) re-derives them from it and ignores ``indices``.
    """

    dataset: str
    indices: torch.Tensor
    draw: BatchDraw | None = None

    def __post_init__(self) -> None:
        if self.draw is None:
            draw = getattr(self.indices, "draw", None)
            if isinstance(draw, BatchDraw):
                object.__setattr__(self, "draw", draw)

    def __len__(self) -> int:
        return int(self.indices.numel())


@dataclass(frozen=True)
class LossStats:
    """What the label holder reports for one batch: mean loss, correct predictions, batch size."""

    loss: float
    correct: int
    count: int


@dataclass(frozen=True)
class DatasetStats:
    """Public facts about a dataset held at a worker (never its contents).

    The label fields summarise the labels so that the researcher can check them against
    the loss and the model before training (:func:`splitnn.workers.losses.check_labels`; on the
    wire: :func:`splitnn.common.serde.dataset_stats_to_result`):
    ``label_dtype`` (``"int64"``, ``"float32"``, ...), ``label_shape`` (per sample, ``()``
    for one label per sample), ``label_min``/``label_max`` (for integer labels: ints) and
    ``label_integral`` (every label is a whole number, e.g. 0/1 targets stored as floats).
    ``feature_dtype`` names the features' dtype (``"float32"``, ``"int64"`` for token ids).
    ``named_features``: for several named feature tensors (:class:`~splitnn.data.sources.NamedFeatures`),
    each one's ``(name, per-sample shape, dtype name)`` in order (``feature_shape`` and ``feature_dtype``
    then describe the first); None for one tensor.
    """

    name: str
    size: int
    feature_shape: tuple[int, ...] | None
    num_labels: int | None
    label_max: int | float | None
    label_min: int | float | None = None
    label_dtype: str | None = None
    label_shape: tuple[int, ...] | None = None
    label_integral: bool | None = None
    feature_dtype: str | None = None
    named_features: tuple[tuple[str, tuple[int, ...], str], ...] | None = None


@dataclass(frozen=True)
class ValueShape:
    """Shape and dtype of one of several values crossing a cut (see :mod:`splitnn.workers.values`).

    A single value is probed by its shape alone (a float tensor, as ever); when several
    values cross, each is described by one of these, so that an integer index or a boolean
    mask is probed with zeros of its own dtype.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
