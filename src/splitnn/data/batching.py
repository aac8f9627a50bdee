"""The order in which samples are visited: one seeded permutation per epoch.

It lives with the data (the lowest layer) because every party needs it: the
orchestrator, a worker running a shipped epoch, a monolithic twin in a test.

Each derives it from the same (seed, epoch) and gets the same batches.
"""

from __future__ import annotations

import operator

import torch

from splitnn.errors import ConfigurationError

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
    """Index tensors of the batches of one epoch over ``n`` samples (the last one may be short)."""
    if n < 1:
        raise ConfigurationError("cannot make batches of an empty dataset")
    if batch_size < 1:
        raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}")
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    else:
        order = torch.arange(n)
    return list(torch.split(order, batch_size))
