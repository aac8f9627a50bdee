"""Many data holders, one label holder: horizontal split learning with round-robin turns.

:class:`MultiHolderSplitNN` and the record of a hand-off of the bottom weights (:class:`HandOff`);
datasets are placed as :mod:`splitnn.training.topologies.horizontal` describes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from splitnn.accounting import Ledger
from splitnn.data import PartitionSpec
from splitnn.errors import ConfigurationError
from splitnn.split import bind_workers
from splitnn.split.driver import train_step
from splitnn.split.fit import check_positive
from splitnn.split.stage import Slot, Stage, check_static_fit, declare_adjacency, slot_label
from splitnn.training.topologies.base import (
    as_optimizer_list,
    check_bottom_and_top,
    new_prefix,
    place,
)
from splitnn.training.topologies.gates import WeightFlow
from splitnn.training.topologies.horizontal import HolderShards, Partitioner, ShardedTopology
from splitnn.workers import BatchRef, LossStats, PeerStateWorker, Worker
from splitnn.workers.losses import Loss, check_loss_at

#: How the bottom segment's weights pass between data holders.
Handoff = Literal["peer", "central"]
HANDOFF_MODES: tuple[str, ...] = ("peer", "central")


@dataclass(frozen=True)
class HandOff:
    """One transfer of the bottom segment's weights from ``src`` to ``dst``.

    ``reason`` is ``"turn"`` (the next holder's turn to train) or
    ``"evaluate"`` (a holder evaluates its shard of a dataset).
    """

    src: str
    dst: str
    reason: str


class MultiHolderSplitNN(ShardedTopology):
    """``K`` data holders take turns training the bottom segment; one label holder owns the top.

    Each holder trains on its own shard for one turn, then the bottom segment's weights pass to
    the next holder (``send_state``, recorded as ``weights`` bytes), directly (``"peer"``) or
    through a weight store (``"central"``). Hand-offs are lazy: a holder receives the weights
    when it next has to compute. Each holder keeps its own optimizer; only the weights move.

    A training batch holds samples of one holder only: :meth:`epoch_plan` builds the epoch's
    batches that way, and :func:`~splitnn.training.fit` asks for it.

    Args:
        bottom: the first segment; every holder gets its own copy (same initial
            weights; holder 0 hosts this very module).
        top: the remaining segments, in order (at least one).
        holders: the ``K`` data holders, distinct parties.
        top_workers: the worker of each top segment, or one worker for all; the
            last one is the label holder.
        handoff: ``"peer"`` (holder ``i`` to holder ``i+1``) or ``"central"`` (holder ``i``
            to the weight store, the store to holder ``i+1``).
        store: the weight store for ``central`` hand-offs (default: the label
            holder); must not be a data holder.
        turn_batches: batches per turn; ``None`` (default): a holder's whole
            shard per turn, i.e. one turn per holder per epoch.
        partition: ``"iid"``, ``"dirichlet:<alpha>"``, a
            :class:`~splitnn.data.PartitionSpec`, or a callable
            ``(labels, k, seed) -> index tensors``.
        partition_seed: seed of the partitioner.
        optimizer: one factory/spec for every segment, or a list of
            ``1 + len(top)`` (the bottom's first; every holder gets its own).
        loss: the label holder's loss, by name.
        ledger: where transfers are recorded (default: the first holder's).

    Raises:
        ConfigurationError: before any work, for an invalid arrangement.
    """

    def __init__(
        self,
        bottom: nn.Module,
        top: Sequence[nn.Module],
        holders: Sequence[Worker],
        top_workers: Worker | Sequence[Worker],
        *,
        handoff: str = "peer",
        store: Worker | None = None,
        turn_batches: int | None = None,
        partition: str | PartitionSpec | Partitioner = "iid",
        partition_seed: int = 0,
        optimizer: object = "sgd:lr=0.03",
        loss: Loss = "nll",
        ledger: Ledger | None = None,
    ) -> None:
        bottom, top, holders, top_workers = check_bottom_and_top(bottom, top, holders, top_workers)
        if handoff not in HANDOFF_MODES:
            raise ConfigurationError(f"unknown handoff {handoff!r}; choose one of {HANDOFF_MODES}")
        if store is not None and handoff != "central":
            raise ConfigurationError("a weight store is used only with handoff='central'")
        if store is not None and store.name in {h.name for h in holders}:
            raise ConfigurationError(
                f"the weight store {store.name!r} is a data holder; pick the label holder or a third party"
            )
        check_positive("turn_batches", turn_batches, none_means="one turn per epoch")
        self._shards = HolderShards(holders, top_workers[-1], partition, partition_seed)  # checks the partition
        self.partition = self._shards.partition
        self.partition_seed = self._shards.partition_seed
        self.handoff = handoff
        self.turn_batches = turn_batches
        self.loss = check_loss_at(loss, top_workers[-1])
        optimizers = as_optimizer_list(optimizer, 1 + len(top))
        check_static_fit([bottom, *top], [holders[0].name, *(w.name for w in top_workers)])

        self.store: Worker | None = (store or top_workers[-1]) if handoff == "central" else None
        everyone = [*holders, *top_workers, *([self.store] if self.store is not None else [])]
        self.ledger = bind_workers(everyone, ledger)
        if len(holders) > 1:
            for w in [*holders, *([self.store] if self.store is not None else [])]:
                if not isinstance(w, PeerStateWorker):
                    raise ConfigurationError(
                        f"worker {w.name!r} cannot hand weights to a peer (it lacks send_state); "
                        f"multi-holder training needs it at every holder and the store"
                    )

        prefix = new_prefix("multi")
        self.holders = holders
        self.top_workers = top_workers
        self._top = place(prefix, 1, top, top_workers, optimizers[1:])
        self._bottoms: list[Stage] = []
        for h, holder in enumerate(holders):
            seg = bottom if h == 0 else copy.deepcopy(bottom)
            self._bottoms.append(place(f"{prefix}.h{h}", 0, [seg], [holder], optimizers[:1])[0])
        self._store_key = f"{prefix}.store"
        self._modules = {"top": list(top), "bottom": bottom}  # for checkpoints: the segments' fingerprints
        if self.store is not None:
            self.store.add_segment(self._store_key, copy.deepcopy(bottom), None)
        # who hands tensors to whom: each holder and the first top worker; holders in turn (or via the store)
        pairs = [(h, top_workers[0]) for h in holders] + list(zip(top_workers, top_workers[1:]))
        if self.store is None:  # turns go round the ring; an evaluation brings any holder up to date from any
            pairs += [(a, b) for i, a in enumerate(holders) for b in holders[i + 1 :]]
        else:
            pairs += [(h, self.store) for h in holders]
        declare_adjacency(pairs)
        # Weight versions: which holder (and the store) has the latest bottom weights.
        self._latest = 0
        self._versions = [0] * len(holders)
        self._store_version = 0
        self._active = 0
        self.handoffs: list[HandOff] = []

    # -- who is who -------------------------------------------------------------------------
    def parties(self) -> list[str]:
        """Names of the distinct parties: holders, top workers, then a third-party store."""
        names = [w.name for w in (*self.holders, *self.top_workers)]
        if self.store is not None:
            names.append(self.store.name)
        return list(dict.fromkeys(names))

    def workers(self) -> list[Worker]:
        """The distinct workers: holders, top workers, then a third-party store."""
        everyone = [*self.holders, *self.top_workers, *([self.store] if self.store is not None else [])]
        return list({w.name: w for w in everyone}.values())

    def stages_of(self, holder: int) -> list[Stage]:
        """The chain that trains when holder ``holder`` has the turn: its bottom, then the top."""
        return [self._bottoms[holder], *self._top]

    # -- batches ----------------------------------------------------------------------------
    def epoch_plan(
        self, dataset: str, n: int, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0
    ) -> list[torch.Tensor]:
        """The batches of one epoch, holder by holder in round-robin turns.

        Holder ``h`` visits its shard in the order of
        ``epoch_batches(size_h, batch_size, seed=seed + 7919 * h, epoch=epoch)``;
        a turn is ``turn_batches`` of its batches (default: all of them). Turns
        go holder 0, 1, ..., K-1, 0, ... until every shard is done. Indices are
        in the shard-after-shard numbering of :meth:`prepare`.
        """
        per_holder = self._shards.holder_batches(dataset, n, batch_size, shuffle=shuffle, seed=seed, epoch=epoch)
        turn = self.turn_batches or max(len(b) for b in per_holder)
        plan: list[torch.Tensor] = []
        for start in range(0, max(len(b) for b in per_holder), turn):
            for batches in per_holder:
                plan.extend(batches[start : start + turn])
        return plan

    # -- training ---------------------------------------------------------------------------
    def train_batch(self, dataset: str, indices: torch.Tensor) -> LossStats:
        """One optimisation step at the holder that owns rows ``indices`` (it gets the latest weights first)."""
        h, local = self._shards.one_holder(dataset, indices)
        self._bring_up_to_date(h, "turn")
        stats = train_step(self.stages_of(h), BatchRef(self.shard_name(dataset, h), local), self.loss)
        self._latest += 1
        self._versions[h] = self._latest
        self._active = h
        return stats

    def _before_evaluating(self, holder: int) -> None:
        """Each holder evaluates with the latest weights."""
        self._bring_up_to_date(holder, "evaluate")

    def weight_flows(self) -> list[WeightFlow]:
        """Where the bottom's weights go: holder to holder (``"peer"``), or holder to store and back
        (``"central"``); none with one holder."""
        holders = self.holders if len(self.holders) > 1 else []
        if self.store is None:
            why = "turn-taking hands the bottom segment's weights to the next data holder at every turn"
            return [WeightFlow(a, b, why) for a in holders for b in holders if a.name != b.name]
        why = "turn-taking hands the bottom segment's weights through the weight store at every turn"
        return [f for h in holders for f in (WeightFlow(h, self.store, why), WeightFlow(self.store, h, why))]

    def _bring_up_to_date(self, h: int, reason: str) -> None:
        """Hand the latest bottom weights to holder ``h`` unless it has them already."""
        if self._versions[h] == self._latest:
            return
        src, dst = self._bottoms[self._active], self._bottoms[h]
        if self.store is None:
            src.worker.send_state(src.key, dst.worker.name, dst_key=dst.key)
            self.handoffs.append(HandOff(src.worker.name, dst.worker.name, reason))
        else:
            if self._store_version != self._latest:
                src.worker.send_state(src.key, self.store.name, dst_key=self._store_key)
                self.handoffs.append(HandOff(src.worker.name, self.store.name, reason))
                self._store_version = self._latest
            self.store.send_state(self._store_key, dst.worker.name, dst_key=dst.key)
            self.handoffs.append(HandOff(self.store.name, dst.worker.name, reason))
        self._versions[h] = self._latest

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint_segments(self) -> list[Slot]:
        """Every segment with its checkpoint label: each holder's bottom (``h0.s0``, ...), the top
        (``s1``, ...) and the weight store's copy (``store``)."""
        slots = [Slot(slot_label(st.key), st.worker, st.key, self._modules["bottom"]) for st in self._bottoms]
        slots += [Slot(slot_label(st.key), st.worker, st.key, m) for st, m in zip(self._top, self._modules["top"])]
        if self.store is not None:
            slots.append(Slot(slot_label(self._store_key), self.store, self._store_key, self._modules["bottom"]))
        return slots

    def checkpoint_state(self) -> dict:
        """Which holder (and the store) has the latest bottom weights, and the hand-offs so far."""
        return {
            "latest": self._latest,
            "versions": list(self._versions),
            "store_version": self._store_version,
            "active": self._active,
            "handoffs": [[h.src, h.dst, h.reason] for h in self.handoffs],
        }

    def restore_checkpoint_state(self, state: dict) -> None:
        """Continue from :meth:`checkpoint_state`'s record (the weights are the parties' to restore)."""
        if len(state["versions"]) != len(self._versions):
            raise ConfigurationError(
                f"the checkpoint has {len(state['versions'])} data holders' weight versions; this model has "
                f"{len(self._versions)} holders"
            )
        self._latest, self._versions = int(state["latest"]), [int(v) for v in state["versions"]]
        self._store_version, self._active = int(state["store_version"]), int(state["active"])
        self.handoffs = [HandOff(*h) for h in state["handoffs"]]

    # -- results ----------------------------------------------------------------------------
    def collect(self) -> nn.Sequential:
        """The trained network (latest bottom, then the top) as one ``nn.Sequential`` (recorded as weights)."""
        return self._collect_chain(self._active)

    def __repr__(self) -> str:
        holders = ", ".join(w.name for w in self.holders)
        top = " -> ".join(s.label for s in self._top)
        store = f", store at {self.store.name}" if self.store is not None else ""
        return f"MultiHolderSplitNN([{holders}] -> {top}; handoff {self.handoff}{store})"
