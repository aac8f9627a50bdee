"""Fingerprints of segments: the sha256 of a segment's canonical spec.

:func:`fingerprint` computes one (its docstring says what it depends on), :func:`check_fingerprint`
checks one, :func:`segment_fingerprints` gives a model's per segment. Print a saved model's with
``splitnn fingerprint model.safetensors`` (per segment when the file records its cuts, as
``splitnn train --save`` writes it).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import nn

from splitnn.errors import SpecError
from splitnn.wire.spec import canonical_json, module_to_spec

__all__ = ["FINGERPRINT_VERSION", "fingerprint", "check_fingerprint", "segment_fingerprints", "combine_fingerprints"]

#: Mixed into every fingerprint: changes if the canonical form ever changes.
FINGERPRINT_VERSION = "splitnn-segment-v1"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def fingerprint(segment: nn.Module | Mapping[str, Any]) -> str:
    """The fingerprint (64 hex digits) of a segment, given as a module or as its spec.

    Raises :class:`~splitnn.errors.SpecError` when the module cannot be described as a spec
    (a class neither registered nor importable; see :func:`splitnn.wire.module_to_spec`).

    A party that wants to approve one architecture once (a hospital's data holder) pins the
    fingerprints of the segments it accepts in its policy (``accept_segments``); nothing else
    is built on its data. A fingerprint depends on *what runs*, not on the weights (which change
    with every step) nor on names that only choose state-dict keys: it is the sha256 of
    :func:`~splitnn.wire.spec.canonical_json` of the segment's spec, prefixed with a version tag
    so that a later canonical form cannot collide with this one.

    >>> from torch import nn
    >>> fp = fingerprint(nn.Sequential(nn.Linear(784, 128), nn.ReLU()))
    >>> fp == fingerprint({"type": "Sequential", "layers": [
    ...     {"type": "Linear", "in_features": 784, "out_features": 128}, {"type": "ReLU"}]})
    True
    """
    spec = module_to_spec(segment) if isinstance(segment, nn.Module) else segment
    text = canonical_json(dict(spec) if isinstance(spec, Mapping) else spec)
    return hashlib.sha256(f"{FINGERPRINT_VERSION}\n{text}".encode("ascii")).hexdigest()


def check_fingerprint(value: object, where: str) -> str:
    """``value`` as a fingerprint (64 lower-case hex digits; an optional ``sha256:`` prefix is dropped),
    or a :class:`SpecError` naming ``where``."""
    if isinstance(value, str):
        text = value.strip().lower()
        text = text[len("sha256:") :] if text.startswith("sha256:") else text
        if _HEX64.match(text):
            return text
    raise SpecError(
        f"{where}: {value!r} is not a segment fingerprint (64 hex digits, as `splitnn fingerprint` prints them)"
    )


@runtime_checkable
class _Staged(Protocol):
    """A model whose segments sit at workers (``SplitNN``): its stages name each segment's worker and key."""

    stages: Sequence[Any]


def segment_fingerprints(model: object) -> list[str]:
    """The fingerprint of each segment of ``model``, in order.

    ``model`` is a sequence of segments (``nn.Module``), or a model trained with splitnn whose
    segments can be fetched from their workers (``SplitNN``: each ``collect``-ed segment,
    recorded as weights in the ledger). For a whole saved model file see
    ``splitnn fingerprint``.
    """
    if isinstance(model, Sequence) and not isinstance(model, (str, bytes)):
        return [fingerprint(m) for m in model]
    if isinstance(model, nn.Module) or not isinstance(model, _Staged):
        raise SpecError(
            "segment_fingerprints takes the segments of a model (a list of modules, or a SplitNN); "
            "for one segment use fingerprint(module)"
        )
    return [fingerprint(s.worker.fetch_segment(s.key)) for s in model.stages]  # a SplitNN: fetched from its workers


def combine_fingerprints(parts: Iterable[str]) -> str:
    """One fingerprint over several, in order (a model's over its segments', a party's over its own)."""
    h = hashlib.sha256(f"{FINGERPRINT_VERSION}:combined".encode("ascii"))
    for p in parts:
        h.update(b"\n" + p.encode("utf-8"))
    return h.hexdigest()
