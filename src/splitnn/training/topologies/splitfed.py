"""SplitFed: many data holders train in parallel and average their bottom segments (Thapa et al. 2022).

:class:`SplitFedSplitNN` (its docstring describes rounds, averaging and concurrency) and the checks of the
capabilities its workers need.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from splitnn.accounting import Ledger
from splitnn.data import PartitionSpec
from splitnn.errors import ConfigurationError
from splitnn.split import bind_workers
from splitnn.split.driver import forward_chain
from splitnn.split.fit import check_positive
from splitnn.split.stage import Stage, check_static_fit, declare_adjacency
from splitnn.split.trainable import Batches, OnBatch
from splitnn.training.topologies.base import (
    as_optimizer_list,
    check_bottom_and_top,
    new_prefix,
    place,
)
from splitnn.training.topologies.gates import WeightFlow
from splitnn.training.topologies.horizontal import HolderShards, Partitioner, ShardedTopology
from splitnn.training.topologies.lanes import Turnstile, run_lanes
from splitnn.workers import AveragingWorker, BatchRef, LossStats, PeerStateWorker, Worker
from splitnn.workers.losses import Loss, check_loss_at

#: The SplitFed variants.
VARIANTS: tuple[str, ...] = ("v1", "v2")

_TO_AGGREGATOR = "SplitFed sends every data holder's bottom segment to the aggregator at the end of every round"
_FROM_AGGREGATOR = "SplitFed sends the averaged bottom segment back to every data holder at the end of every round"

# Added to the epoch's seed for v2's serving order, so it is not the stream of holder 0's data order.
_ORDER_SEED_OFFSET = 104_729


class SplitFedSplitNN(ShardedTopology):
    """``K`` data holders train in parallel; their bottom segments are averaged every round.

    Each holder owns a shard of the samples (placed as :mod:`~splitnn.training.topologies.horizontal`
    describes) and a copy of the bottom segment (same initial weights); the label holder (with any other
    top workers) owns the rest and every shard's labels. A round is a holder's whole shard (the default)
    or ``round_batches`` batches of each holder; rounds do not span epochs. With ``variant="v1"`` the top
    workers keep one top copy per holder (averaged too, at their workers); with ``"v2"`` one top segment
    serves the holders in turns of one batch (step ``j`` of every holder before step ``j + 1`` of any),
    in a random order per round: one ``randperm(K)`` per round from
    ``torch.Generator().manual_seed(seed * 1_000_003 + epoch + 104_729)`` (:meth:`epoch_plan` lists that order).

    At the end of a round every holder that trained sends its bottom's weights to the aggregator, which
    loads ``sum_h n_h W_h / sum_h n_h`` (``n_h``: the samples holder ``h`` trained on in the round) and
    sends it back (``weights`` in the ledger); only weights are averaged, each copy keeps its optimizer.
    With one holder nothing is averaged and training is the plain chain's, bit for bit. ``parallel``
    runs each holder's steps on a thread of its own (the top workers serve one holder at a time;
    :mod:`~splitnn.training.topologies.lanes`); the weights are the same either way. See docs/splitfed.md.

    Args:
        bottom: the first segment; every holder gets its own copy (same initial weights;
            holder 0 hosts this very module).
        top: the remaining segments, in order (at least one).
        holders: the ``K`` data holders, distinct parties.
        top_workers: the worker of each top segment, or one worker for all; the last one is
            the label holder.
        variant: ``"v1"`` (one top copy per holder, averaged every round) or ``"v2"`` (one
            top segment, served holder by holder).
        aggregator: the worker that averages the bottom segments (default: the label
            holder); not a data holder.
        round_batches: batches of each holder per round; ``None`` (default): a holder's
            whole shard, one round per epoch.
        partition: ``"iid"``, ``"dirichlet:<alpha>"``, a :class:`~splitnn.data.PartitionSpec`,
            or a callable ``(labels, k, seed) -> index tensors``.
        partition_seed: seed of the partitioner.
        optimizer: one factory/spec for every segment, or a list of ``1 + len(top)`` (the
            bottom's first); every copy gets its own optimizer.
        loss: the label holder's loss (a name, or a callable the label holder may run).
        parallel: run the holders' steps on threads (``True``) or in plan order on one thread
            (``False``); ``None`` (default): threads when there are two or more holders. The
            weights are the same either way.
        ledger: where transfers are recorded (default: the first holder's).

    Raises:
        ConfigurationError: before any work, for an invalid arrangement or a worker that
            lacks a capability SplitFed needs.
    """

    def __init__(
        self,
        bottom: nn.Module,
        top: Sequence[nn.Module],
        holders: Sequence[Worker],
        top_workers: Worker | Sequence[Worker],
        *,
        variant: str = "v1",
        aggregator: Worker | None = None,
        round_batches: int | None = None,
        partition: str | PartitionSpec | Partitioner = "iid",
        partition_seed: int = 0,
        optimizer: object = "sgd:lr=0.03",
        loss: Loss = "nll",
        parallel: bool | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        bottom, top, holders, top_workers = check_bottom_and_top(bottom, top, holders, top_workers)
        holder_names = {h.name for h in holders}
        if variant not in VARIANTS:
            raise ConfigurationError(f"unknown SplitFed variant {variant!r}; choose one of {VARIANTS}")
        check_positive("round_batches", round_batches, none_means="one round per epoch")
        if parallel is not None and not isinstance(parallel, bool):
            raise ConfigurationError(f"parallel must be True, False or None (automatic), got {parallel!r}")
        aggregator = aggregator if aggregator is not None else top_workers[-1]
        if aggregator.name in holder_names:
            raise ConfigurationError(
                f"the aggregator {aggregator.name!r} is a data holder; it would see every other holder's "
                f"bottom weights: pick the label holder or a third party"
            )
        self.loss = check_loss_at(loss, top_workers[-1])
        optimizers = as_optimizer_list(optimizer, 1 + len(top))
        check_static_fit([bottom, *top], [holders[0].name, *(w.name for w in top_workers)])
        self._shards = HolderShards(holders, top_workers[-1], partition, partition_seed)  # checks the partition
        if len(holders) > 1:
            _require_capabilities(holders, top_workers, aggregator, variant)

        self.variant = variant
        self.round_batches = round_batches
        self.holders = holders
        self.top_workers = top_workers
        self.aggregator = aggregator
        self.partition = self._shards.partition
        self.partition_seed = self._shards.partition_seed
        everyone = [*holders, *top_workers, aggregator]
        self.parallel = parallel if parallel is not None else len(holders) > 1
        self.ledger = bind_workers(everyone, ledger)

        prefix = new_prefix("splitfed")
        self._bottoms: list[Stage] = []
        for h, holder in enumerate(holders):
            seg = bottom if h == 0 else copy.deepcopy(bottom)
            self._bottoms.append(place(f"{prefix}.h{h}", 0, [seg], [holder], optimizers[:1])[0])
        if variant == "v1":  # one top copy per holder, each with its own optimizer
            self._tops = [
                place(f"{prefix}.h{h}", 1, top if h == 0 else copy.deepcopy(list(top)), top_workers, optimizers[1:])
                for h in range(len(holders))
            ]
        else:
            self._tops = [place(prefix, 1, top, top_workers, optimizers[1:])]
        # who hands tensors to whom: each holder and the first top worker, the top chain, each holder and the aggregator
        pairs = [(h, top_workers[0]) for h in holders] + list(zip(top_workers, top_workers[1:]))
        declare_adjacency(pairs + ([(h, aggregator) for h in holders] if len(holders) > 1 else []))
        self._slots: list[str] = []
        self._average_key = f"{prefix}.average"
        if len(holders) > 1:  # where the holders' bottoms arrive at the aggregator, and their average
            self._slots = [f"{prefix}.aggregate.h{h}" for h in range(len(holders))]
            for key in [*self._slots, self._average_key]:
                aggregator.add_segment(key, copy.deepcopy(bottom), None)
        # Samples each holder trained on since the last average (the averaging weights).
        self._pending = [0] * len(holders)
        self.rounds = 0  #: rounds completed (averages taken, or would-be averages with one holder)

    # -- who is who -------------------------------------------------------------------------
    def parties(self) -> list[str]:
        """Names of the distinct parties: holders, top workers, then a third-party aggregator."""
        return [w.name for w in self.workers()]

    def workers(self) -> list[Worker]:
        """The distinct workers: holders, top workers, then a third-party aggregator."""
        everyone = [*self.holders, *self.top_workers, self.aggregator]
        return list({w.name: w for w in everyone}.values())

    def stages_of(self, holder: int) -> list[Stage]:
        """The chain that trains holder ``holder``'s batches: its bottom, then its (v1) or the (v2) top."""
        return [self._bottoms[holder], *self._tops[holder if self.variant == "v1" else 0]]

    # -- data -------------------------------------------------------------------------------
    def epoch_plan(
        self, dataset: str, n: int, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0
    ) -> list[torch.Tensor]:
        """The batches of one epoch, round by round, in the order the label holder serves them.

        Holder ``h`` visits its shard in the order of
        ``epoch_batches(size_h, batch_size, seed=seed + 7919 * h, epoch=epoch)``. Round ``r``
        holds batches ``r N .. (r+1) N - 1`` of every holder (``N = round_batches``, or all of
        them); within a round, step ``j`` of every holder comes before step ``j + 1`` of any,
        holders in order ``0 .. K-1`` (v1) or in the round's random order (v2; see the module
        docstring). Indices are in the shard-after-shard numbering of :meth:`prepare`.
        """
        return [batch for round_ in self._plan_rounds(dataset, n, batch_size, shuffle, seed, epoch) for batch in round_]

    def serving_orders(self, rounds: int, *, seed: int = 0, epoch: int = 0) -> list[list[int]]:
        """The order in which the holders are served in each of an epoch's first ``rounds`` rounds."""
        k = len(self.holders)
        if self.variant == "v1":
            return [list(range(k)) for _ in range(rounds)]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch + _ORDER_SEED_OFFSET)
        return [torch.randperm(k, generator=gen).tolist() for _ in range(rounds)]

    def _plan_rounds(
        self, dataset: str, n: int, batch_size: int, shuffle: bool, seed: int, epoch: int
    ) -> list[list[torch.Tensor]]:
        per_holder = self._shards.holder_batches(dataset, n, batch_size, shuffle=shuffle, seed=seed, epoch=epoch)
        longest = max(len(b) for b in per_holder)
        size = self.round_batches or longest
        starts = range(0, longest, size)
        rounds = []
        for start, order in zip(starts, self.serving_orders(len(starts), seed=seed, epoch=epoch)):
            rounds.append(
                [
                    per_holder[h][j]
                    for j in range(start, min(start + size, longest))
                    for h in order
                    if j < len(per_holder[h])
                ]
            )
        return rounds

    # -- training ---------------------------------------------------------------------------
    def train_batch(self, dataset: str, indices: torch.Tensor) -> LossStats:
        """One optimisation step at the holder that owns rows ``indices``, with its chain; no averaging.

        A round ends with :meth:`average`; :meth:`train_epoch` (what :func:`~splitnn.training.fit`
        uses) calls it at the end of every round.
        """
        h, local = self._shards.one_holder(dataset, indices)
        stats = self._step(h, BatchRef(self.shard_name(dataset, h), local), nullcontext())
        self._pending[h] += stats.count
        return stats

    def train_batches(self, dataset: str, batches: Batches, on_batch: OnBatch) -> None:
        """Train an epoch's batches round by round, averaging at the end of every round
        (what :meth:`train_epoch`, and so :func:`~splitnn.training.fit`, runs).

        A batch belongs to round ``i // round_batches`` where ``i`` counts the earlier batches
        of the same holder (round 0 for all when a round is an epoch); within a round the
        batches run in their order in ``batches`` (:meth:`epoch_plan`'s is the serving
        order). ``on_batch`` gets each batch's stats in that order.
        """
        rounds = self._group_rounds(dataset, batches)  # checks every batch before any training
        self.check_gates()
        pool = ThreadPoolExecutor(len(self.holders), thread_name_prefix="splitfed") if self.parallel else None
        try:
            for items in rounds:
                self._train_round(items, on_batch, pool)
                self.average()
        finally:
            if pool is not None:
                pool.shutdown()

    def average(self) -> None:
        """End a round: average the bottoms (and v1's top copies) over the holders that trained since the last one.

        Weighted by the samples each holder trained on; every holder (and top copy) then holds
        the average. Nothing happens with one holder.
        """
        weights, self._pending = self._pending, [0] * len(self.holders)
        if not any(weights):
            return
        self.rounds += 1
        if len(self.holders) == 1:
            return
        trained = [h for h, w in enumerate(weights) if w > 0]
        counts = [float(weights[h]) for h in trained]
        agg = self.aggregator
        for h in trained:
            stage = self._bottoms[h]
            stage.worker.send_state(stage.key, agg.name, dst_key=self._slots[h])
        agg.average_states([self._slots[h] for h in trained], counts, into=[self._average_key])
        for stage in self._bottoms:
            agg.send_state(self._average_key, stage.worker.name, dst_key=stage.key)
        if self.variant == "v1":
            for i, worker in enumerate(self.top_workers):
                keys = [chain[i].key for chain in self._tops]
                worker.average_states([keys[h] for h in trained], counts, into=keys)

    def _group_rounds(self, dataset: str, batches: Sequence[torch.Tensor]) -> list[list[tuple[int, BatchRef]]]:
        seen = [0] * len(self.holders)
        rounds: dict[int, list[tuple[int, BatchRef]]] = {}
        for idx in batches:
            h, local = self._shards.one_holder(dataset, idx)
            r = seen[h] // self.round_batches if self.round_batches else 0
            seen[h] += 1
            rounds.setdefault(r, []).append((h, BatchRef(self.shard_name(dataset, h), local)))
        return [rounds[r] for r in sorted(rounds)]

    def _train_round(
        self,
        items: list[tuple[int, BatchRef]],
        on_batch: Callable[[LossStats], None],
        pool: ThreadPoolExecutor | None,
    ) -> None:
        def done(h: int, stats: LossStats) -> None:
            self._pending[h] += stats.count
            on_batch(stats)

        if pool is None:
            for h, batch in items:
                done(h, self._step(h, batch, nullcontext()))
            return
        # v2's one top segment must see the batches in the round's order; v1's copies are independent.
        gate = Turnstile(ordered=self.variant == "v2")
        lanes: list[list] = [[] for _ in self.holders]
        for position, (h, batch) in enumerate(items):
            lanes[h].append((position, _bind(self._step, h, batch, gate, position)))
        run_lanes(pool, lanes, gate, lambda position, stats: done(items[position][0], stats))

    def _step(self, h: int, batch: BatchRef, gate: AbstractContextManager) -> LossStats:
        """One training step of holder ``h``; the top part runs inside ``gate`` (the shared parties)."""
        bottom, *top = self.stages_of(h)
        holder = bottom.worker
        holder.zero_grad(bottom.key)
        activation = holder.forward(bottom.key, batch, train=True)
        if self.parallel:  # a networked holder's forward goes out now and runs while this thread waits at the gate
            _flush(holder)
        with gate:
            for stage in top:
                stage.worker.zero_grad(stage.key)
            out = forward_chain(top, activation, train=True)
            stats = _loss_later(top[-1].worker, out, batch, self.loss)
            grad = None
            for stage in reversed(top):
                grad = stage.worker.backward(stage.key, grad)
            for stage in top:
                stage.worker.step(stage.key)
        # outside the gate: a networked label holder's loss is awaited while the next holder's step queues there
        holder.backward(bottom.key, grad)
        holder.step(bottom.key)
        return stats()

    def weight_flows(self) -> list[WeightFlow]:
        """Where the bottoms' weights go: every holder's to the aggregator, the average back (none with one holder)."""
        if len(self.holders) < 2:
            return []
        to = [WeightFlow(h, self.aggregator, _TO_AGGREGATOR) for h in self.holders]
        return to + [WeightFlow(self.aggregator, h, _FROM_AGGREGATOR) for h in self.holders]

    # -- evaluation and results -------------------------------------------------------------
    def collect(self) -> nn.Sequential:
        """Holder 0's chain (bottom, then its or the top) as one ``nn.Sequential`` (recorded as weights).

        After a round every holder's chain is the same averaged network.
        """
        return self._collect_chain(0)

    def __repr__(self) -> str:
        holders = ", ".join(w.name for w in self.holders)
        top = " -> ".join(s.label for s in self._tops[0])
        return (
            f"SplitFedSplitNN({self.variant}; [{holders}] -> {top}; aggregator {self.aggregator.name}; "
            f"{'round of ' + str(self.round_batches) + ' batches' if self.round_batches else 'round = epoch'})"
        )


def _bind(step: Callable[..., LossStats], h: int, batch: BatchRef, gate: Turnstile, position: int):
    """``step(h, batch, gate.serve(position))`` as a job (bound now, not when the loop variable changes)."""
    return lambda: step(h, batch, gate.serve(position))


def _loss_later(worker: Worker, output, batch: BatchRef, loss: Loss) -> Callable[[], LossStats]:
    """The label holder's training loss, as a function giving its stats: sent without waiting where the worker can
    (a networked one: ``loss_deferred``), so that its round trip is not spent inside the gate; else computed now."""
    deferred = getattr(worker, "loss_deferred", None)
    if callable(deferred):
        return deferred(output, batch, loss, train=True)
    stats = worker.loss(output, batch, loss, train=True)
    return lambda: stats


def _flush(worker: Worker) -> None:
    """Put a pipelining (networked) worker's queued commands on the wire; nothing for in-process workers."""
    flush = getattr(worker, "flush", None)
    if callable(flush):
        flush()


def _require_capabilities(
    holders: Sequence[Worker], top_workers: Sequence[Worker], aggregator: Worker, variant: str
) -> None:
    """Refuse, before any work, a worker that lacks what averaging needs (naming the method)."""
    needs: list[tuple[Worker, type, str, str]] = [
        (h, PeerStateWorker, "send_state", "every data holder (to send its bottom to the aggregator)") for h in holders
    ]
    needs.append((aggregator, PeerStateWorker, "send_state", "the aggregator (to send the average back)"))
    needs.append((aggregator, AveragingWorker, "average_states", "the aggregator (to average the bottoms)"))
    if variant == "v1":
        needs += [
            (w, AveragingWorker, "average_states", "every top worker with v1 (to average its top copies)")
            for w in top_workers
        ]
    for worker, capability, method, who in needs:
        if not isinstance(worker, capability):
            raise ConfigurationError(
                f"worker {worker.name!r} lacks {method}; SplitFed with more than one data holder needs it at "
                f"{who} (VirtualWorker and the networked RemoteWorker have it; see docs/splitfed.md)"
            )
