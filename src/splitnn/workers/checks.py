"""Argument checks every Worker implementation makes, written once.

The in-process :class:`~splitnn.workers.VirtualWorker` and the researcher's
:class:`~splitnn.client.RemoteWorker` refuse the same mistakes with the same words, so a
model behaves alike whichever workers it runs on; the checks raise before any work starts
(a remote worker: before anything is sent).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypeVar

from torch import nn

from splitnn.errors import ConfigurationError, WorkerError

T = TypeVar("T")


def check_segment(segment: object, key: str, worker: str) -> nn.Module:
    """``segment`` if it is an ``nn.Module``; ConfigurationError naming the segment and the worker."""
    if not isinstance(segment, nn.Module):
        raise ConfigurationError(
            f"segment {key!r} for worker {worker!r} must be an nn.Module, got {type(segment).__name__}"
        )
    return segment


def held(found: Mapping[str, T], key: str, worker: str, what: str, verb: str = "holds") -> T:
    """``found[key]``, or a WorkerError saying that ``worker`` ``verb`` no ``what`` ``key``, and which it has."""
    try:
        return found[key]
    except KeyError:
        raise WorkerError(f"worker {worker!r} {verb} no {what} {key!r} (it {verb} {sorted(found)})") from None


def check_dataset_parts(name: str, worker: str, *, features: object, labels: object) -> None:
    """A dataset is given features, labels or both."""
    if features is None and labels is None:
        raise ConfigurationError(f"dataset {name!r} for worker {worker!r}: give features, labels or both")


def no_training_forward(worker: str, key: str, *, merged: bool = False) -> WorkerError:
    """The error of a backward on a segment that has not run a training forward since its last backward."""
    op, forward = ("backward_merged", "forward_merged") if merged else ("backward", "forward")
    return WorkerError(f"worker {worker!r}: {op} on segment {key!r} without a training {forward} first")


def no_input_gradient(worker: str, key: str) -> WorkerError:
    """The error of a backward that left no gradient at the segment's input."""
    return WorkerError(f"worker {worker!r}: segment {key!r} got no gradient at its input; did the loss backward run?")


def check_sources(sources: list, key: str, worker: str) -> list:
    """``sources`` of a ``forward_merged`` if there is at least one."""
    if not sources:
        raise WorkerError(f"worker {worker!r}: forward_merged on segment {key!r} needs at least one source")
    return sources


def unreachable(worker: str, peer: str) -> WorkerError:
    """The error of naming a party that the model's workers were not connected to."""
    return WorkerError(f"worker {worker!r} cannot reach {peer!r}; connect the workers of a model first")


def check_averaging(
    keys: Sequence[str], weights: Sequence[float], into: Sequence[str], worker: str
) -> tuple[list[str], list[float], list[str]]:
    """The arguments of ``average_states`` as lists, if they make sense; ConfigurationError naming the fix.

    At least one source and one target, every key a string, one weight per source, each a
    finite number > 0 (a holder that trained on nothing is left out of the average, not
    weighted 0).
    """
    keys, weights, into = list(keys), list(weights), list(into)
    if not keys or not into:
        raise ConfigurationError(f"worker {worker!r}: average_states needs at least one source and one target")
    bad = [k for k in (*keys, *into) if not isinstance(k, str)]
    if bad:
        raise ConfigurationError(f"worker {worker!r}: average_states takes segment keys (strings), got {bad[:3]}")
    if len(weights) != len(keys):
        raise ConfigurationError(
            f"worker {worker!r}: average_states needs one weight per source segment, got {len(weights)} weights "
            f"for {len(keys)} segments"
        )
    for key, w in zip(keys, weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ConfigurationError(
                f"worker {worker!r}: the averaging weight of segment {key!r} must be a finite number > 0 "
                f"(e.g. its sample count), got {w!r}"
            )
    return keys, [float(w) for w in weights], into
