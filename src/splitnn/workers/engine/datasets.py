"""The datasets a party holds, which of them are its own, and the holder's draw of a batch's rows.

State: ``_data`` (name -> :class:`~splitnn.workers.held.HeldData`); ``_placed`` (the datasets the party's
operator placed, None: all held here); ``_derived`` (datasets an intersection derived -> the dataset they came
from); ``_drawn_epoch`` (the batches of the epoch drawn last, computed once per epoch).
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping, Sequence

import torch

from splitnn.data.batching import draw_rows, epoch_batches
from splitnn.errors import ConfigurationError, PolicyError, WorkerError
from splitnn.workers.checks import held
from splitnn.workers.held import HeldData
from splitnn.workers.policy import check_batch_rows, check_dataset
from splitnn.workers.refs import BatchRef, DatasetStats


class DataHolder:
    """Datasets held here, the rows a batch reads, and the policy's view of which data is the party's own."""

    def _init_datasets(self) -> None:
        self._data: dict[str, HeldData] = {}
        self._placed: frozenset[str] | None = None
        # datasets an intersection derived (psi_apply: the aligned rows and their parts) -> the dataset they came
        # from: the policy guards them as that dataset, and no later intersection runs over them
        self._derived: dict[str, str] = {}
        self._drawn_epoch: tuple | None = None  # ((n, batch size, shuffle, seed, epoch), its batches): draw_rows

    @property
    def own_datasets(self) -> frozenset[str] | None:
        """The party's own datasets, which the policy's ``datasets`` rule guards and the audit log records: those
        its operator placed (None: every dataset held here; a networked session sets the party's ``--data``
        ones) and those an intersection derived from them."""
        if self._placed is None:
            return None
        return self._placed | {d for d, source in self._derived.items() if source in self._placed}

    @own_datasets.setter
    def own_datasets(self, names: Iterable[str] | None) -> None:
        self._placed = None if names is None else frozenset(names)

    def add_dataset(
        self,
        name: str,
        *,
        features: object = None,
        labels: object = None,
        ids: Sequence[str] | None = None,
        replace: bool = False,
        allow_nonfinite: bool = False,
    ) -> None:
        """Hold ``features`` and/or ``labels`` (tensors, numpy arrays or map-style datasets) under ``name``;
        ``ids`` (one string per row) lets :mod:`splitnn.training.alignment` align rows with other parties.
        A name already in use is a ConfigurationError unless ``replace``. Features holding NaN or infinite
        values are a DataError naming the row (a map-style dataset's: when its batch is read) unless
        ``allow_nonfinite``."""
        if name in self._data and not replace:
            raise ConfigurationError(
                f"worker {self.name!r} already holds a dataset {name!r}; use another name, or pass replace=True "
                f"to replace it"
            )
        held = HeldData.hold(
            name, self.name, features=features, labels=labels, ids=ids, allow_nonfinite=allow_nonfinite
        )
        self._data[name] = held.to(self.device)
        self._derived.pop(name, None)

    def hold(self, datasets: Mapping[str, HeldData]) -> None:
        """Hold datasets checked elsewhere (a party's own data, shared read-only by every session)."""
        self._data.update(datasets)
        for name in datasets:
            self._derived.pop(name, None)

    def dataset_stats(self, name: str) -> DatasetStats:
        data = self._dataset(name)
        if self._is_own(name):
            self._guard(check_dataset, self.policy, self.name, self._source(name))
        self._check_readable("label statistics")  # a label range has no value on the meta device
        return data.stats(name)

    def dataset(self, name: str) -> HeldData:
        """The data held under ``name`` (WorkerError naming what this worker holds)."""
        return self._dataset(name)

    def datasets(self) -> Mapping[str, HeldData]:
        """The held datasets, by name (a read-only view)."""
        return types.MappingProxyType(self._data)

    def _dataset(self, name: str) -> HeldData:
        data = self._data.get(name)  # (the per-batch path: a lookup, the error only when it misses)
        return data if data is not None else held(self._data, name, self.name, "dataset")

    def _source(self, dataset: str) -> str:
        """The dataset that ``dataset`` was derived from by an intersection (itself when it was not)."""
        return self._derived.get(dataset, dataset)

    def _is_own(self, dataset: str) -> bool:
        """Whether ``dataset`` is the party's own (see :attr:`own_datasets`)."""
        return self._placed is None or self._source(dataset) in self._placed

    def _batch(self, ref: BatchRef, part: str) -> torch.Tensor:
        """The rows of ``ref``'s ``part``. On this party's own data under a gated policy, drawn here from
        ``ref.draw`` (``draw_rows``), and at least ``min_batch_size`` distinct rows."""
        held = self._dataset(ref.dataset)
        indices = ref.indices
        if self._is_own(ref.dataset) and self.policy.gated:
            indices = self._drawn(ref, held)
        rows = held.read(part, indices)
        if rows is None:
            raise WorkerError(f"worker {self.name!r} holds no {part} for dataset {ref.dataset!r}")
        return self._here(rows)  # tensors are held on the device; a map-style dataset's batch moves here

    def _drawn(self, ref: BatchRef, held: HeldData) -> torch.Tensor:
        """The rows of ``ref`` on this party's data, as the policy lets them be read (see :meth:`_batch`)."""
        indices = ref.indices
        if self.policy.draw_rows:
            if ref.draw is None:
                self._guard(_refuse_rows, self.name, ref.dataset)
            d, n = ref.draw, held.size
            epoch = (n, d.batch_size, d.shuffle, d.seed, d.epoch)
            cached = self._drawn_epoch  # the epoch's batches, computed once per epoch (not once per batch)
            try:
                if cached is None or cached[0] != epoch:
                    batches = epoch_batches(n, d.batch_size, shuffle=d.shuffle, seed=d.seed, epoch=d.epoch)
                    cached = self._drawn_epoch = (epoch, batches)
                indices = draw_rows(n, d, cached[1])
            except ConfigurationError as exc:
                raise WorkerError(f"worker {self.name!r}: dataset {ref.dataset!r}: {exc}") from None
            # a short last batch is refused at the epoch's first batch already, before any work
            tail = int(cached[1][-1].numel())
            self._guard(check_batch_rows, self.policy, self.name, ref.dataset, tail, tail, "the last batch")
        n = int(indices.numel())
        distinct = n if self.policy.draw_rows else int(torch.unique(indices).numel())
        self._guard(check_batch_rows, self.policy, self.name, ref.dataset, n, distinct, "a batch")
        return indices


def _refuse_rows(worker: str, dataset: str) -> None:
    raise PolicyError(
        f"worker {worker!r} refuses a batch of rows named by the researcher on dataset {dataset!r} (policy rule "
        f"draw_rows): this party draws its batches itself; send the draw (seed, epoch, position, batch size, "
        f"shuffle) that splitnn.data.epoch_batches attaches to each batch, as fit() and evaluate() do for every "
        f"model of splitnn (a run that names rows itself needs draw_rows = false in this party's policy)"
    )
