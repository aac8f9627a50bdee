"""Merging several parties' activations into one input (vertical split learning).

In vertically partitioned training each data holder runs its own bottom segment
on its own feature columns; the next party merges their activations and
continues. The merge is part of the autograd graph, so the gradient of the
merged tensor splits back into one gradient per holder.

Modes (all along the batch's feature dimension, dim 1):

* ``"concat"``: ``torch.cat(xs, dim=1)``; shapes may differ in dim 1 only.
* ``"sum"``: ``xs[0] + xs[1] + ...`` (left to right); shapes must be equal.
* ``"mean"``: the sum above divided by the number of inputs; shapes must be equal.

The order of the additions is fixed so that a monolithic twin that writes
``a + b`` gets bit-identical numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from splitnn.errors import ConfigurationError, ShapeMismatchError

#: The merge modes a merging party understands.
MERGE_MODES = ("concat", "sum", "mean")


def check_merge(mode: str) -> str:
    """Return ``mode`` if it is a known merge mode, else raise :class:`ConfigurationError`."""
    if mode not in MERGE_MODES:
        raise ConfigurationError(f"unknown merge {mode!r}; choose one of {MERGE_MODES}")
    return mode


def merge_tensors(tensors: Sequence[torch.Tensor], mode: str) -> torch.Tensor:
    """Merge ``tensors`` (one per party, same batch) with ``mode``; see the module docstring."""
    check_merge(mode)
    if not tensors:
        raise ConfigurationError("nothing to merge: give at least one tensor")
    if mode == "concat":
        return torch.cat(list(tensors), dim=1)
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total / len(tensors) if mode == "mean" else total


def merged_shape(shapes: Sequence[tuple[int, ...]], mode: str, names: Sequence[str] | None = None) -> tuple[int, ...]:
    """Shape of the merge of tensors of ``shapes``; refuse shapes that ``mode`` cannot merge.

    ``names`` (one per shape, e.g. the parties) make the error message say who
    sent what.

    Raises:
        ShapeMismatchError: ranks differ, batch sizes differ, or sizes differ
            outside dim 1 (``concat``) or anywhere (``sum``/``mean``).
    """
    check_merge(mode)
    shapes = [tuple(int(d) for d in s) for s in shapes]
    if not shapes:
        raise ConfigurationError("nothing to merge: give at least one shape")
    labels = list(names) if names is not None else [f"input {i}" for i in range(len(shapes))]
    described = ", ".join(f"{n} {s}" for n, s in zip(labels, shapes))
    first = shapes[0]
    if any(len(s) != len(first) or len(s) < 2 for s in shapes):
        raise ShapeMismatchError(
            f"cannot {mode}-merge activations of different ranks (need (batch, features, ...)): {described}"
        )
    if mode == "concat":
        if any(s[:1] + s[2:] != first[:1] + first[2:] for s in shapes):
            raise ShapeMismatchError(
                f"cannot concatenate activations along dim 1: their other dims differ: "
                f"{described}; make the bottom segments agree outside the feature dim"
            )
        return (first[0], sum(s[1] for s in shapes), *first[2:])
    if any(s != first for s in shapes):
        raise ShapeMismatchError(
            f"cannot {mode} activations of different shapes: {described}; give every bottom "
            f"segment the same output size, or use merge='concat'"
        )
    return first
