"""Vertically partitioned split learning: data holders own different features of the same samples.

``K >= 2`` data holders each hold some feature columns of the same samples
(for images: e.g. the left and right halves), aligned by sample id, and each
runs its own bottom segment on them. The first top party merges their
activations (``concat``, ``sum`` or ``mean``, see :mod:`splitnn.workers.merge`)
and the top segments continue to the label holder's loss. Backward, the
gradient of the merged activation splits back into one gradient per holder.
No holder ever receives another holder's features or activations: each one
talks only to the merging party.

The merging party must be a :class:`~splitnn.workers.MergingWorker`
(``forward_merged`` / ``backward_merged``); :class:`~splitnn.workers.VirtualWorker`
is one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from splitnn.accounting import Ledger
from splitnn.data import column_partition, vertical_split
from splitnn.errors import ConfigurationError
from splitnn.split import bind_workers
from splitnn.split.cut import sequential_of
from splitnn.split.placement import PlacedData
from splitnn.split.stage import Slot, Stage, check_static_fit, declare_adjacency, slot_label
from splitnn.training.topologies.base import (
    Topology,
    as_optimizer_list,
    as_worker_list,
    check_modules,
    distinct,
    new_prefix,
    place,
    probe_stages,
    refuse_shared,
)
from splitnn.workers import BatchRef, DatasetStats, LossStats, MergingWorker, Worker
from splitnn.workers.losses import Loss, check_labels, check_loss_at
from splitnn.workers.merge import check_merge, merge_tensors, merged_shape
from splitnn.workers.metrics import check_metrics_for
from splitnn.workers.refs import fresh_name


@dataclass
class VerticalData:
    """The same samples' features, split by columns among parties, and their labels.

    Attributes:
        parts: party ``i``'s features, shape ``(N, ...)``.
        labels: int64 labels, shape ``(N,)``, for the label holder.
        ids: optional sample ids per party, shape ``(N,)`` each; with
            ``label_ids`` they align the rows (every party must hold the same ids).
        label_ids: the label holder's sample ids, shape ``(N,)``.
        name: informational.
    """

    parts: list[torch.Tensor]
    labels: torch.Tensor
    ids: list[torch.Tensor] | None = None
    label_ids: torch.Tensor | None = None
    name: str = "vertical"

    @classmethod
    def from_dataset(
        cls, data: object, columns: Sequence[torch.Tensor], shapes: Sequence[tuple[int, ...]] | None = None
    ) -> VerticalData:
        """Split a dataset's (flattened) features by ``columns``; optionally reshape part ``i`` to ``shapes[i]``."""
        parts = vertical_split(data.features, columns)
        if shapes is not None:
            parts = [p.reshape(len(p), *s) for p, s in zip(parts, shapes)]
        return cls(parts, data.labels, name=getattr(data, "name", "vertical"))

    def aligned(self, holder_names: Sequence[str], label_holder: str = "the label holder") -> VerticalData:
        """Check the parties hold the same samples and return the rows aligned by id.

        Without ids, every party must hold the same number of rows (row ``r`` is
        the same sample everywhere). With ids, every party must hold the same set
        of ids; the rows are then put in ascending id order at every party.

        Raises:
            ConfigurationError: different sample counts, or different ids.
        """
        names = list(holder_names)
        if len(self.parts) != len(names):
            raise ConfigurationError(
                f"got feature parts for {len(self.parts)} parties but there are {len(names)} data holders {names}"
            )
        counts = {n: len(p) for n, p in zip(names, self.parts)}
        counts[label_holder] = len(self.labels)
        if len(set(counts.values())) != 1:
            listed = ", ".join(f"{n} {c}" for n, c in counts.items())
            raise ConfigurationError(
                f"vertical parties hold different numbers of samples ({listed}); they must hold "
                f"the same samples, aligned by sample id"
            )
        if (self.ids is None) != (self.label_ids is None):
            raise ConfigurationError("give sample ids for every data holder and for the labels, or for none")
        if self.ids is None:
            return self
        if len(self.ids) != len(names):
            raise ConfigurationError(f"got ids for {len(self.ids)} parties but there are {len(names)} data holders")
        all_ids = [*self.ids, self.label_ids]
        owners = [*names, label_holder]
        for owner, ids in zip(owners, all_ids):
            ids = torch.as_tensor(ids)
            if ids.dim() != 1 or len(ids) != len(self.labels):
                raise ConfigurationError(
                    f"ids of {owner} must be 1-D with one id per row, got shape "
                    f"{tuple(ids.shape)} for {len(self.labels)} rows"
                )
            if len(torch.unique(ids)) != len(ids):
                raise ConfigurationError(f"ids of {owner} repeat; every sample needs a unique id")
        reference = torch.as_tensor(self.label_ids).sort().values
        for owner, ids in zip(names, self.ids):
            mine = torch.as_tensor(ids).sort().values
            if not torch.equal(mine, reference):
                extra = mine[~torch.isin(mine, reference)]
                missing = reference[~torch.isin(reference, mine)]
                raise ConfigurationError(
                    f"{owner} holds other samples than {label_holder}: {len(extra)} ids the labels lack "
                    f"(e.g. {extra[:5].tolist()}) and {len(missing)} labelled ids it lacks (e.g. "
                    f"{missing[:5].tolist()}); vertical parties must hold the same sample ids"
                )
        order = [torch.as_tensor(ids).argsort() for ids in self.ids]
        return VerticalData(
            [p[o] for p, o in zip(self.parts, order)],
            self.labels[torch.as_tensor(self.label_ids).argsort()],
            ids=[torch.as_tensor(i)[o] for i, o in zip(self.ids, order)],
            label_ids=reference,
            name=self.name,
        )


