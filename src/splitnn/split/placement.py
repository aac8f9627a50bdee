"""Placing datasets at the workers: which objects were placed under what name (:class:`PlacedData`), and a
chain's datasets, placed and checked once (:class:`ChainData`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import fx, nn

from splitnn.data.dataset import one_feature_tensor
from splitnn.data.sources import NamedFeatures, Source, TorchDataset
from splitnn.errors import ConfigurationError
from splitnn.split.stage import Stage, feature_probe, format_shape, probe_chain
from splitnn.workers import DatasetStats
from splitnn.workers.losses import Loss, check_labels
from splitnn.workers.refs import fresh_name
from splitnn.workers.values import is_several


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
    if tensors_only:
        one_feature_tensor(features, getattr(data, "name", "data"), "a topology that partitions the features")
    if not isinstance(features, (torch.Tensor, NamedFeatures)) or not isinstance(labels, torch.Tensor):
        also = "" if tensors_only else ", a splitnn.data.TorchDataset (map-style data)"
        raise ConfigurationError(
            f"cannot place {type(data).__name__}: give a splitnn.data.Dataset (features and "
            f"labels){also} or the name of a dataset {holders} hold already"
        )
    return features, labels


def input_names(segment: nn.Module | None) -> list[str] | None:
    """The names of a graph segment's inputs (its placeholders, in order: what :func:`splitnn.cut` traced with
    ``example=``'s keys or the model's ``forward`` parameters); None for a segment that is not a graph or
    takes ``*args``."""
    if not isinstance(segment, fx.GraphModule):
        return None
    names = []
    for n in segment.graph.nodes:
        if n.op == "placeholder":
            if str(n.target).startswith("*"):
                return None
            names.append(str(n.target))
    return names


def check_input_names(features: NamedFeatures, first: nn.Module | None, dataset: str) -> None:
    """Named features reach the first segment positionally, in the mapping's order: when that segment is a graph
    that names its inputs, the feature names must be those names in that order (ConfigurationError otherwise)."""
    names = input_names(first)
    if names is None or list(features) == names:
        return
    raise ConfigurationError(
        f"dataset {dataset!r}: the named features ({', '.join(features)}) reach the first segment in that order, "
        f"as its positional inputs, but it takes ({', '.join(names)}); give the Dataset's features with the "
        f"model's input names in that order (those of cut's example=), e.g. "
        f"{{{', '.join(repr(n) + ': ...' for n in names)}}}"
    )


class ChainData:
    """The datasets of a chain of stages: features at the first stage's worker, labels at the last one's,
    each placed once and checked once (holders, sizes, shapes at every cut, labels against ``loss``)."""

    def __init__(self, stages: Sequence[Stage], loss: Loss, first: nn.Module | None = None) -> None:
        """``first``: the first segment as the researcher gave it (its input names check named features)."""
        self.stages, self.loss, self._first = list(stages), loss, first
        self._names = PlacedData()
        self._sizes: dict[str, int] = {}  # checked datasets: name -> size
        self._outputs: dict[str, tuple[DatasetStats, tuple[int, ...]]] = {}  # name -> (label stats, output shape)

    def prepare(self, data: object) -> tuple[str, int]:
        """Place ``data`` (or take the name of a dataset the workers hold) and check it once; (name, size)."""
        name = self._names.name_for(data, self._place)
        if name not in self._sizes:
            self._sizes[name] = self._check(name)
        return name, self._sizes[name]

    def outputs(self, name: str) -> tuple[DatasetStats, tuple[int, ...]]:
        """A prepared dataset's label statistics and the chain's output shape on it."""
        return self._outputs[name]

    def _place(self, data: object) -> str:
        features, labels = features_and_labels(data, "the workers")
        if isinstance(features, NamedFeatures):
            check_input_names(features, self._first, getattr(data, "name", "data"))
        name = fresh_name(f"{getattr(data, 'name', 'data')}#")  # two models' "rand" datasets do not collide
        if self.stages[0].worker is self.stages[-1].worker:  # U-shaped: one party holds both
            self.stages[0].worker.add_dataset(name, features=features, labels=labels)
        else:
            self.stages[0].worker.add_dataset(name, features=features)
            self.stages[-1].worker.add_dataset(name, labels=labels)
        return name

    def _check(self, name: str) -> int:
        """Check holders, sizes, shapes at every cut and the label range; return the dataset's size."""
        feats = self.stages[0].worker.dataset_stats(name)
        labels = self.stages[-1].worker.dataset_stats(name)
        if feats.feature_shape is None or labels.label_max is None:
            raise ConfigurationError(
                f"dataset {name!r}: {self.stages[0].worker.name!r} must hold its features and "
                f"{self.stages[-1].worker.name!r} its labels"
            )
        if feats.size != labels.num_labels:
            raise ConfigurationError(
                f"dataset {name!r}: {feats.size} feature rows at {self.stages[0].worker.name!r} but "
                f"{labels.num_labels} labels at {self.stages[-1].worker.name!r}"
            )
        out_shape = probe_chain(self.stages, feature_probe(feats))
        if is_several(out_shape):
            raise ConfigurationError(
                f"{self.stages[-1].label} returns {format_shape(out_shape)}; the loss needs one output "
                "tensor: make the model's forward return one tensor"
            )
        check_labels(name, labels, out_shape, self.loss, self.stages[-1].worker.name)
        self._outputs[name] = (labels, out_shape)
        return feats.size
