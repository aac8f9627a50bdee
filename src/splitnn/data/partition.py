"""Partitioners for multi-party topologies.

Horizontal (sample-wise) partitions give each of ``k`` parties a disjoint set of
sample indices: :func:`iid_shards` (uniform random) and :func:`dirichlet_shards`
(label-skewed, the usual non-IID federated benchmark). Vertical (feature-wise)
partitions give each party a disjoint set of feature columns:
:func:`column_partition` and :func:`vertical_split`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from splitnn.errors import ConfigurationError

__all__ = [
    "iid_shards",
    "dirichlet_shards",
    "PartitionSpec",
    "parse_partition",
    "column_partition",
    "vertical_split",
]


def _check_k(k: int, n: int, what: str = "samples") -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k > n:
        raise ConfigurationError(
            f"cannot split {n} {what} into k={k!r} parts: k must be an int with 1 <= k <= n (n={n})"
        )


def iid_shards(n: int, k: int, seed: int) -> list[torch.Tensor]:
    """Split ``range(n)`` uniformly at random into ``k`` disjoint int64 index tensors.

    The shards cover every index once and their sizes differ by at most 1 (the
    first ``n % k`` shards get one more). Deterministic for a given ``seed``.

    Raises:
        ConfigurationError: ``k < 1`` or ``k > n``.
    """
    _check_k(k, n)
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    return [s.clone() for s in torch.tensor_split(perm, k)]


def dirichlet_shards(
    labels: torch.Tensor | Sequence[int],
    k: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[torch.Tensor]:
    """Label-skewed split: for each class, its samples are divided among the ``k`` shards
    in proportions drawn from ``Dirichlet(alpha, ..., alpha)``.

    Small ``alpha`` (e.g. 0.1) gives each shard few classes; large ``alpha`` tends to IID.
    Draws are repeated (at most ``max_tries`` times) until every shard has at least
    ``min_size`` samples; if that never happens, samples are moved from the largest
    shards to the short ones so the guarantee still holds. Shards are disjoint, cover
    every index, and are returned as sorted int64 tensors. Deterministic for a ``seed``.

    Raises:
        ConfigurationError: ``k < 1``, ``k > n``, ``alpha <= 0`` or not finite,
            ``min_size < 1`` or ``k * min_size > n``.
    """
    y = torch.as_tensor(labels).flatten().to(torch.int64).numpy()
    n = int(y.shape[0])
    _check_k(k, n)
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ConfigurationError(f"dirichlet alpha must be a finite number > 0, got {alpha!r}")
    if min_size < 1 or k * min_size > n:
        raise ConfigurationError(f"cannot give each of k={k} shards at least min_size={min_size} of n={n} samples")
    rng = np.random.default_rng(int(seed))
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    parts: list[list[np.ndarray]] = []
    for _ in range(max(1, max_tries)):
        parts = [[] for _ in range(k)]
        for idx in by_class:
            idx = rng.permutation(idx)
            props = rng.dirichlet(np.full(k, float(alpha)))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
            for j, piece in enumerate(np.split(idx, cuts)):
                parts[j].append(piece)
        if min(sum(len(p) for p in ps) for ps in parts) >= min_size:
            break
    shards = [np.concatenate(ps) if ps else np.empty(0, np.int64) for ps in parts]
    # Repair (rare): move random samples from the largest shards to the short ones.
    for j in range(k):
        while len(shards[j]) < min_size:
            donor = max(range(k), key=lambda i: len(shards[i]))
            take = min(min_size - len(shards[j]), len(shards[donor]) - min_size)
            pick = rng.choice(len(shards[donor]), size=take, replace=False)
            shards[j] = np.concatenate([shards[j], shards[donor][pick]])
            shards[donor] = np.delete(shards[donor], pick)
    return [torch.from_numpy(np.sort(s).astype(np.int64)) for s in shards]


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed horizontal partition scheme: ``kind`` is "iid" or "dirichlet" (with ``alpha``)."""

    kind: Literal["iid", "dirichlet"]
    alpha: float | None = None

    def __call__(self, labels: torch.Tensor, k: int, seed: int) -> list[torch.Tensor]:
        """Partition the samples whose labels are ``labels`` into ``k`` index shards."""
        if self.kind == "iid":
            return iid_shards(int(torch.as_tensor(labels).numel()), k, seed)
        assert self.alpha is not None
        return dirichlet_shards(labels, k, self.alpha, seed)

    def __str__(self) -> str:
        return "iid" if self.kind == "iid" else f"dirichlet:{self.alpha:g}"