class VerticalNet(nn.Module):
    """The monolithic form of a vertical split network (what :meth:`VerticalSplitNN.collect` returns).

    ``forward(x)`` takes either the full samples (it cuts out each party's
    columns of ``x.flatten(1)`` itself, reshaping to ``column_shapes`` when
    given) or a list with one tensor per party; it runs each bottom on its
    part, merges the results and runs the top.
    """

    def __init__(
        self,
        bottoms: Sequence[nn.Module],
        top: nn.Module,
        merge: str,
        columns: Sequence[torch.Tensor] | None = None,
        column_shapes: Sequence[tuple[int, ...]] | None = None,
    ) -> None:
        super().__init__()
        self.bottoms = nn.ModuleList(bottoms)
        self.top = top
        self.merge = check_merge(merge)
        self.columns = [torch.as_tensor(c, dtype=torch.int64) for c in columns] if columns is not None else None
        self.column_shapes = [tuple(s) for s in column_shapes] if column_shapes is not None else None

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each party's part of the full samples ``x``."""
        if self.columns is None:
            raise ConfigurationError("this VerticalNet does not know the column partition; pass one tensor per party")
        flat = x.flatten(1)
        parts = [flat[:, c] for c in self.columns]
        if self.column_shapes is not None:
            parts = [p.reshape(len(p), *s) for p, s in zip(parts, self.column_shapes)]
        return parts

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        parts = self.split(x) if isinstance(x, torch.Tensor) else list(x)
        if len(parts) != len(self.bottoms):
            raise ConfigurationError(f"got {len(parts)} parts for {len(self.bottoms)} bottom segments")
        return self.top(merge_tensors([b(p) for b, p in zip(self.bottoms, parts)], self.merge))


@dataclass
class _Placed:
    name: str
    size: int
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    labels: DatasetStats | None = None
    out_shape: tuple[int, ...] = ()


