"""Remembering which dataset objects were placed at the workers, and under what name."""

from __future__ import annotations

from collections.abc import Callable

import torch

from splitnn.data.sources import Source, TorchDataset
from splitnn.errors import ConfigurationError


class PlacedData:
    """Names under which dataset objects were placed at the workers.

    Keyed by the object itself (its id, with the object kept alive): Python reuses
    the ids of freed objects, so an id alone could name another dataset's placement.
    """

    def __init__(self) -> None:
        self._names: dict[int, tuple[object, str]] = {}

    def name_for(self, data: object, place: Callable[[object], str]) -> str:
        """``data`` itself when it is a name; the name ``data`` was placed under; else ``place(data)``."""
        if isinstance(data, str):
            return data
        hit = self._names.get(id(data))
        if hit is not None and hit[0] is data:
            return hit[1]
        name = place(data)
        self._names[id(data)] = (data, name)
        return name


def features_and_labels(data: object, holders: str, *, tensors_only: bool = False) -> tuple[Source, Source]:
    """The features and labels of a dataset object: tensors (:class:`~splitnn.data.Dataset`) or the two
    views of a :class:`~splitnn.data.TorchDataset` (unless ``tensors_only``), or a clear error."""
    if isinstance(data, TorchDataset) and not tensors_only:
        return data.parts()
    features, labels = getattr(data, "features", None), getattr(data, "labels", None)
    if not isinstance(features, torch.Tensor) or not isinstance(labels, torch.Tensor):
        also = "" if tensors_only else ", a splitnn.data.TorchDataset (map-style data)"
        raise ConfigurationError(
            f"cannot place {type(data).__name__}: give a splitnn.data.Dataset (features and "
            f"labels){also} or the name of a dataset {holders} hold already"
        )
    return features, labels
