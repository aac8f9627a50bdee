"""A thread-safe tally of (count, bytes) per key: what the ledger and the wire counters share.

Each key also keeps a *raw* byte sum, the size its transfers had before compression (the
ledger's :attr:`~splitnn.accounting.LinkTotal.raw_nbytes`); it equals the bytes unless told otherwise.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable


class Tally:
    """Counts and byte sums per key, safe to update from several threads."""

    def __init__(self) -> None:
        self._totals: dict[Hashable, list[int]] = {}
        self._lock = threading.Lock()

    def add(self, key: Hashable, nbytes: int, count: int = 1, raw: int | None = None) -> None:
        """Add ``count`` events of ``nbytes`` bytes in all under ``key`` (``raw`` bytes before compression;
        default ``nbytes``)."""
        raw = int(nbytes) if raw is None else int(raw)
        with self._lock:
            entry = self._totals.get(key)
            if entry is None:
                self._totals[key] = [count, int(nbytes), raw]
            else:
                entry[0] += count
                entry[1] += int(nbytes)
                entry[2] += raw

    def items(self) -> list[tuple[Hashable, int, int]]:
        """``(key, count, nbytes)`` for every key, sorted by key."""
        with self._lock:
            items = sorted(self._totals.items())
        return [(key, c, b) for key, (c, b, _) in items]

    def items_raw(self) -> list[tuple[Hashable, int, int, int]]:
        """``(key, count, nbytes, raw)`` for every key, sorted by key."""
        with self._lock:
            items = sorted(self._totals.items())
        return [(key, c, b, r) for key, (c, b, r) in items]

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._totals.clear()

    def __len__(self) -> int:
        return len(self._totals)
