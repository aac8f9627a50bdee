"""What a party holds for one dataset: features and/or labels, as tensors or map-style datasets, and sample ids.

A party's data can be a tensor (or numpy array), indexed directly, or any map-style
``torch.utils.data.Dataset`` (``__getitem__`` + ``__len__``), read in batches with
``torch.utils.data.DataLoader`` whose batch sampler is exactly the requested rows: the
batches of :func:`~splitnn.data.epoch_batches`, so a map-style run sees the same samples in
the same order as a tensor run (and, items being the same tensors, ends bit-identical).
splitnn never materialises a map-style dataset: it reads the rows of each batch, item by
item, when that batch runs (and every label once, to summarise them before training).

:class:`TorchDataset` is how the researcher gives one map-style dataset whose items hold
both parts (``(x, y)`` tuples, dicts, ...) to a model: ``features=`` and ``labels=`` say
which element of an item goes to the data holder and which to the label holder.

:class:`splitnn.workers.held.HeldData` is what a worker keeps under a dataset name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Subset
from torch.utils.data import Dataset as MapDataset

from splitnn.errors import ConfigurationError, DataError, LabelError

__all__ = [
    "MAX_FEATURE_NAME",
    "MAX_FEATURE_NAMES",
    "NamedFeatures",
    "TorchDataset",
    "Source",
    "as_named_features",
    "is_named_features",
    "as_source",
    "check_ids",
    "check_label_tensor",
    "read_rows",
    "source_len",
    "summarise_labels",
    "take_rows",
]


#: Most named feature tensors one dataset holds (a model's keyword inputs: input_ids, attention_mask, ...).
MAX_FEATURE_NAMES = 64
#: Longest name of a named feature tensor.
MAX_FEATURE_NAME = 128


class NamedFeatures(dict):
    """Several feature tensors of the same rows, by name, in order (``{"input_ids": ids, "attention_mask":
    mask}``): a batch of them is the tuple of their rows, in this order, which the first segment takes as its
    positional inputs. A plain ``dict`` otherwise; made (and checked) by :func:`as_named_features`."""


#: What a party may hold as features or labels.
Source = torch.Tensor | MapDataset | NamedFeatures


def is_named_features(value: object) -> bool:
    """Whether ``value`` gives named features: a mapping whose keys include a string (a mapping keyed by
    integers only stays a map-style dataset of items, as before)."""
    return isinstance(value, NamedFeatures) or (isinstance(value, Mapping) and any(isinstance(k, str) for k in value))


def as_named_features(value: Mapping, what: str) -> NamedFeatures:
    """``value`` (names -> tensors or numpy arrays of the same number of rows, N >= 1) as :class:`NamedFeatures`;
    a DataError naming the bad entry otherwise. At most :data:`MAX_FEATURE_NAMES` names, each a non-empty string
    of at most :data:`MAX_FEATURE_NAME` characters."""
    if not isinstance(value, Mapping) or not value:
        raise DataError(f"{what}: named features must be a non-empty mapping of names to tensors")
    if len(value) > MAX_FEATURE_NAMES:
        raise DataError(f"{what}: {len(value)} named feature tensors, more than the {MAX_FEATURE_NAMES} allowed")
    named = NamedFeatures()
    rows = None
    for name, t in value.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_FEATURE_NAME:
            raise DataError(
                f"{what}: feature name {name!r:.60} must be a non-empty string of at most {MAX_FEATURE_NAME} "
                f"characters (the model's keyword input it is, e.g. 'input_ids')"
            )
        if isinstance(t, np.ndarray):
            t = torch.from_numpy(t)
        if not isinstance(t, torch.Tensor):
            raise DataError(
                f"{what}: feature {name!r} is a {type(t).__name__}; named features are tensors or numpy arrays"
            )
        if t.dim() < 1:
            raise DataError(f"{what}: feature {name!r} is a scalar; give one row per sample, shape (N, ...)")
        if rows is None:
            rows = int(t.shape[0])
        elif int(t.shape[0]) != rows:
            first = next(iter(named))
            raise DataError(
                f"{what}: feature {name!r} has {int(t.shape[0])} rows but {first!r} has {rows}; every named "
                f"feature holds the same samples"
            )
        named[name] = t
    return named


#: Labels are read this many at a time to summarise them.
_LABEL_CHUNK = 4096

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def as_source(value: object, what: str) -> Source:
    """A tensor (numpy arrays become tensors, sharing memory), named features (a mapping of names to tensors,
    :func:`as_named_features`) or a map-style dataset; else DataError."""
    if is_named_features(value):
        return as_named_features(value, what)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, IterableDataset):
        raise DataError(
            f"{what} is an IterableDataset; splitnn reads rows by index (the data order of epoch_batches), "
            f"so give a map-style dataset (__getitem__ and __len__)"
        )
    if callable(getattr(value, "__getitem__", None)) and callable(getattr(value, "__len__", None)):
        return value  # map-style: torch's Dataset, or any sequence-like object of items
    raise DataError(
        f"{what} must be a tensor, a numpy array or a map-style torch.utils.data.Dataset, got {type(value).__name__}"
    )


def source_len(src: Source) -> int:
    """Number of rows of a source."""
    if isinstance(src, NamedFeatures):
        return int(next(iter(src.values())).shape[0])
    return int(src.shape[0]) if isinstance(src, torch.Tensor) else len(src)


def _collate(items: list) -> torch.Tensor:
    batch = torch.utils.data.default_collate(items)
    if not isinstance(batch, torch.Tensor):
        raise DataError(
            f"the items of a party's dataset must be tensors, arrays or numbers, but they collate to "
            f"{type(batch).__name__}; for items holding features and labels, give "
            f"splitnn.data.TorchDataset(ds, features=..., labels=...)"
        )
    return batch


def read_rows(src: Source, indices: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Rows ``indices`` of ``src`` in that order: indexing for a tensor; for named features, the tuple of each
    tensor's rows (in the mapping's order); for a map-style dataset, one batch of a ``DataLoader`` whose batch
    sampler is exactly these indices (read here, in this process)."""
    if isinstance(src, NamedFeatures):
        return tuple(_gather(t, indices) for t in src.values())
    if isinstance(src, torch.Tensor):
        return _gather(src, indices)
    loader = DataLoader(src, batch_sampler=[indices.tolist()], collate_fn=_collate, num_workers=0)
    return next(iter(loader))


