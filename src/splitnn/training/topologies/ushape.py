"""U-shaped split learning: the data holder keeps the labels and the last layers.

The data holder owns the first segment (the *head*), the last segment (the
*tail*, which produces the model's output) and the labels; the middle segments
live at other parties. Forward, the head's activation goes to the middle and the
middle's output comes back to the data holder, which runs the tail and computes
the loss locally; backward, the gradient of the middle's output goes to the
middle and the gradient of the head's activation comes back. Neither the
labels nor the tail's output ever leave the data holder.

This is a :class:`~splitnn.split.SplitNN` over ``[head, *middle, tail]`` on
``[data_holder, *middle_workers, data_holder]``, with the arrangement checked
and the data placed correctly (features and labels at the same party).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from splitnn.accounting import Ledger
from splitnn.errors import ConfigurationError
from splitnn.split import SplitNN
from splitnn.split.trainable import Batches, OnBatch
from splitnn.training.topologies.base import Topology, as_worker_list, check_modules
from splitnn.workers import LossStats, Worker
from splitnn.workers.losses import Loss


class UShapedSplitNN(Topology):
    """Head and tail at the data holder (with the labels), the middle elsewhere.

    Args:
        head: the first segment, at the data holder.
        middle: the middle segments (at least one), at other parties.
        tail: the last segment (the output layer), at the data holder.
        data_holder: the party that holds the features and the labels.
        middle_workers: one worker per middle segment, or one worker for all;
            none of them may be the data holder.
        optimizer: one factory/spec for every segment, or one per segment
            (head, middle..., tail).
        loss: the loss the data holder computes (a name, or in-process a callable).
        ledger: where transfers are recorded.
        weight_prediction: pipelined training's weight prediction (see :class:`~splitnn.SplitNN`).
    """

    def __init__(
        self,
        head: nn.Module,
        middle: Sequence[nn.Module],
        tail: nn.Module,
        data_holder: Worker,
        middle_workers: Worker | Sequence[Worker],
        *,
        optimizer: object = "sgd:lr=0.03",
        loss: Loss = "nll",
        ledger: Ledger | None = None,
        weight_prediction: bool | float | None = None,
    ) -> None:
        middle = check_modules(middle, "middle segment")
        if not middle:
            raise ConfigurationError("a U-shaped network needs at least one middle segment at another party")
        middle_workers = as_worker_list(middle_workers, len(middle), "middle segments")
        if any(w.name == data_holder.name for w in middle_workers):
            raise ConfigurationError(
                f"the data holder {data_holder.name!r} cannot host a middle segment; give the middle to other parties"
            )
        self.data_holder = data_holder
        self.middle_workers = middle_workers
        self.chain = SplitNN(
            [head, *middle, tail],
            [data_holder, *middle_workers, data_holder],
            optimizer=optimizer,
            loss=loss,
            ledger=ledger,
            weight_prediction=weight_prediction,
        )
        self.ledger = self.chain.ledger
        self.loss = self.chain.loss

    def parties(self) -> list[str]:
        """The data holder, then the middle parties."""
        return self.chain.parties()

    def prepare(self, data: object) -> tuple[str, int]:
        """Place features *and* labels at the data holder (or check a placed dataset); return (name, size)."""
        return self.chain.prepare(data)

    def train_batch(self, dataset: str, indices: torch.Tensor) -> LossStats:
        """One optimisation step on rows ``indices`` (loss at the data holder)."""
        return self.chain.train_batch(dataset, indices)

    def train_epoch(
        self, dataset: str, batches: Batches, on_batch: OnBatch, *, order: dict | None = None, pipeline: int = 1
    ) -> None:
        """Train a whole epoch (:meth:`SplitNN.train_epoch`: networked workers get it shipped; ``pipeline``
        batches in flight)."""
        self.chain.train_epoch(dataset, batches, on_batch, order=order, pipeline=pipeline)

    def train_steps(
        self, dataset: str, batches: Sequence[torch.Tensor], *, clip_grad_norm: float | None = None
    ) -> list[LossStats]:
        """One optimisation step accumulating ``batches``, clipped by the global norm (:meth:`SplitNN.train_steps`)."""
        return self.chain.train_steps(dataset, batches, clip_grad_norm=clip_grad_norm)

    def check_recipe(self) -> None:
        """Refuse the fine-tuning recipe where the workers cannot run it (:meth:`SplitNN.check_recipe`)."""
        self.chain.check_recipe()

    def collect_state(self, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """Every segment's weights under the segments' own names (:meth:`SplitNN.collect_state`)."""
        return self.chain.collect_state(trainable_only=trainable_only)

    def check_pipeline(self, pipeline: int) -> None:
        """Refuse a pipeline depth the workers cannot run (see :meth:`SplitNN.check_pipeline`)."""
        self.chain.check_pipeline(pipeline)

    def workers(self) -> list[Worker]:
        """The data holder, then the middle parties."""
        return list({w.name: w for w in (self.data_holder, *self.middle_workers)}.values())

    @property
    def label_holder(self) -> Worker:
        """The data holder, which also holds the labels."""
        return self.data_holder

    def eval_batch(self, dataset: str, indices: torch.Tensor, *, keep: str | None = None) -> LossStats:
        """Loss and correct count on rows ``indices``, computed at the data holder (``keep``: see ``metrics``)."""
        return self.chain.eval_batch(dataset, indices, keep=keep)

    def check_metrics(self, dataset: str, names: Sequence[str]) -> None:
        """Refuse metrics a prepared dataset cannot have (see :meth:`SplitNN.check_metrics`)."""
        self.chain.check_metrics(dataset, names)

    def checkpoint_segments(self) -> list:
        """Every segment with its checkpoint label, worker and key (:meth:`SplitNN.checkpoint_segments`)."""
        return self.chain.checkpoint_segments()

    def collect(self) -> nn.Sequential:
        """Every trained segment as one ``nn.Sequential`` (recorded as weights to the researcher)."""
        return self.chain.collect()

    def __repr__(self) -> str:
        return f"UShapedSplitNN({self.chain!r})"
