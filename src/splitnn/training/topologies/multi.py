"""Many data holders, one label holder: horizontal split learning with round-robin turns.

``K`` data holders each own a shard of the samples and a copy of the bottom
segment (all copies start from the same weights); the label holder (with any
other top workers) owns the rest of the network and the labels of every shard.
The holders take turns: a holder trains on its own shard for one turn (its
whole shard per epoch, or ``turn_batches`` batches), then the bottom segment's
weights pass to the next holder, so every holder always computes with the
latest bottom weights. The weights travel

* ``peer``: directly from holder ``i`` to holder ``i+1``;
* ``central``: from holder ``i`` to a weight store (the label holder, or a
  third party) and from the store to holder ``i+1``.

Each hand-off is one :meth:`~splitnn.workers.PeerStateWorker.send_state` call,
recorded in the ledger as ``weights`` bytes on the link it really uses.
Hand-offs are lazy: a holder receives the weights when it next has to compute
(its turn, or an evaluation of its test shard), and never when it already has
the latest ones. Only the weights move; each holder keeps its own optimizer
(and its state, e.g. momentum).

Datasets: ``prepare`` splits a :class:`~splitnn.data.Dataset` with the
partitioner (``"iid"`` or ``"dirichlet:<alpha>"``) and places shard ``h``'s
features at holder ``h`` and its labels at the label holder, both under the
name ``"<dataset>/<holder>"``. A string names a dataset placed that way
already. The samples are numbered shard after shard (holder 0's first), and a
training batch holds samples of one holder only: :meth:`epoch_plan` builds the
epoch's batches that way, and :func:`~splitnn.training.fit` asks for it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from splitnn.accounting import Ledger
from splitnn.data import PartitionSpec, parse_partition
from splitnn.data.batching import epoch_batches
from splitnn.errors import ConfigurationError
from splitnn.split import bind_workers
from splitnn.split.placement import PlacedData, features_and_labels
from splitnn.split.schedule import eval_step, train_step
from splitnn.split.stage import Stage, check_static_fit
from splitnn.training.topologies.base import (
    Topology,
    as_optimizer_list,
    as_worker_list,
    check_modules,
    combine_stats,
    distinct,
    new_prefix,
    place,
    probe_stages,
)
from splitnn.workers import BatchRef, DatasetStats, LossStats, PeerStateWorker, Worker
from splitnn.workers.losses import Loss, check_labels, check_loss_at
from splitnn.workers.metrics import check_metrics_for

#: How the bottom segment's weights pass between data holders.
Handoff = Literal["peer", "central"]
HANDOFF_MODES: tuple[str, ...] = ("peer", "central")

#: A horizontal partitioner: ``(labels, k, seed) -> k index tensors``.
Partitioner = Callable[[torch.Tensor, int, int], Sequence[torch.Tensor]]

# Holder h shuffles its shard with seed + h * _SEED_STRIDE (holder 0 with the
# seed itself, so that one holder reproduces plain chain training exactly).
_SEED_STRIDE = 7919


@dataclass(frozen=True)
class HandOff:
    """One transfer of the bottom segment's weights from ``src`` to ``dst``.

    ``reason`` is ``"turn"`` (the next holder's turn to train) or
    ``"evaluate"`` (a holder evaluates its shard of a dataset).
    """

    src: str
    dst: str
    reason: str


@dataclass(frozen=True)
class _Placement:
    """A dataset split over the holders: shard sizes and where each shard starts in the numbering."""

    name: str
    sizes: tuple[int, ...]
    out_shape: tuple[int, ...] = ()
    labels: tuple[DatasetStats, ...] = ()  # each shard's label summary

    @property
    def offsets(self) -> list[int]:
        out, total = [], 0
        for s in self.sizes:
            out.append(total)
            total += s
        return out

    @property
    def total(self) -> int:
        return sum(self.sizes)


class MultiHolderSplitNN(Topology):
    """``K`` data holders take turns training the bottom segment; one label holder owns the top.

    Each holder trains on its own shard for one turn, then the bottom segment's weights pass to
    the next holder (``send_state``, recorded as ``weights`` bytes), directly (``"peer"``) or
    through a weight store (``"central"``). Hand-offs are lazy: a holder receives the weights
    when it next has to compute. Each holder keeps its own optimizer; only the weights move.

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
        bottom = check_modules([bottom], "bottom segment")[0]
        top = check_modules(top, "top segment")
        if not top:
            raise ConfigurationError("the label holder needs at least one top segment after the bottom segment")
        holders = list(holders)
        if not holders:
            raise ConfigurationError("give at least one data holder")
        distinct(holders, "data holders")
        top_workers = as_worker_list(top_workers, len(top), "top segments")
        shared = sorted({h.name for h in holders} & {w.name for w in top_workers})
        if shared:
            raise ConfigurationError(
                f"{shared} cannot be both a data holder and a top worker; a data holder hosts "
                f"only its copy of the bottom segment"
            )
        if handoff not in HANDOFF_MODES:
            raise ConfigurationError(f"unknown handoff {handoff!r}; choose one of {HANDOFF_MODES}")
        if store is not None and handoff != "central":
            raise ConfigurationError("a weight store is used only with handoff='central'")
        if store is not None and store.name in {h.name for h in holders}:
            raise ConfigurationError(
                f"the weight store {store.name!r} is a data holder; pick the label holder or a third party"
            )
        if turn_batches is not None and (
            isinstance(turn_batches, bool) or not isinstance(turn_batches, int) or turn_batches < 1
        ):
            raise ConfigurationError(
                f"turn_batches must be a positive integer or None (one turn per epoch), got {turn_batches!r}"
            )
        self.partition = _as_partitioner(partition)
        self.partition_seed = int(partition_seed)
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
        if self.store is not None:
            self.store.add_segment(self._store_key, copy.deepcopy(bottom), None)
        # Weight versions: which holder (and the store) has the latest bottom weights.
        self._latest = 0
        self._versions = [0] * len(holders)
        self._store_version = 0
        self._active = 0
        self.handoffs: list[HandOff] = []
        self._placements: dict[str, _Placement] = {}
        self._data_names = PlacedData()
        self._data_ids = 0

    # -- who is who -------------------------------------------------------------------------
    @property
    def label_holder(self) -> Worker:
        """The worker that holds the labels and computes the loss (the last top worker)."""
        return self.top_workers[-1]

    @property
    def active_holder(self) -> Worker:
        """The data holder that holds the latest bottom weights (the last one to train)."""
        return self.holders[self._active]

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

    # -- data -------------------------------------------------------------------------------
    def shard_name(self, dataset: str, holder: int) -> str:
        """Name under which holder ``holder``'s shard of ``dataset`` is held (features and labels)."""
        return f"{dataset}/{self.holders[holder].name}"

    def prepare(self, data: object) -> tuple[str, int]:
        """Split ``data`` over the holders (or check a dataset placed already); return (name, size).

        Shapes, shard sizes and the label range are checked here, before any training.
        """
        name = self._data_names.name_for(data, self._place_dataset)
        if name not in self._placements:
            self._placements[name] = self._check_placement(name)
        return name, self._placements[name].total

    def _place_dataset(self, data: object) -> str:
        features, labels = features_and_labels(data, "the holders", tensors_only=True)  # partitioned here
        k, n = len(self.holders), len(labels)
        if k > n:
            raise ConfigurationError(
                f"{k} data holders but the dataset has only {n} samples; every holder needs at "
                f"least one sample: use fewer holders or more data"
            )
        shards = [
            torch.as_tensor(s, dtype=torch.int64).sort().values for s in self.partition(labels, k, self.partition_seed)
        ]
        if len(shards) != k or any(s.numel() == 0 for s in shards):
            raise ConfigurationError(
                f"the partitioner gave shard sizes {[int(s.numel()) for s in shards]} for {k} "
                f"holders; every holder needs a non-empty shard"
            )
        name = f"{getattr(data, 'name', 'data')}#{self._data_ids}"
        self._data_ids += 1
        for h, (holder, shard) in enumerate(zip(self.holders, shards)):
            holder.add_dataset(self.shard_name(name, h), features=features[shard])
            self.label_holder.add_dataset(self.shard_name(name, h), labels=labels[shard])
        return name

    def _check_placement(self, name: str) -> _Placement:
        sizes, shape, shard_labels = [], None, []
        for h, holder in enumerate(self.holders):
            shard = self.shard_name(name, h)
            feats = holder.dataset_stats(shard)
            labels = self.label_holder.dataset_stats(shard)
            if feats.feature_shape is None or labels.num_labels is None or labels.label_max is None:
                raise ConfigurationError(
                    f"dataset {shard!r}: {holder.name!r} must hold its features and "
                    f"{self.label_holder.name!r} its labels"
                )
            if feats.size != labels.num_labels:
                raise ConfigurationError(
                    f"dataset {shard!r}: {feats.size} feature rows at {holder.name!r} but "
                    f"{labels.num_labels} labels at {self.label_holder.name!r}"
                )
            if shape is not None and feats.feature_shape != shape:
                raise ConfigurationError(
                    f"dataset {name!r}: {holder.name!r} holds samples of shape "
                    f"{feats.feature_shape} but {self.holders[0].name!r} of shape {shape}; "
                    f"every holder's samples must have the same shape"
                )
            shape = feats.feature_shape
            sizes.append(feats.size)
            shard_labels.append((shard, labels))
        assert shape is not None
        out = probe_stages(self.stages_of(0), (2, *shape), f"the data of {self.holders[0].name!r}")
        for shard, labels in shard_labels:
            check_labels(shard, labels, out, self.loss, self.label_holder.name)
        return _Placement(name, tuple(sizes), tuple(out), tuple(labels for _, labels in shard_labels))

    def _placement(self, name: str) -> _Placement:
        try:
            return self._placements[name]
        except KeyError:
            raise ConfigurationError(f"dataset {name!r} is not prepared; call prepare(data) first") from None

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
        placement = self._placement(dataset)
        if n != placement.total:
            raise ConfigurationError(f"dataset {dataset!r} has {placement.total} samples, not {n}")
        per_holder = [
            epoch_batches(size, batch_size, shuffle=shuffle, seed=seed + _SEED_STRIDE * h, epoch=epoch)
            for h, size in enumerate(placement.sizes)
        ]
        turn = self.turn_batches or max(len(b) for b in per_holder)
        plan: list[torch.Tensor] = []
        for start in range(0, max(len(b) for b in per_holder), turn):
            for h, batches in enumerate(per_holder):
                plan.extend(b + placement.offsets[h] for b in batches[start : start + turn])
        return plan

    def _locate(self, name: str, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Holder of each sample and its row in that holder's shard."""
        placement = self._placement(name)
        indices = torch.as_tensor(indices, dtype=torch.int64)
        if indices.numel() == 0:
            raise ConfigurationError("empty batch")
        if int(indices.min()) < 0 or int(indices.max()) >= placement.total:
            raise ConfigurationError(f"batch indices outside dataset {name!r} of {placement.total} samples")
        offsets = torch.tensor(placement.offsets, dtype=torch.int64)
        holder = torch.bucketize(indices, offsets, right=True) - 1
        return holder, indices - offsets[holder]

    # -- training ---------------------------------------------------------------------------
    def train_batch(self, dataset: str, indices: torch.Tensor) -> LossStats:
        """One optimisation step at the holder that owns rows ``indices`` (it gets the latest weights first)."""
        holder, local = self._locate(dataset, indices)
        h = int(holder[0])
        if not bool((holder == h).all()):
            raise ConfigurationError(
                f"a training batch must hold samples of one data holder, but this one spans "
                f"holders {sorted(set(holder.tolist()))}; use fit() or epoch_plan() for batches"
            )
        self._bring_up_to_date(h, "turn")
        stats = train_step(self.stages_of(h), BatchRef(self.shard_name(dataset, h), local), self.loss)
        self._latest += 1
        self._versions[h] = self._latest
        self._active = h
        return stats

    def eval_batch(self, dataset: str, indices: torch.Tensor, *, keep: str | None = None) -> LossStats:
        """Loss and correct count on rows ``indices``; each holder evaluates its own rows with the latest weights
        (``keep``: the label holder keeps the outputs for :meth:`metrics`)."""
        holder, local = self._locate(dataset, indices)
        parts = []
        for h in torch.unique(holder).tolist():
            self._bring_up_to_date(h, "evaluate")
            batch = BatchRef(self.shard_name(dataset, h), local[holder == h])
            parts.append(eval_step(self.stages_of(h), batch, self.loss, keep=keep))
        return combine_stats(parts)

    def check_metrics(self, dataset: str, names: Sequence[str]) -> None:
        """Refuse metrics a prepared dataset cannot have (e.g. AUC of labels that are not 0/1)."""
        placement = self._placement(self.prepare(dataset)[0])
        shards = placement.labels
        if any(s.label_min is None or s.label_max is None for s in shards):
            return
        combined = dataclasses.replace(  # the summary of all shards' labels together
            shards[0],
            label_min=min(s.label_min for s in shards),
            label_max=max(s.label_max for s in shards),
            label_integral=all(s.label_integral for s in shards),
        )
        check_metrics_for(dataset, names, combined, placement.out_shape, self.loss)

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

    # -- results ----------------------------------------------------------------------------
    def collect(self) -> nn.Sequential:
        """The trained network (latest bottom, then the top) as one ``nn.Sequential`` (recorded as weights)."""
        layers: list[nn.Module] = []
        for stage in self.stages_of(self._active):
            module = stage.worker.fetch_segment(stage.key)
            layers.extend(module.children() if isinstance(module, nn.Sequential) else [module])
        return nn.Sequential(*layers)

    def __repr__(self) -> str:
        holders = ", ".join(w.name for w in self.holders)
        top = " -> ".join(s.label for s in self._top)
        store = f", store at {self.store.name}" if self.store is not None else ""
        return f"MultiHolderSplitNN([{holders}] -> {top}; handoff {self.handoff}{store})"


def _as_partitioner(partition: str | PartitionSpec | Partitioner) -> Partitioner:
    if isinstance(partition, str):
        return parse_partition(partition)
    if callable(partition):
        return partition
    raise ConfigurationError(f"partition must be 'iid', 'dirichlet:<alpha>' or a callable, got {partition!r}")
