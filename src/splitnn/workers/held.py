"""What a worker keeps under a dataset name: features and/or labels (tensors or map-style
datasets, see :mod:`splitnn.data.sources`) and optionally the samples' ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from splitnn.data.sources import (
    NamedFeatures,
    Source,
    as_source,
    check_ids,
    check_label_tensor,
    read_rows,
    source_len,
    summarise_labels,
    take_rows,
)
from splitnn.errors import ConfigurationError, DataError
from splitnn.workers.checks import check_dataset_parts
from splitnn.workers.refs import DatasetStats


@dataclass
class HeldData:
    """Features and/or labels of one dataset at one worker, and optionally the samples' ids.

    Tensor labels are checked on arrival (integer class labels >= 0, become int64; float
    targets must be finite); a map-style dataset's labels are summarised once, when
    :meth:`stats` is first asked for.
    """

    features: Source | None = None
    labels: Source | None = None
    ids: list[str] | None = None
    _label_summary: dict | None = field(default=None, repr=False)
    #: Where to name a non-finite feature found in a batch of a map-style dataset (None: NaN/inf allowed).
    _finite_where: str | None = field(default=None, repr=False)

    @classmethod
    def hold(
        cls,
        dataset: str,
        worker: str,
        *,
        features: object = None,
        labels: object = None,
        ids: Sequence[str] | None = None,
        allow_nonfinite: bool = False,
    ) -> HeldData:
        """Check and wrap what ``worker`` is given for ``dataset``; ConfigurationError/LabelError otherwise.

        A NaN or infinite feature is a :class:`~splitnn.errors.DataError` naming its row (tensors: here;
        map-style datasets: in the batch that reads it), unless ``allow_nonfinite``."""
        where = f"dataset {dataset!r} for worker {worker!r}"
        check_dataset_parts(dataset, worker, features=features, labels=labels)
        feats = as_source(features, f"the features of {where}") if features is not None else None
        labs = as_source(labels, f"the labels of {where}") if labels is not None else None
        if isinstance(labs, NamedFeatures):
            raise ConfigurationError(
                f"{where}: the labels are a mapping of names ({', '.join(labs)}); labels are one tensor (or a "
                f"map-style dataset): several named tensors are features only"
            )
        sizes = {what: source_len(s) for what, s in (("features", feats), ("labels", labs)) if s is not None}
        if len(set(sizes.values())) != 1:
            raise ConfigurationError(
                f"{where}: features have {sizes['features']} rows but labels have {sizes['labels']}"
            )
        if set(sizes.values()) == {0}:
            raise ConfigurationError(f"{where} is empty")
        if isinstance(labs, torch.Tensor):
            labs = check_label_tensor(labs, dataset)
        if not isinstance(allow_nonfinite, bool):
            raise ConfigurationError(f"{where}: allow_nonfinite must be True or False, got {allow_nonfinite!r}")
        if isinstance(feats, (torch.Tensor, NamedFeatures)) and not allow_nonfinite:
            check_finite_features(feats, where)
        held = cls(feats, labs)
        if feats is not None and not isinstance(feats, (torch.Tensor, NamedFeatures)) and not allow_nonfinite:
            held._finite_where = where  # a map-style dataset: checked batch by batch, as its rows are read
        if ids is not None:
            held.ids = check_ids(ids, held.size, where)
        return held

    def to(self, device: torch.device) -> HeldData:
        """This data with its tensors on ``device`` (a worker's data lives on its device). A map-style
        dataset stays as it is: its rows are read on the CPU, batch by batch, and the worker moves each batch."""
        tensors = [*_tensors(self.features), *_tensors(self.labels)]
        if not any(t.device != device for t in tensors):
            return self
        moved = (_moved(s, device) for s in (self.features, self.labels))
        return HeldData(*moved, ids=self.ids, _label_summary=self._label_summary, _finite_where=self._finite_where)

    @property
    def size(self) -> int:
        return source_len(self.features if self.features is not None else self.labels)

    def read(self, part: str, indices: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...] | None:
        """Rows ``indices`` of ``part`` ("features" or "labels"), or None if this worker does not hold it. Named
        features read as the tuple of each tensor's rows, in the order of their names (the first segment's
        positional inputs)."""
        src = getattr(self, part)
        if src is None:
            return None
        rows = read_rows(src, indices)
        if part == "features" and self._finite_where is not None:
            check_finite_features(rows, self._finite_where, rows=indices)
        return rows

    def select(self, positions: torch.Tensor) -> HeldData:
        """The rows at ``positions`` (in that order), ids included, as a dataset of their own."""
        return HeldData(
            take_rows(self.features, positions) if self.features is not None else None,
            take_rows(self.labels, positions) if self.labels is not None else None,
            [self.ids[i] for i in positions.tolist()] if self.ids is not None else None,
            _finite_where=self._finite_where,
        )

    def stats(self, name: str) -> DatasetStats:
        """Size, feature shape and a summary of the labels (:class:`DatasetStats`); never the contents. Named
        features: each one's name, per-sample shape and dtype (``named_features``), and the first one's shape
        and dtype as ``feature_shape`` and ``feature_dtype``."""
        feature_shape = feature_dtype = named = None
        if self.features is not None:
            first = self.read("features", torch.zeros(1, dtype=torch.int64))
            if isinstance(first, tuple):
                named = tuple(
                    (key, tuple(t.shape[1:]), str(t.dtype).removeprefix("torch."))
                    for key, t in zip(self.features, first)
                )
                first = first[0]
            feature_shape = tuple(first.shape[1:])
            feature_dtype = str(first.dtype).removeprefix("torch.")
        if self.labels is None:
            return DatasetStats(
                name, self.size, feature_shape, None, None, feature_dtype=feature_dtype, named_features=named
            )
        if self._label_summary is None:
            self._label_summary = summarise_labels(self.labels, name)
        s = self._label_summary
        return DatasetStats(
            name,
            self.size,
            feature_shape,
            self.size,
            s["max"],
            label_min=s["min"],
            label_dtype=s["dtype"],
            label_shape=s["shape"],
            label_integral=s["integral"],
            feature_dtype=feature_dtype,
            named_features=named,
        )


def _tensors(src: Source | None) -> list[torch.Tensor]:
    if isinstance(src, NamedFeatures):
        return list(src.values())
    return [src] if isinstance(src, torch.Tensor) else []


def _moved(src: Source | None, device: torch.device) -> Source | None:
    if isinstance(src, NamedFeatures):
        return NamedFeatures((k, t.to(device)) for k, t in src.items())
    return src.to(device) if isinstance(src, torch.Tensor) else src


def check_finite_features(
    features: torch.Tensor | NamedFeatures, where: str, *, rows: torch.Tensor | None = None
) -> None:
    """Refuse ``features`` holding a NaN or infinite value (one would make every weight NaN), naming the first
    row that does (``rows``: the dataset row of each of ``features``' rows, for a batch) and the fix; named
    features tensor by tensor, naming the feature too."""
    if isinstance(features, NamedFeatures):
        for key, t in features.items():
            check_finite_features(t, f"{where} (feature {key!r})", rows=rows)
        return
    if not isinstance(features, torch.Tensor) or not features.is_floating_point() or features.numel() == 0:
        return
    finite = torch.isfinite(features.reshape(features.shape[0], -1)).all(dim=1) if features.dim() else None
    if finite is None or bool(finite.all()):
        return
    first = int((~finite).nonzero()[0, 0])
    row = int(rows.reshape(-1)[first]) if rows is not None else first
    value = features[first].reshape(-1)
    value = value[~torch.isfinite(value)][0].item()
    count = int((~finite).sum())
    raise DataError(
        f"{where}: row {row} holds a non-finite feature ({value}; {count} such row(s)"
        f"{' in this batch' if rows is not None else ''}); training on it would make every weight NaN. Clean the "
        f"data (drop the rows, or impute, e.g. torch.nan_to_num), or, if the model handles such values, place it "
        f"yourself with worker.add_dataset(NAME, features=..., allow_nonfinite=True) and train on NAME"
    )
