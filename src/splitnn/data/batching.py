"""The order in which samples are visited: one seeded permutation per epoch.

It lives with the data (the lowest layer) because every party needs it: the
orchestrator, a worker running a shipped epoch, a monolithic twin in a test.

Each derives it from the same (seed, epoch) and gets the same batches.

A data holder draws its batches itself (:class:`BatchDraw`): each index tensor
:func:`epoch_batches` returns carries the draw that made it (``indices.draw``), which the
researcher sends instead of naming rows; the holder re-derives the rows with this same function
over its own dataset size (:func:`draw_rows`), so a researcher may choose the seed, never the rows.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from splitnn.errors import ConfigurationError

#: Largest seed, epoch, position or batch size of a draw (they travel as JSON integers).
MAX_DRAW = 1 << 40


@dataclass(frozen=True)
class BatchDraw:
    """Batch ``position`` of epoch ``epoch`` of :func:`epoch_batches` (``batch_size``, ``shuffle``,
    ``seed``) over the dataset the holder holds: what a researcher asks a data holder for."""

    seed: int
    epoch: int
    position: int
    batch_size: int
    shuffle: bool = True

    def __post_init__(self) -> None:
        # (one draw per batch at each party: the usual, valid draw is checked in one expression)
        if (
            type(self.seed) is int
            and type(self.epoch) is int
            and type(self.position) is int
            and type(self.batch_size) is int
            and type(self.shuffle) is bool
            and 0 <= self.seed <= MAX_SEED
            and 0 <= self.epoch < MAX_DRAW
            and 0 <= self.position < MAX_DRAW
            and 1 <= self.batch_size < MAX_DRAW
        ):
            return
        for name in ("seed", "epoch", "position", "batch_size"):
            v = getattr(self, name)
            low = 1 if name == "batch_size" else 0
            high = MAX_SEED if name == "seed" else MAX_DRAW - 1
            if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
                raise ConfigurationError(f"BatchDraw.{name} must be an integer {low}..{high}, got {v!r}")
        if not isinstance(self.shuffle, bool):
            raise ConfigurationError(f"BatchDraw.shuffle must be a bool, got {self.shuffle!r}")

    def to_dict(self) -> dict:
        """The draw as plain data (what travels): its fields by name. (Written out, not ``dataclasses.asdict``,
        which deep-copies each field: a draw travels with every batch of the per-op path.)"""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
        }


def draw_rows(n: int, draw: BatchDraw, batches: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The rows of ``draw`` over a dataset of ``n`` samples (ConfigurationError past the last batch);
    ``batches``: the epoch's batches for ``draw`` if computed already."""
    if batches is None:
        batches = epoch_batches(n, draw.batch_size, shuffle=draw.shuffle, seed=draw.seed, epoch=draw.epoch)
    if draw.position >= len(batches):
        raise ConfigurationError(
            f"batch {draw.position} does not exist: {n} samples make {len(batches)} batches of {draw.batch_size}"
        )
    return batches[draw.position]


#: The largest seed of a training run: every stream derived from it (``seed * 1_000_003 + epoch`` here, the
#: partitioners', the weights') stays within what ``torch.Generator.manual_seed`` accepts.
MAX_SEED = 2**32 - 1


def check_seed(seed: object, what: str = "seed") -> int:
    """``seed`` if it is an integer in ``0..MAX_SEED``, else a :class:`ConfigurationError` naming ``what``."""
    try:
        value = None if isinstance(seed, bool) else operator.index(seed)  # int, numpy integers
    except TypeError:
        value = None
    if value is None or not 0 <= value <= MAX_SEED:
        shown = f"{seed!r:.40}" + ("..." if len(repr(seed)) > 40 else "")
        raise ConfigurationError(f"{what} must be an integer in 0..{MAX_SEED} (2**32 - 1), got {shown}")
    return value


def epoch_batches(
    n: int, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0
) -> list[torch.Tensor]:
    """Index tensors of the batches of one epoch over ``n`` samples (the last one may be short); each
    carries its :class:`BatchDraw` as ``.draw`` (see the module docstring)."""
    if n < 1:
        raise ConfigurationError("cannot make batches of an empty dataset")
    if batch_size < 1:
        raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}")
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    else:
        order = torch.arange(n)
    batches = list(torch.split(order, batch_size))
    if 0 <= seed <= MAX_SEED and 0 <= epoch < MAX_DRAW and batch_size < MAX_DRAW:
        for position, idx in enumerate(batches):
            idx.draw = BatchDraw(seed, epoch, position, batch_size, shuffle)
    return batches
