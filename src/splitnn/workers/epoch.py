"""Shipped epochs: what a worker needs to run a whole training epoch with its peers.

The eager schedule (:mod:`splitnn.split.driver`) issues one worker call per
operation. A worker that implements :class:`~splitnn.workers.base.EpochWorker`
can instead take one :class:`EpochPlan` per epoch and run every batch itself:
it computes the batches from :class:`BatchOrder` (or takes explicit indices),
builds the epoch's schedule (:mod:`splitnn.workers.schedules`: lock-step, or
pipelined with ``pipeline`` batches in flight) from the chain of parties the plan
names, and runs its own actions of it, receiving activations from its previous
party and gradients from its next one -- the same schedule the in-process driver
runs, so the weights are bit-identical.

The researcher watches the epoch through an :class:`EpochHandle`: per-batch
losses from the label holder, then each worker's final report (its ledger
records arrive with it, so per-epoch bytes are exact).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import torch

from splitnn.checks import check_counts, from_wire_fields
from splitnn.data.batching import epoch_batches
from splitnn.errors import ConfigurationError
from splitnn.workers.inflight import check_prediction
from splitnn.workers.refs import LossStats
from splitnn.workers.schedules import Schedule, check_pipeline_depth, schedule

#: Run ids must fit this many bits (they are the high bits of a peer frame's id).
RUN_ID_BITS = 23
#: Where a peer frame's id holds its run id: ``run_of(frame_id) == frame_id >> RUN_SHIFT`` (a receiver shifts inline,
#: once per push).
RUN_SHIFT = 40
MAX_STAGES = 255
MAX_BATCHES = 1 << 32


def push_id(run_id: int, batch: int, cut: int) -> int:
    """The frame id of the tensor crossing cut ``cut`` (after stage ``cut``) in ``batch`` of run ``run_id``.

    Activations and gradients of the same cut share the id; the frame's kind tells them apart.
    """
    return (run_id << RUN_SHIFT) | (batch << 8) | cut


def run_of(frame_id: int) -> int:
    """The run id part of a pushed frame's id."""
    return frame_id >> RUN_SHIFT


def previous_batch(frame_id: int) -> int | None:
    """The frame id of the tensor crossing the same cut in the batch before (None for a run's first batch)."""
    batch = (frame_id >> 8) & (MAX_BATCHES - 1)
    return push_id(run_of(frame_id), batch - 1, frame_id & 0xFF) if batch else None


@dataclass(frozen=True)
class BatchOrder:
    """The batches of one epoch as :func:`splitnn.training.epoch_batches` makes them."""

    n: int
    batch_size: int
    shuffle: bool = True
    seed: int = 0
    epoch: int = 0

    def __post_init__(self) -> None:
        check_counts(self, ("n", "batch_size"), below=1 << 40)
        check_counts(self, ("seed", "epoch"), minimum=0, below=1 << 40, wording="a non-negative integer")
        if not isinstance(self.shuffle, bool):
            raise ConfigurationError(f"BatchOrder.shuffle must be a bool, got {self.shuffle!r}")

    def batches(self) -> list[torch.Tensor]:
        """The index tensors, by the one definition of the data order every party shares."""
        return epoch_batches(self.n, self.batch_size, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch)

    def to_dict(self) -> dict:
        # (its fields are numbers and a bool: no deep copy needed, which ``asdict`` makes at 35 us a plan)
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: object) -> BatchOrder:
        return from_wire_fields(cls, d, "a batch order")


@dataclass(frozen=True)
class StagePlan:
    """One segment a worker runs in a shipped epoch.

    ``prev`` is the party whose activation feeds the segment (``None``: the first
    segment, fed by the worker's own features); ``next`` the party that takes its
    output (``None``: the last segment, whose output the worker scores against its
    labels). Either may be the worker itself (consecutive segments on one party).
    """

    index: int
    key: str
    prev: str | None
    next: str | None