_SPEC_HELP = 'use "iid" or "dirichlet:<alpha>" with alpha > 0, e.g. "dirichlet:0.5"'


def parse_partition(spec: str) -> PartitionSpec:
    """Parse ``"iid"`` or ``"dirichlet:<alpha>"`` into a callable :class:`PartitionSpec`.

    Raises:
        ConfigurationError: unknown scheme, missing or invalid alpha.
    """
    if not isinstance(spec, str):
        raise ConfigurationError(f"partition spec must be a string; {_SPEC_HELP}; got {spec!r}")
    s = spec.strip().lower()
    if s == "iid":
        return PartitionSpec("iid")
    m = re.fullmatch(r"dirichlet(?::(.*))?", s)
    if m is None:
        raise ConfigurationError(f"unknown partition scheme {spec!r}; {_SPEC_HELP}")
    if m.group(1) is None or not m.group(1).strip():
        raise ConfigurationError(f"partition {spec!r} lacks alpha; {_SPEC_HELP}")
    try:
        alpha = float(m.group(1))
    except ValueError:
        raise ConfigurationError(f"partition {spec!r}: alpha {m.group(1)!r} is not a number; {_SPEC_HELP}") from None
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigurationError(f"partition {spec!r}: alpha must be finite and > 0; {_SPEC_HELP}")
    return PartitionSpec("dirichlet", alpha)


def column_partition(
    shape: int | Sequence[int],
    k: int = 2,
    how: Literal["halves", "contiguous"] = "halves",
) -> list[torch.Tensor]:
    """Split one sample's features into ``k`` disjoint groups for vertical split learning.

    Each group is an int64 tensor of indices into the sample's *flattened* features
    (row-major, length ``prod(shape)``); together they cover every feature once.

    * ``how="halves"``: ``shape`` is (H, W) or (C, H, W); the image is cut along its
      width into ``k`` vertical strips of near-equal width (``k=2``: left and right
      halves). A strip's indices are in row-major order, so ``x[:, idx]`` can be
      reshaped to (N, C, H, strip_width).
    * ``how="contiguous"``: ``k`` contiguous near-equal runs of the flat feature vector.

    Raises:
        ConfigurationError: unknown ``how``, a bad shape, ``k < 1`` or ``k`` larger
            than the image width (halves) or the number of features (contiguous).
    """
    dims = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
    if not dims or any(d < 1 for d in dims):
        raise ConfigurationError(f"column_partition: invalid feature shape {shape!r}")
    total = math.prod(dims)
    if how == "contiguous":
        _check_k(k, total, "features")
        return [s.clone() for s in torch.tensor_split(torch.arange(total), k)]
    if how == "halves":
        if len(dims) not in (2, 3):
            raise ConfigurationError(
                f"column_partition(how='halves') needs an image shape (H, W) or (C, H, W), got {shape!r}; "
                f"use how='contiguous' for flat features"
            )
        width = dims[-1]
        _check_k(k, width, "image columns")
        grid = torch.arange(total).reshape(dims)
        return [strip.reshape(-1).clone() for strip in torch.tensor_split(grid, k, dim=-1)]
    raise ConfigurationError(f"column_partition: unknown how={how!r}; use 'halves' or 'contiguous'")


def vertical_split(features: torch.Tensor, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Give each party its feature columns: returns ``[features.flatten(1)[:, idx] for idx in parts]``.

    Raises:
        ConfigurationError: an index is out of range for the number of features, or ``features`` are
            several named tensors (a mapping: columns of which tensor?).
    """
    if isinstance(features, Mapping):
        raise ConfigurationError(
            f"vertical_split takes one feature tensor; got named features ({', '.join(map(str, features))}): "
            f"give each party its own tensor (VerticalData(parts=[...], labels=...))"
        )
    flat = features.reshape(features.shape[0], -1)
    f = flat.shape[1]
    out = []
    for i, idx in enumerate(parts):
        idx = torch.as_tensor(idx, dtype=torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= f):
            raise ConfigurationError(f"vertical_split: part {i} indexes outside the {f} features per sample")
        out.append(flat[:, idx])
    return out