class VerticalSplitNN(Topology):
    """``K`` data holders with different feature columns of the same samples; one party merges.

    Args:
        bottoms: one bottom segment per data holder (its input is that holder's part).
        holders: the ``K >= 2`` data holders, distinct parties, in the order of
            the column partition.
        top: the segments after the merge (at least one); the first one takes
            the merged activation.
        top_workers: the worker of each top segment, or one for all; the first
            merges, the last holds the labels. None of them may be a data holder.
        merge: ``"concat"`` (along dim 1), ``"sum"`` or ``"mean"``.
        columns: the column partition used when a :class:`~splitnn.data.Dataset`
            is prepared: one index tensor into the flattened features per holder
            (default: :func:`~splitnn.data.column_partition` of the sample shape
            into ``K`` vertical strips for images, contiguous runs otherwise).
        column_shapes: reshape holder ``i``'s part to ``column_shapes[i]`` per
            sample (default: flat).
        optimizer: one factory/spec for every segment, or a list of ``K + len(top)``
            (the bottoms first).
        loss: the label holder's loss: a name (e.g. ``"bce_with_logits"`` for a binary outcome)
            or, with an in-process label holder, a callable ``(output, target) -> scalar``.
        ledger: where transfers are recorded.
    """

    def __init__(
        self,
        bottoms: Sequence[nn.Module],
        holders: Sequence[Worker],
        top: Sequence[nn.Module],
        top_workers: Worker | Sequence[Worker],
        *,
        merge: str = "concat",
        columns: Sequence[torch.Tensor] | None = None,
        column_shapes: Sequence[tuple[int, ...]] | None = None,
        optimizer: object = "sgd:lr=0.03",
        loss: Loss = "nll",
        ledger: Ledger | None = None,
    ) -> None:
        bottoms = check_modules(bottoms, "bottom segment")
        top = check_modules(top, "top segment")
        holders = list(holders)
        if len(holders) < 2:
            raise ConfigurationError(
                f"vertical split learning needs at least 2 data holders, got {len(holders)}; with one, use SplitNN"
            )
        if len(bottoms) != len(holders):
            raise ConfigurationError(
                f"got {len(bottoms)} bottom segments for {len(holders)} data holders; give one per holder"
            )
        if not top:
            raise ConfigurationError("give at least one top segment to take the merged activations")
        distinct(holders, "vertical data holders")
        top_workers = as_worker_list(top_workers, len(top), "top segments")
        refuse_shared(holders, top_workers, "it would receive the other holders' activations")
        self.merge = check_merge(merge)
        if not isinstance(top_workers[0], MergingWorker):
            raise ConfigurationError(
                f"worker {top_workers[0].name!r} cannot merge activations (it lacks forward_merged/backward_merged)"
            )
        self.columns = _check_columns(columns, len(holders)) if columns is not None else None
        if column_shapes is not None:
            column_shapes = [tuple(int(d) for d in s) for s in column_shapes]
            if len(column_shapes) != len(holders):
                raise ConfigurationError(f"got {len(column_shapes)} column shapes for {len(holders)} holders")
            if self.columns is not None:
                for i, (c, s) in enumerate(zip(self.columns, column_shapes)):
                    if math.prod(s) != len(c):
                        raise ConfigurationError(
                            f"column shape {s} of holder {holders[i].name!r} has "
                            f"{math.prod(s)} values but its columns are {len(c)}"
                        )
        self.column_shapes = column_shapes
        self.loss = check_loss_at(loss, top_workers[-1])
        optimizers = as_optimizer_list(optimizer, len(holders) + len(top))
        check_static_fit(top, [w.name for w in top_workers])

        self.ledger = bind_workers([*holders, *top_workers], ledger)
        self.holders = holders
        self.top_workers = top_workers
        prefix = new_prefix("vertical")
        self._bottoms: list[Stage] = [
            place(f"{prefix}.h{i}", 0, [seg], [w], [opt])[0]
            for i, (seg, w, opt) in enumerate(zip(bottoms, holders, optimizers))
        ]
        self._top = place(prefix, 1, top, top_workers, optimizers[len(holders) :])
        self._modules = [*bottoms, *top]  # for checkpoints: the segments' fingerprints
        declare_adjacency([(h, top_workers[0]) for h in holders] + list(zip(top_workers, top_workers[1:])))
        self._placed: dict[str, _Placed] = {}
        self._data_names = PlacedData()

    @property
    def label_holder(self) -> Worker:
        """The worker that holds the labels (the last top worker)."""
        return self.top_workers[-1]

    @property
    def merger(self) -> Worker:
        """The worker that merges the holders' activations (the first top worker)."""
        return self.top_workers[0]

    @property
    def bottom_stages(self) -> list[Stage]:
        """Each data holder's bottom segment, in holder order."""
        return list(self._bottoms)

    @property
    def top_stages(self) -> list[Stage]:
        """The segments after the merge; the first one merges."""
        return list(self._top)

    def checkpoint_segments(self) -> list[Slot]:
        """Every segment with its checkpoint label: the holders' bottoms (``h0.s0``, ...), then the top."""
        stages = [*self._bottoms, *self._top]
        return [Slot(slot_label(st.key), st.worker, st.key, m) for st, m in zip(stages, self._modules)]

    def parties(self) -> list[str]:
        """Names of the distinct parties: the data holders, then the top workers."""
        return list(dict.fromkeys(w.name for w in (*self.holders, *self.top_workers)))

    def workers(self) -> list[Worker]:
        """The distinct workers: the data holders, then the top workers."""
        return list({w.name: w for w in (*self.holders, *self.top_workers)}.values())

    # -- data -------------------------------------------------------------------------------
    def prepare(self, data: object) -> tuple[str, int]:
        """Place each holder's columns and the labels (or check a placed dataset); return (name, size).

        ``data`` is a :class:`~splitnn.data.Dataset` (split by :attr:`columns`), a
        :class:`VerticalData` (checked and aligned by id), or the name of a dataset
        every holder and the label holder hold already. Counts, ids, shapes at the
        merge and the label range are checked here, before any training.
        """
        name = self._data_names.name_for(data, self._place)
        if name not in self._placed:
            self._placed[name] = self._check(name)
        return name, self._placed[name].size

    def _place(self, data: object) -> str:
        if not isinstance(data, VerticalData):
            features = getattr(data, "features", None)
            if getattr(data, "named", False):
                data.feature_tensor("the vertical topology (it splits the columns of the features)")
            if not isinstance(features, torch.Tensor) or not isinstance(getattr(data, "labels", None), torch.Tensor):
                raise ConfigurationError(
                    f"cannot place {type(data).__name__}: give a splitnn.data.Dataset, a "
                    f"VerticalData or the name of a dataset the parties hold already"
                )
            if self.columns is None:
                shape = tuple(features.shape[1:])
                how = "halves" if len(shape) in (2, 3) else "contiguous"
                self.columns = column_partition(shape if how == "halves" else math.prod(shape), len(self.holders), how)
            data = VerticalData.from_dataset(data, self.columns, self.column_shapes)
        data = data.aligned([h.name for h in self.holders], repr(self.label_holder.name))
        name = fresh_name(f"{data.name}#v")
        for holder, part in zip(self.holders, data.parts):
            holder.add_dataset(name, features=part)
        self.label_holder.add_dataset(name, labels=data.labels)
        return name

    def _check(self, name: str) -> _Placed:
        labels = self.label_holder.dataset_stats(name)
        if labels.num_labels is None or labels.label_max is None:
            raise ConfigurationError(f"dataset {name!r}: {self.label_holder.name!r} holds no labels for it")
        stats = [h.dataset_stats(name) for h in self.holders]
        for holder, st in zip(self.holders, stats):
            if st.feature_shape is None:
                raise ConfigurationError(f"dataset {name!r}: {holder.name!r} holds no features for it")
        counts = {h.name: st.size for h, st in zip(self.holders, stats)}
        counts[self.label_holder.name] = labels.num_labels
        if len(set(counts.values())) != 1:
            listed = ", ".join(f"{n} {c}" for n, c in counts.items())
            raise ConfigurationError(
                f"dataset {name!r}: vertical parties hold different numbers of samples "
                f"({listed}); they must hold the same samples, aligned by sample id"
            )
        outs = []
        for stage, st in zip(self._bottoms, stats):
            outs.append(probe_stages([stage], (2, *st.feature_shape), f"the columns of {stage.worker.name!r}"))
        merged = merged_shape(outs, self.merge, [f"{s.label} gives" for s in self._bottoms])
        out = probe_stages(self._top, merged, f"the {self.merge} of the holders' activations")
        check_labels(name, labels, out, self.loss, self.label_holder.name)
        return _Placed(name, labels.num_labels, [st.feature_shape for st in stats], labels, tuple(out))

    # -- training ---------------------------------------------------------------------------
    def train_batch(self, dataset: str, indices: torch.Tensor) -> LossStats:
        """One optimisation step on rows ``indices`` (the eager order of worker calls)."""
        batch = BatchRef(dataset, indices)
        stages = [*self._bottoms, *self._top]
        for stage in stages:
            stage.worker.zero_grad(stage.key)
        out = self._forward(batch, train=True)
        stats = self.label_holder.loss(out, batch, self.loss, train=True)
        grad = None
        for stage in reversed(self._top[1:]):
            grad = stage.worker.backward(stage.key, grad)
        first = self._top[0]
        grads = first.worker.backward_merged(first.key, grad)
        for stage, g in zip(self._bottoms, grads):
            stage.worker.backward(stage.key, g)
        for stage in stages:
            stage.worker.step(stage.key)
        return stats

    def eval_batch(self, dataset: str, indices: torch.Tensor, *, keep: str | None = None) -> LossStats:
        """Loss and correct count on rows ``indices``, without gradients (``keep``: see :meth:`metrics`)."""
        batch = BatchRef(dataset, indices)
        out = self._forward(batch, train=False)
        if keep is None:
            return self.label_holder.loss(out, batch, self.loss, train=False)
        return self.label_holder.loss(out, batch, self.loss, train=False, keep=keep)

    def check_metrics(self, dataset: str, names: Sequence[str]) -> None:
        """Refuse metrics a prepared dataset cannot have (e.g. AUC of labels that are not 0/1)."""
        placed = self._placed[self.prepare(dataset)[0]]
        check_metrics_for(dataset, names, placed.labels, placed.out_shape, self.loss)

    def _forward(self, batch: BatchRef, *, train: bool):
        refs = [stage.worker.forward(stage.key, batch, train=train) for stage in self._bottoms]
        first = self._top[0]
        out = first.worker.forward_merged(first.key, refs, self.merge, train=train)
        for stage in self._top[1:]:
            out = stage.worker.forward(stage.key, out, train=train)
        return out

    # -- results ----------------------------------------------------------------------------
    def collect(self) -> VerticalNet:
        """The trained network as one :class:`VerticalNet` (recorded as weights to the researcher)."""
        bottoms = [s.worker.fetch_segment(s.key) for s in self._bottoms]
        top = sequential_of(stage.worker.fetch_segment(stage.key) for stage in self._top)
        return VerticalNet(bottoms, top, self.merge, self.columns, self.column_shapes)

    def __repr__(self) -> str:
        holders = ", ".join(s.label for s in self._bottoms)
        top = " -> ".join(s.label for s in self._top)
        return f"VerticalSplitNN([{holders}] -{self.merge}-> {top})"


def _check_columns(columns: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    cols = [torch.as_tensor(c, dtype=torch.int64).flatten() for c in columns]
    if len(cols) != k:
        raise ConfigurationError(f"got {len(cols)} column groups for {k} data holders; give one per holder")
    for i, c in enumerate(cols):
        if c.numel() == 0:
            raise ConfigurationError(f"column group {i} is empty; every holder needs at least one feature")
    return cols
