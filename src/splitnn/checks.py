"""Checks of a settings dataclass's fields: whole counts and finite amounts, one rule each.

An error names the class and the field, e.g. ``UnSplitConfig.rounds must be a positive integer, got 0``.
A bool is never taken for a number.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import TypeVar

from splitnn.errors import ConfigurationError, WireError

T = TypeVar("T")

__all__ = ["check_amounts", "check_counts", "check_positive", "from_wire_fields"]


def check_positive(name: str, value: object, *, none_means: str | None = None, optional: bool = False) -> int | None:
    """``value``, a positive integer (a bool is not one); ``None`` passes when ``optional``, or with ``none_means``,
    which the error then says (``"turn_batches must be a positive integer or None (one turn per epoch)"``)."""
    if value is None and (optional or none_means is not None):
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        also = f" or None ({none_means})" if none_means is not None else ""
        raise ConfigurationError(f"{name} must be a positive integer{also}, got {value!r}")
    return value


def check_counts(
    settings: object,
    names: Iterable[str],
    *,
    minimum: int = 1,
    below: int | None = None,
    wording: str | None = None,
) -> None:
    """Refuse a field of ``settings`` named in ``names`` that is not an integer from ``minimum`` (and under
    ``below`` when given); ``wording`` says what it must be (default: ``a positive integer`` for a minimum of 1,
    else ``an integer >= <minimum>``)."""
    wording = wording or ("a positive integer" if minimum == 1 else f"an integer >= {minimum}")
    for name in names:
        value = getattr(settings, name)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < minimum
            or (below is not None and value >= below)
        ):
            raise ConfigurationError(f"{type(settings).__name__}.{name} must be {wording}, got {value!r}")


def check_amounts(settings: object, names: Iterable[str]) -> None:
    """Refuse a field of ``settings`` named in ``names`` that is not a finite number >= 0 (a weight, a rate)."""
    for name in names:
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ConfigurationError(f"{type(settings).__name__}.{name} must be a finite number >= 0, got {value!r}")


def from_wire_fields(cls: type[T], value: object, what: str) -> T:
    """A settings dataclass ``cls`` from its wire form: an object with exactly its fields, checked by ``cls``
    itself; WireError naming ``what`` otherwise."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    if not isinstance(value, dict) or set(value) != set(names):
        raise WireError(f"{what} must be an object {{{', '.join(names)}}}")
    try:
        return cls(**value)
    except ConfigurationError as exc:
        raise WireError(str(exc)) from None
