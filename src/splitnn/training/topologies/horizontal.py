"""Horizontally partitioned data: ``K`` data holders own shards of the samples, one label holder all labels.

What the many-holder topologies (:class:`~splitnn.training.topologies.MultiHolderSplitNN`,
:class:`~splitnn.training.topologies.SplitFedSplitNN`) share: splitting a
:class:`~splitnn.data.Dataset` with a partitioner (``"iid"`` or
``"dirichlet:<alpha>"``), placing shard ``h``'s features at holder ``h`` and its labels
at the label holder, both under the name ``"<dataset>/<holder>"``, checking the placement
before any training, and numbering the samples shard after shard (holder 0's first). A
string names a dataset placed that way already.

Holder ``h`` visits its shard in the order of
``epoch_batches(size_h, batch_size, seed=seed + 7919 * h, epoch=epoch)``; holder 0 with
the seed itself, so that one holder reproduces plain chain training exactly. Each batch of
these plans keeps the :class:`~splitnn.data.batching.BatchDraw` of its shard's epoch
(``indices.shard_draw``: the holder and the draw), and the batch that holder is sent carries
it: a holder that draws its rows itself (its policy's ``draw_rows``, the default over its own
``--data``) re-derives the same rows from it over its own shard, so the researcher never names
them (evaluation too: :meth:`HolderShards.eval_batches`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from splitnn.data import PartitionSpec, parse_partition
from splitnn.data.batching import epoch_batches
from splitnn.errors import ConfigurationError
from splitnn.split.cut import sequential_of
from splitnn.split.driver import eval_step
from splitnn.split.placement import PlacedData, features_and_labels
from splitnn.split.stage import Stage
from splitnn.split.trainable import Batches, OnBatch
from splitnn.training.topologies.base import Topology, combine_stats, probe_stages
from splitnn.training.topologies.gates import WeightFlow, check_weight_flows, explained
from splitnn.workers import BatchRef, DatasetStats, LossStats, Worker
from splitnn.workers.losses import Loss, check_labels
from splitnn.workers.metrics import check_metrics_for
from splitnn.workers.refs import fresh_name

#: A horizontal partitioner: ``(labels, k, seed) -> k index tensors``.
Partitioner = Callable[[torch.Tensor, int, int], Sequence[torch.Tensor]]

#: Holder ``h`` shuffles its shard with ``seed + SEED_STRIDE * h``.
SEED_STRIDE = 7919


@dataclass(frozen=True)
class Placement:
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


def as_partitioner(partition: str | PartitionSpec | Partitioner) -> Partitioner:
    """A partitioner from a spec string, a :class:`~splitnn.data.PartitionSpec` or a callable."""
    if isinstance(partition, str):
        return parse_partition(partition)
    if callable(partition):
        return partition
    raise ConfigurationError(f"partition must be 'iid', 'dirichlet:<alpha>' or a callable, got {partition!r}")


class HolderShards:
    """The datasets of ``holders`` (features) and ``label_holder`` (labels). See the module docstring.

    Args:
        holders: the data holders, in order.
        label_holder: the worker that holds every shard's labels.
        partition: ``"iid"``, ``"dirichlet:<alpha>"``, a :class:`~splitnn.data.PartitionSpec`
            or a callable ``(labels, k, seed) -> index tensors``.
        partition_seed: seed of the partitioner.
    """

    def __init__(
        self,
        holders: Sequence[Worker],
        label_holder: Worker,
        partition: str | PartitionSpec | Partitioner,
        partition_seed: int,
    ) -> None:
        self.holders = list(holders)
        self.label_holder = label_holder
        self.partition = as_partitioner(partition)
        self.partition_seed = int(partition_seed)
        self._placements: dict[str, Placement] = {}
        self._data_names = PlacedData()

    def shard_name(self, dataset: str, holder: int) -> str:
        """Name under which holder ``holder``'s shard of ``dataset`` is held (features and labels)."""
        return f"{dataset}/{self.holders[holder].name}"

    def prepare(self, data: object, chain: Sequence[Stage], loss: Loss) -> tuple[str, int]:
        """Split ``data`` over the holders (or check a dataset placed already); return (name, size).

        Shapes (through ``chain``, holder 0's stages), shard sizes and the labels (for
        ``loss``) are checked here, before any training.
        """
        name = self._data_names.name_for(data, self._place)
        if name not in self._placements:
            self._placements[name] = self._check(name, chain, loss)
        return name, self._placements[name].total

    def check_metrics(self, name: str, names: Sequence[str], loss: Loss) -> None:
        """Refuse metrics a prepared dataset cannot have (e.g. AUC of labels that are not 0/1)."""
        placement = self.placement(name)
        shards = placement.labels
        if any(s.label_min is None or s.label_max is None for s in shards):
            return
        combined = dataclasses.replace(  # the summary of all shards' labels together
            shards[0],
            label_min=min(s.label_min for s in shards),
            label_max=max(s.label_max for s in shards),
            label_integral=all(s.label_integral for s in shards),
        )
        check_metrics_for(name, names, combined, placement.out_shape, loss)

    def placement(self, name: str) -> Placement:
        """The shard sizes of a prepared dataset."""
        try:
            return self._placements[name]
        except KeyError:
            raise ConfigurationError(f"dataset {name!r} is not prepared; call prepare(data) first") from None

    def holder_batches(
        self, name: str, n: int, batch_size: int, *, shuffle: bool, seed: int, epoch: int
    ) -> list[list[torch.Tensor]]:
        """Each holder's batches of one epoch, in the shard-after-shard numbering (see the module docstring)."""
        placement = self.placement(name)
        if n != placement.total:
            raise ConfigurationError(f"dataset {name!r} has {placement.total} samples, not {n}")
        return [
            [
                _shard_batch(b + offset, h, b)
                for b in epoch_batches(size, batch_size, shuffle=shuffle, seed=seed + SEED_STRIDE * h, epoch=epoch)
            ]
            for h, (size, offset) in enumerate(zip(placement.sizes, placement.offsets))
        ]

    def eval_batches(self, name: str, n: int, batch_size: int) -> list[torch.Tensor]:
        """The batches of an evaluation: each holder's shard in order, in unshuffled batches of ``batch_size``
        that stay within the shard (each carries its draw, like a training batch)."""
        return [
            b for batches in self.holder_batches(name, n, batch_size, shuffle=False, seed=0, epoch=0) for b in batches
        ]

    def locate(self, name: str, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Holder of each sample and its row in that holder's shard."""
        placement = self.placement(name)
        indices = torch.as_tensor(indices, dtype=torch.int64)
        if indices.numel() == 0:
            raise ConfigurationError("empty batch")
        if int(indices.min()) < 0 or int(indices.max()) >= placement.total:
            raise ConfigurationError(f"batch indices outside dataset {name!r} of {placement.total} samples")
        offsets = torch.tensor(placement.offsets, dtype=torch.int64)
        holder = torch.bucketize(indices, offsets, right=True) - 1
        return holder, indices - offsets[holder]

    def one_holder(self, name: str, indices: torch.Tensor) -> tuple[int, torch.Tensor]:
        """The holder of a training batch and its rows there; a batch must not span holders."""
        holder, local = self.locate(name, indices)
        h = int(holder[0])
        if not bool((holder == h).all()):
            raise ConfigurationError(
                f"a training batch must hold samples of one data holder, but this one spans "
                f"holders {sorted(set(holder.tolist()))}; use fit() or epoch_plan() for batches"
            )
        return h, _with_draw(local, indices, h)

    # -- placing and checking ---------------------------------------------------------------
    def _place(self, data: object) -> str:
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
        name = fresh_name(f"{getattr(data, 'name', 'data')}#")  # random: two models' placements never collide
        for h, (holder, shard) in enumerate(zip(self.holders, shards)):
            holder.add_dataset(self.shard_name(name, h), features=features[shard])
            self.label_holder.add_dataset(self.shard_name(name, h), labels=labels[shard])
        return name

    def _check(self, name: str, chain: Sequence[Stage], loss: Loss) -> Placement:
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
        out = probe_stages(chain, (2, *shape), f"the data of {self.holders[0].name!r}")
        for shard, labels in shard_labels:
            check_labels(shard, labels, out, loss, self.label_holder.name)
        return Placement(name, tuple(sizes), tuple(out), tuple(labels for _, labels in shard_labels))


def _shard_batch(indices: torch.Tensor, holder: int, shard_rows: torch.Tensor) -> torch.Tensor:
    """``indices`` (a batch in the shard-after-shard numbering) marked as the draw of holder ``holder``'s shard
    that made ``shard_rows`` (``indices.shard_draw``), if it has one."""
    draw = getattr(shard_rows, "draw", None)
    if draw is not None:
        indices.shard_draw = (holder, draw)
    return indices


def _with_draw(local: torch.Tensor, indices: torch.Tensor, holder: int) -> torch.Tensor:
    """``local`` (rows of holder ``holder``'s shard) carrying the draw that made ``indices``, when a plan of the
    shards made them for that holder (:func:`_shard_batch`); a batch of any other making (e.g. a draw over the
    whole numbering) names its rows instead."""
    marked = getattr(indices, "shard_draw", None)
    if marked is not None and marked[0] == holder:
        local.draw = marked[1]
    return local


class ShardedTopology(Topology):
    """What the many-holder topologies share: every holder's shard of a dataset (``_shards``), the label holder
    (the last top worker), evaluation holder by holder, checked metrics and collecting one holder's chain.

    Subclasses set ``holders``, ``top_workers``, ``loss`` and ``_shards`` and define :meth:`stages_of`.
    """

    holders: list[Worker]
    top_workers: list[Worker]
    _shards: HolderShards

    @property
    def label_holder(self) -> Worker:
        """The worker that holds the labels and computes the loss (the last top worker)."""
        return self.top_workers[-1]

    def stages_of(self, holder: int) -> list[Stage]:  # pragma: no cover - subclasses define it
        """The chain that trains holder ``holder``'s batches."""
        raise NotImplementedError

    def shard_name(self, dataset: str, holder: int) -> str:
        """Name under which holder ``holder``'s shard of ``dataset`` is held (features and labels)."""
        return self._shards.shard_name(dataset, holder)

    def prepare(self, data: object) -> tuple[str, int]:
        """Split ``data`` over the holders (or check a dataset placed already); return (name, size).

        Shapes, shard sizes and the labels are checked here, before any training.
        """
        return self._shards.prepare(data, self.stages_of(0), self.loss)

    def eval_batch(self, dataset: str, indices: torch.Tensor, *, keep: str | None = None) -> LossStats:
        """Loss and correct count on rows ``indices``; each holder evaluates its own rows with its chain
        (``keep``: the label holder keeps the outputs for :meth:`metrics`)."""
        with explained(self.weight_flows()):  # bringing a holder up to date hands weights on
            return self._eval_batch(dataset, indices, keep)

    def _eval_batch(self, dataset: str, indices: torch.Tensor, keep: str | None) -> LossStats:
        holder, local = self._shards.locate(dataset, indices)
        parts = []
        held = torch.unique(holder).tolist()
        for h in held:
            self._before_evaluating(h)
            rows = _with_draw(local, indices, h) if len(held) == 1 else local[holder == h]  # one holder's: its draw
            batch = BatchRef(self.shard_name(dataset, h), rows)
            parts.append(eval_step(self.stages_of(h), batch, self.loss, keep=keep))
        return combine_stats(parts)

    def eval_plan(self, dataset: str, n: int, batch_size: int) -> list[torch.Tensor]:
        """An evaluation's batches: each holder's shard in unshuffled batches that stay within it
        (:meth:`HolderShards.eval_batches`), so that every batch a holder is sent is a draw it can make itself."""
        return self._shards.eval_batches(dataset, n, batch_size)

    def weight_flows(self) -> list[WeightFlow]:
        """Where the bottom segment's weights go during training (default: nowhere); see
        :mod:`~splitnn.training.topologies.gates`."""
        return []

    def check_gates(self) -> None:
        """Refuse, before any training, a transfer of :meth:`weight_flows` that its source party's gate would
        refuse, in process or at a worker process (naming the rule and the policy lines that open it)."""
        check_weight_flows(self.weight_flows())

    def train_batches(self, dataset: str, batches: Batches, on_batch: OnBatch) -> None:
        """Train ``batches`` in order after :meth:`check_gates` (what :func:`~splitnn.training.fit` runs)."""
        self.check_gates()
        super().train_batches(dataset, batches, on_batch)

    def train_epoch(
        self, dataset: str, batches: Batches, on_batch: OnBatch, *, order: dict | None = None, pipeline: int = 1
    ) -> None:
        """:meth:`~splitnn.split.trainable.Trainable.train_epoch`; a party's refusal to let the bottom's weights
        leave (which a worker process reports at a later call) names the policy lines that open it."""
        with explained(self.weight_flows()):
            super().train_epoch(dataset, batches, on_batch, order=order, pipeline=pipeline)

    def _before_evaluating(self, holder: int) -> None:
        """What holder ``holder`` needs before it evaluates (default: nothing)."""
        return None

    def check_metrics(self, dataset: str, names: Sequence[str]) -> None:
        """Refuse metrics a prepared dataset cannot have (e.g. AUC of labels that are not 0/1)."""
        self._shards.check_metrics(self.prepare(dataset)[0], names, self.loss)

    def _collect_chain(self, holder: int) -> nn.Sequential:
        return sequential_of(stage.worker.fetch_segment(stage.key) for stage in self.stages_of(holder))