def _gather(t: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``t[indices]`` for a 1-d index tensor: ``index_select`` (a batch of MNIST rows in a fifth of the time of
    advanced indexing; the same values), falling back to indexing for what only it does (a negative index, which
    counts from the end) or to say what is wrong in its words."""
    if indices.dtype is torch.int64 and indices.dim() == 1 and t.dim() >= 1:
        try:
            return torch.index_select(t, 0, indices)
        except IndexError:
            pass
    return t[indices]


def take_rows(src: Source, indices: torch.Tensor) -> Source:
    """The rows ``indices`` of ``src`` as a source of their own (a ``Subset`` view of a map-style dataset)."""
    if isinstance(src, NamedFeatures):
        return NamedFeatures((k, t[indices]) for k, t in src.items())
    if isinstance(src, torch.Tensor):
        return src[indices]
    return Subset(src, indices.tolist())


# ------------------------------------------------------------------------- the user's datasets
Selector = int | str | Callable[[object], object]


class _ItemPart(MapDataset):
    """One element of every item of a map-style dataset (``ds[i][select]`` or ``select(ds[i])``)."""

    def __init__(self, dataset: MapDataset, select: Selector, what: str) -> None:
        self.dataset, self.select, self.what = dataset, select, what

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> object:
        item = self.dataset[i]
        if callable(self.select):
            return self.select(item)
        try:
            return item[self.select]
        except (IndexError, KeyError, TypeError) as exc:
            raise DataError(
                f"cannot take the {self.what} ({self.select!r}) of item {i} of {type(self.dataset).__name__} "
                f"(a {type(item).__name__}): {exc}; set TorchDataset(..., {self.what}=...) to the item's "
                f"index, key or a function"
            ) from None


@dataclass
class TorchDataset:
    """A map-style ``torch.utils.data.Dataset`` whose items hold features and labels, for a model to place.

    ``features`` and ``labels`` pick each part out of an item: an index (``(x, y)`` tuples:
    ``features=0, labels=1``, the default), a key (dict items) or a function of the item. The
    data holder then holds the features view and the label holder the labels view, both read
    in batches with a ``DataLoader`` in the order of :func:`~splitnn.data.epoch_batches`::

        train = splitnn.data.TorchDataset(torchvision_mnist, features=0, labels=1)
        model.fit(train, epochs=1)

    In-process both views read the one dataset object; across processes each party builds its
    own dataset from trusted code (``splitnn worker --data NAME=mypkg.data:make_dataset``).
    """

    dataset: MapDataset
    features: Selector = 0
    labels: Selector = 1
    name: str = "data"
    num_classes: int | None = None
    _views: tuple = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        as_source(self.dataset, f"TorchDataset {self.name!r}")
        if len(self.dataset) == 0:
            raise DataError(f"TorchDataset {self.name!r} is empty (0 samples)")
        for what in ("features", "labels"):
            sel = getattr(self, what)
            if not (callable(sel) or isinstance(sel, Hashable)):
                raise ConfigurationError(f"TorchDataset {what}= must be an index, a key or a function, got {sel!r}")
        self._views = (
            _ItemPart(self.dataset, self.features, "features"),
            _ItemPart(self.dataset, self.labels, "labels"),
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def parts(self) -> tuple[MapDataset, MapDataset]:
        """The features view and the labels view (map-style datasets of one element per item)."""
        return self._views


def check_ids(ids: Sequence[str], size: int, where: str) -> list[str]:
    """Sample ids: one string per row, no repeats (examples of repeats are named)."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
        raise ConfigurationError(f"{where}: ids must be a sequence of strings, one per row")
    ids = list(ids)
    bad = next((i for i in ids if not isinstance(i, str) or not i), None)
    if bad is not None or any(not isinstance(i, str) for i in ids):
        raise ConfigurationError(
            f"{where}: sample ids must be non-empty strings, got {bad!r}; convert them with str() the same "
            f"way at every party (e.g. '007' and 7 would not match)"
        )
    if len(ids) != size:
        raise ConfigurationError(f"{where}: {len(ids)} ids for {size} rows; give one id per row")
    seen: set[str] = set()
    dups: list[str] = []
    for i in ids:
        if i in seen and i not in dups:
            dups.append(i)
        seen.add(i)
    if dups:
        raise ConfigurationError(
            f"{where}: {len(dups)} sample id(s) appear more than once (e.g. {dups[:5]}); every row needs "
            f"a unique id: merge or drop the repeated rows"
        )
    return ids


def check_label_tensor(labels: torch.Tensor, dataset: str) -> torch.Tensor:
    if labels.dim() < 1:
        raise LabelError(f"labels of dataset {dataset!r} must have one row per sample, got a scalar")
    if labels.dtype in _INT_DTYPES:
        if labels.numel() and int(labels.min()) < 0:
            raise LabelError(
                f"labels of dataset {dataset!r} contain {int(labels.min())}; integer labels are class labels "
                f"and must be >= 0 (give regression targets as floats)"
            )
        return labels.long()
    if labels.is_floating_point():
        if not bool(torch.isfinite(labels).all()):
            raise LabelError(f"labels of dataset {dataset!r} contain NaN or infinite values")
        return labels
    raise LabelError(
        f"labels of dataset {dataset!r} must be integer class labels or float targets, got {labels.dtype}; "
        f"convert with .long() or .float()"
    )


def summarise_labels(labels: Source, dataset: str) -> dict:
    """dtype, per-sample shape, min, max and whether all are whole numbers; map-style labels in chunks."""
    n = source_len(labels)
    dtype = shape = None
    lo, hi, integral = math.inf, -math.inf, True
    for start in range(0, n, _LABEL_CHUNK):
        idx = torch.arange(start, min(n, start + _LABEL_CHUNK))
        chunk = read_rows(labels, idx)
        if not isinstance(labels, torch.Tensor):
            chunk = check_label_tensor(chunk, dataset)
        if dtype is None:
            dtype, shape = chunk.dtype, tuple(chunk.shape[1:])
        elif chunk.dtype != dtype or tuple(chunk.shape[1:]) != shape:
            raise LabelError(f"labels of dataset {dataset!r} change dtype or shape from row {start} on")
        lo, hi = min(lo, chunk.min().item()), max(hi, chunk.max().item())
        if chunk.is_floating_point():
            integral = integral and bool((chunk == chunk.round()).all())
    is_int = not dtype.is_floating_point
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "shape": shape,
        "min": int(lo) if is_int else float(lo),
        "max": int(hi) if is_int else float(hi),
        "integral": True if is_int else integral,
    }
