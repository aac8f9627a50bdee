"""Losses and metrics, computed where the labels are (:mod:`splitnn.workers.losses`, :mod:`.metrics`).

State: ``_pending_loss`` (a training loss waiting for its backward, kept by the segment whose output it was
computed on, so two models or two threads sharing this worker cannot take each other's; a loss on an output no
segment here produced waits under None) and ``_kept`` (outputs kept over evaluations, for their metrics).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from splitnn.errors import WorkerError
from splitnn.workers.engine.hosted import Hosted
from splitnn.workers.losses import Loss, compute_loss
from splitnn.workers.metrics import KeptEvaluations, count_correct
from splitnn.workers.refs import BatchRef, LossStats, TensorRef


class Scoring:
    """The loss of a model's output against the labels held here, and metrics over kept evaluations."""

    def _init_scoring(self) -> None:
        self._pending_loss: dict[str | None, torch.Tensor] = {}
        self._kept = KeptEvaluations()

    def loss(
        self,
        output: TensorRef,
        target: BatchRef,
        loss: Loss,
        *,
        train: bool = True,
        keep: str | None = None,
        divide: int = 1,
    ) -> LossStats:
        out, _ = self._receive(output, "activation", train)
        if type(out) is tuple:
            raise WorkerError(f"worker {self.name!r}: the loss needs one output tensor, got {len(out)} values")
        labels = self._labels(target)
        value = compute_loss(loss, out, labels)
        if divide != 1:  # gradient accumulation: each of ``divide`` batches carries its share
            value = value / divide
        if train:
            if keep is not None:
                raise WorkerError(f"worker {self.name!r}: outputs are kept for metrics in evaluation only")
            self._pending_loss[self._producer(out)] = value
            return LossStats(float(value.item()), -1, len(labels))
        if keep is not None:
            self._kept.add(keep, loss, out, labels)
        return LossStats(float(value.item()), count_correct(loss, out, labels), len(labels))

    def metrics(self, keep: str, names: Sequence[str]) -> dict[str, float]:
        """Metrics ``names`` over the outputs kept under ``keep`` (see :mod:`splitnn.workers.metrics`),
        computed here, where the labels are; the kept outputs are dropped."""
        return self._kept.take(keep, self.name).compute(names)

    def _producer(self, out: torch.Tensor) -> str | None:
        """The key of the segment whose last training forward gave ``out`` (None if none here did)."""
        for k, h in list(self._segments.items()):  # (a snapshot: threads; a loop, not a generator, per batch)
            if h.out is out:
                return k
        return None

    def _pending(self, hosted: Hosted) -> torch.Tensor | None:
        """The training loss waiting for ``hosted``'s backward (or for no segment's), taken."""
        key = None
        for k, h in list(self._segments.items()):
            if h is hosted:
                key = k
                break
        loss = self._pending_loss.pop(key, None)
        return loss if loss is not None else self._pending_loss.pop(None, None)

    def _forget_scores(self) -> None:
        self._pending_loss.clear()
        self._kept.clear()
