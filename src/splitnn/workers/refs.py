"""Handles to things that live at a worker.

The orchestrator never holds a party's tensors: it holds these small handles and
passes them to the worker that needs the tensor, which fetches it from its owner
(peer to peer) and records the transfer in the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    """Rows ``indices`` of the dataset ``dataset`` held locally by whichever worker reads it."""

    dataset: str
    indices: torch.Tensor

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
    """Public facts about a dataset held at a worker (never its contents)."""

    name: str
    size: int
    feature_shape: tuple[int, ...] | None
    num_labels: int | None
    label_max: int | None


@dataclass(frozen=True)
class ValueShape:
    """Shape and dtype of one of several values crossing a cut (see :mod:`splitnn.workers.values`).

    A single value is probed by its shape alone (a float tensor, as ever); when several
    values cross, each is described by one of these, so that an integer index or a boolean
    mask is probed with zeros of its own dtype.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