@dataclass(frozen=True)
class EpochPlan:
    """Everything one worker needs to run its part of a training epoch.

    Exactly one of ``order`` (compact: each worker derives the batches) and
    ``indices`` (explicit index tensors, for models that choose their own
    batches) is given. ``progress_interval`` is how often (seconds) the label
    holder reports the losses of the batches it finished.

    ``chain`` is the party of every stage of the model (the schedule is built from it)
    and ``pipeline`` the batches in flight (1: lock-step). A plan without ``chain``
    can only be lock-step: the worker's own stages then tell it all it does.
    ``prediction`` is a pipelined plan's weight prediction (its moving-average factor, see
    :mod:`splitnn.workers.inflight`; None: off).
    """

    run_id: int
    dataset: str
    loss: str
    stages: tuple[StagePlan, ...]
    order: BatchOrder | None = None
    indices: tuple[torch.Tensor, ...] | None = None
    progress_interval: float = 0.05
    chain: tuple[str, ...] | None = None
    pipeline: int = 1
    prediction: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, int) or not 0 < self.run_id < 1 << RUN_ID_BITS:
            raise ConfigurationError(f"run_id must be in 1..{(1 << RUN_ID_BITS) - 1}, got {self.run_id!r}")
        if (self.order is None) == (self.indices is None):
            raise ConfigurationError("an epoch plan needs exactly one of a batch order and explicit indices")
        if not self.stages:
            raise ConfigurationError("an epoch plan needs at least one stage")
        if any(s.index >= MAX_STAGES for s in self.stages):
            raise ConfigurationError(f"shipped epochs support at most {MAX_STAGES} stages")
        if self.num_batches >= MAX_BATCHES:
            raise ConfigurationError(f"too many batches in one epoch (at most {MAX_BATCHES - 1})")
        check_pipeline_depth(self.pipeline)
        check_prediction(self.prediction)
        if self.chain is None:
            if self.pipeline != 1:
                raise ConfigurationError("a pipelined epoch plan needs the chain of parties")
            return
        chain = self.chain
        if not 0 < len(chain) <= MAX_STAGES or not all(isinstance(n, str) and 0 < len(n) <= 64 for n in chain):
            raise ConfigurationError(f"an epoch plan's chain must name the party of each of 1..{MAX_STAGES} stages")
        for st in self.stages:
            if st.index >= len(chain) or (st.prev, st.next) != (
                chain[st.index - 1] if st.index else None,
                chain[st.index + 1] if st.index + 1 < len(chain) else None,
            ):
                raise ConfigurationError(f"stage {st.index} of the epoch plan does not fit its chain {list(chain)}")

    @property
    def num_batches(self) -> int:
        if self.indices is not None:
            return len(self.indices)
        return -(-self.order.n // self.order.batch_size)

    def batches(self) -> list[torch.Tensor]:
        """The index tensors of the epoch's batches, in order."""
        return list(self.indices) if self.indices is not None else self.order.batches()

    @property
    def holds_labels(self) -> bool:
        """Whether this worker runs the last segment (and so computes the losses)."""
        return any(s.next is None for s in self.stages)

    def schedule(self, me: str) -> Schedule:
        """The epoch's schedule, as worker ``me`` sees it (whose stages are :attr:`stages`)."""
        return schedule(self.chain or self._local_chain(me), self.num_batches, self.pipeline)

    def _local_chain(self, me: str) -> tuple[str, ...]:
        """A chain right around ``me``'s stages (all a lock-step party's actions depend on); "?" elsewhere."""
        last = next((s.index for s in self.stages if s.next is None), None)
        chain = ["?"] * ((last + 1) if last is not None else self.stages[-1].index + 2)
        for st in self.stages:
            chain[st.index] = me
            if st.prev is not None:
                chain[st.index - 1] = st.prev
            if st.next is not None:
                chain[st.index + 1] = st.next
        return tuple(chain)


@dataclass
class EpochReport:
    """A worker's account of its part of a finished epoch."""

    worker: str
    batches: int


@dataclass
class EpochHandle:
    """The researcher's view of one worker's running epoch. Thread-safe.

    The worker's transport fills it (:meth:`add_losses`, :meth:`finish`,
    :meth:`fail`) from whatever thread receives the news; ``notify`` is called
    after each change so that one waiter can watch several handles.
    """

    worker: str
    notify: Callable[[], None] | None = None
    error: BaseException | None = None
    report: EpochReport | None = None
    _losses: list[LossStats] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def done(self) -> bool:
        """Finished or failed."""
        return self.report is not None or self.error is not None

    def take_losses(self) -> list[LossStats]:
        """The per-batch losses reported since the last call, in batch order."""
        with self._lock:
            out, self._losses = self._losses, []
        return out

    def add_losses(self, losses: Sequence[LossStats]) -> None:
        with self._lock:
            self._losses.extend(losses)
        self._changed()

    def finish(self, report: EpochReport) -> None:
        if self.done:
            return
        self.report = report
        self._changed()

    def fail(self, error: BaseException) -> None:
        if self.done:
            return
        self.error = error
        self._changed()

    def _changed(self) -> None:
        if self.notify is not None:
            self.notify()
