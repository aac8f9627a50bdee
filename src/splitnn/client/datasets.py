"""The researcher's side of a party's datasets: placing them and reading their public facts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from splitnn.client.calls import encode_args as _args
from splitnn.client.calls import serialized as _serialized
from splitnn.data.sources import NamedFeatures, as_named_features, check_ids, is_named_features, source_len
from splitnn.errors import ConfigurationError
from splitnn.workers.checks import (
    check_dataset_parts,
)
from splitnn.workers.held import check_finite_features


class Datasets:
    """Datasets at a worker (a component of :class:`~splitnn.client.RemoteWorker`)."""

    @_serialized
    def add_dataset(
        self,
        name: str,
        *,
        features: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
        ids: Sequence[str] | None = None,
        replace: bool = False,
        allow_nonfinite: bool = False,
    ) -> None:
        check_dataset_parts(name, self.name, features=features, labels=labels)
        where = f"dataset {name!r} for worker {self.name!r}"
        if is_named_features(features):  # several named tensors: checked here as at the worker, before sending
            features = as_named_features(features, f"the features of {where}")
        parts = {p: t for p, t in (("features", features), ("labels", labels)) if t is not None}
        for part, value in parts.items():
            if not isinstance(value, (torch.Tensor, NamedFeatures)) or (
                part == "labels" and not torch.is_tensor(value)
            ):
                raise ConfigurationError(
                    f"dataset {name!r}: the {part} for remote worker {self.name!r} are a {type(value).__name__}; "
                    f"only tensors travel (no code or pickles on the wire): let the party build its dataset "
                    f"itself with `splitnn worker --data {name}=MODULE:FUNCTION --trust MODULE`"
                )
        if ids is not None:  # the same check (and words) as in process, before anything is sent
            ids = check_ids(ids, source_len(next(iter(parts.values()))), f"dataset {name!r} at worker {self.name!r}")
        if not allow_nonfinite and isinstance(features, (torch.Tensor, NamedFeatures)):  # here too, before sending
            check_finite_features(features, where)
        held = {**parts, **({"ids": ids} if ids is not None else {})}
        args, blobs = _args("add_dataset", name=name, parts=held, replace=replace, allow_nonfinite=allow_nonfinite)
        self._request("add_dataset", args, blobs)
        self._installed.pop(("add_dataset", name), None)
        self._installed[("add_dataset", name)] = ({**args, "replace": True}, blobs)
