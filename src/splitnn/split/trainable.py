"""Trainable: the base class of every model that :func:`~splitnn.training.fit` and
:func:`~splitnn.training.evaluate` drive (``SplitNN`` and the topologies).

The four methods every model has are abstract; the optional ones have explicit defaults here
(most of them refuse, naming what the model cannot do), so the loops call them without probing.
The one epoch driver (:meth:`Trainable.train_epoch`) and the one drain of pipelined workers
(:func:`drain_workers`) live here too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from splitnn.errors import ConfigurationError
from splitnn.workers import LossStats, Worker

if TYPE_CHECKING:
    from splitnn.accounting import Ledger
    from splitnn.split.fit import EvalResult, History
    from splitnn.split.stage import Slot


#: An epoch's batches: each a tensor of row indices.
Batches = Sequence[torch.Tensor]
#: Called with each batch's stats, in batch order.
OnBatch = Callable[[LossStats], None]


def drain_workers(workers: Iterable[Worker]) -> None:
    """Wait until pipelining (networked) workers have finished their queued steps, so that the ledger holds
    their records; nothing for in-process workers."""
    for worker in dict.fromkeys(workers):
        drain = getattr(worker, "drain", None)
        if callable(drain):
            drain()


class Trainable(ABC):
    """What :func:`~splitnn.training.fit` and :func:`~splitnn.training.evaluate` need from a model.

    Required: a ``ledger`` and :meth:`prepare`, :meth:`train_batch`, :meth:`eval_batch`, :meth:`parties`.
    The other methods have defaults a model overrides where it can do more: its own batch order
    (:meth:`epoch_plan`), a whole epoch at once or several batches in flight (:meth:`train_epoch`,
    :meth:`check_pipeline`), the fine-tuning recipe (:meth:`train_steps`, :meth:`check_recipe`),
    metrics beyond accuracy (:meth:`metrics`, :meth:`check_metrics`) and checkpoints
    (:meth:`checkpoint_segments`, :meth:`checkpoint_state`, :meth:`restore_checkpoint_state`).
    """

    ledger: Ledger
    #: the label holder's loss (a name or a callable); the default metrics and the metrics allowed follow it
    loss: Any = None
    #: each segment's optimizer (factory or spec); the training log reads the learning rates of specs
    optimizer_specs: Sequence[object] = ()

    # -- required -------------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, data: object) -> tuple[str, int]:
        """Place ``data`` at its holders (or check a dataset they hold), before any training; (name, size)."""

    @abstractmethod
    def train_batch(self, dataset: str, indices: torch.Tensor) -> LossStats:
        """One optimisation step on rows ``indices`` of a prepared dataset."""

    @abstractmethod
    def eval_batch(self, dataset: str, indices: torch.Tensor, *, keep: str | None = None) -> LossStats:
        """Loss and correct count on rows ``indices`` (``keep``: the label holder keeps the outputs for
        :meth:`metrics` under that key)."""

    @abstractmethod
    def parties(self) -> list[str]:
        """Names of the distinct parties."""

    # -- who trains -----------------------------------------------------------------------------
    def party_workers(self) -> list[Worker]:
        """Every distinct worker of the model, one per name (fit reconnects and drains them); default none."""
        return []

    # -- an epoch -------------------------------------------------------------------------------
    def epoch_plan(
        self, dataset: str, n: int, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0
    ) -> list[torch.Tensor] | None:
        """The batches of one epoch when the model chooses them (e.g. round-robin turns of several data
        holders); None (the default): :func:`~splitnn.training.epoch_batches` chooses."""
        return None

    def eval_plan(self, dataset: str, n: int, batch_size: int) -> list[torch.Tensor] | None:
        """The batches of an evaluation when the model chooses them (e.g. several data holders' shards, each
        evaluated in batches its holder can draw itself); None (the default): unshuffled
        :func:`~splitnn.training.epoch_batches`."""
        return None

    def check_pipeline(self, pipeline: int) -> None:
        """Refuse, before any work, ``pipeline`` batches in flight this model cannot train (default: lock-step only)."""
        if pipeline != 1:
            raise ConfigurationError(
                f"{type(self).__name__} trains one batch at a time; pipeline={pipeline} needs a split chain "
                "(SplitNN or UShapedSplitNN): leave pipeline=1"
            )

    def train_epoch(
        self, dataset: str, batches: Batches, on_batch: OnBatch, *, order: dict | None = None, pipeline: int = 1
    ) -> None:
        """Train on every batch of an epoch, calling ``on_batch`` with each batch's stats in batch order.

        ``order`` is the ``epoch_batches`` arguments that made ``batches`` (None when the model chose its
        own plan); ``pipeline`` the batches in flight, checked by :meth:`check_pipeline`. The default trains
        :meth:`train_batches` and then waits until pipelining (networked) workers have finished the last step,
        so that the ledger holds the epoch's transfers when this returns (``fit``'s per-epoch bytes are exact).
        """
        self.train_batches(dataset, batches, on_batch)
        drain_workers(self.party_workers())

    def train_batches(self, dataset: str, batches: Batches, on_batch: OnBatch) -> None:
        """Train ``batches`` in order (default: :meth:`train_batch` each), calling ``on_batch`` with their stats."""
        for idx in batches:
            on_batch(self.train_batch(dataset, idx))

    # -- the fine-tuning recipe -----------------------------------------------------------------
    def check_recipe(self) -> None:
        """Refuse, before any work, ``fit(..., accumulate=, clip_grad_norm=)`` (default: the model cannot)."""
        raise ConfigurationError(
            f"{type(self).__name__} cannot accumulate or clip across its parties; accumulate= and clip_grad_norm= "
            "train split chains (SplitNN, UShapedSplitNN)"
        )

    def train_steps(
        self, dataset: str, batches: Sequence[torch.Tensor], *, clip_grad_norm: float | None = None
    ) -> list[LossStats]:
        """One optimisation step accumulating the gradients of ``batches`` (default: refused, :meth:`check_recipe`)."""
        self.check_recipe()
        raise NotImplementedError  # pragma: no cover - check_recipe refuses

    # -- metrics --------------------------------------------------------------------------------
    def check_metrics(self, dataset: str, names: Sequence[str]) -> None:
        """Refuse, before any work, metrics this model cannot compute or a prepared dataset cannot have
        (default: accuracy only)."""
        extra = [m for m in names if m != "accuracy"]
        if extra:
            raise ConfigurationError(
                f"{type(self).__name__} cannot compute metrics {extra} (it has no metrics(keep, names) method); "
                "ask for accuracy only"
            )

    def metrics(self, keep: str, names: Sequence[str]) -> dict[str, float]:
        """Metrics over the outputs the label holder kept during ``eval_batch(..., keep=keep)`` calls."""
        self.check_metrics("", names)
        return {}

    # -- checkpoints ----------------------------------------------------------------------------
    def checkpoint_segments(self) -> list[Slot]:
        """Every segment with its checkpoint label, worker and key (default: the model cannot be checkpointed)."""
        raise ConfigurationError(
            f"{type(self).__name__} cannot be checkpointed: it does not list its segments "
            "(checkpoint_segments()); SplitNN and the topologies of splitnn.training do"
        )

    def checkpoint_state(self) -> dict | None:
        """The model's own state a checkpoint keeps beside the parties' (default: none)."""
        return None

    def restore_checkpoint_state(self, state: dict) -> None:
        """Put back what :meth:`checkpoint_state` returned (default: nothing to put back)."""
        return None

    # -- the loops as methods -------------------------------------------------------------------
    def fit(self, data: object, epochs: int = 1, *, batch_size: int = 64, **kwargs: Any) -> History:
        """Train for ``epochs`` epochs; see :func:`splitnn.training.fit` for the options."""
        from splitnn.split.fit import fit

        return fit(self, data, epochs=epochs, batch_size=batch_size, **kwargs)

    def evaluate(
        self, data: object, *, batch_size: int = 1000, progress: bool = False, metrics: Sequence[str] | None = None
    ) -> EvalResult:
        """Mean loss, ``metrics`` (default: accuracy for classification) and bytes sent per party on ``data``."""
        from splitnn.split.fit import evaluate

        return evaluate(self, data, batch_size=batch_size, progress=progress, metrics=metrics)
