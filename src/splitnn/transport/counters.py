"""Wire byte counters: what one process put on and took off the wire, per peer and kind.

The :class:`~splitnn.accounting.Ledger` counts *tensor* bytes (numel x itemsize), the
same in-process and over the network. These counters measure the *serialized gRPC
messages* (headers, control envelopes and all), so the overhead of the wire format
is measured, not estimated. Each server exposes its counters through the ``stats``
command; each :class:`~splitnn.workers.remote.RemoteWorker` keeps its own.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

DIRECTIONS = ("sent", "recv")


@dataclass(frozen=True)
class WireTotal:
    """Messages and bytes over one (peer, direction, kind)."""

    peer: str
    direction: str
    kind: str
    messages: int
    nbytes: int


class ByteCounters:
    """Thread-safe counters of serialized bytes per (peer, direction, kind)."""

    def __init__(self) -> None:
        self._totals: dict[tuple[str, str, str], list[int]] = {}
        self._lock = threading.Lock()

    def record(self, peer: str, direction: str, kind: str, nbytes: int) -> None:
        """Count one message of ``nbytes`` bytes sent to / received from ``peer``."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        key = (peer, direction, kind)
        with self._lock:
            entry = self._totals.get(key)
            if entry is None:
                self._totals[key] = [1, int(nbytes)]
            else:
                entry[0] += 1
                entry[1] += int(nbytes)

    def totals(self) -> list[WireTotal]:
        """Every counter, sorted."""
        with self._lock:
            items = sorted(self._totals.items())
        return [WireTotal(p, d, k, m, b) for (p, d, k), (m, b) in items]

    def total(self, *, peer: str | None = None, direction: str | None = None, kind: str | None = None) -> int:
        """Bytes over every counter matching the filters."""
        return sum(t.nbytes for t in self.totals()
                   if (peer is None or t.peer == peer) and (direction is None or t.direction == direction)
                   and (kind is None or t.kind == kind))

    def to_rows(self) -> list[dict[str, object]]:
        """JSON-friendly rows."""
        return [t.__dict__.copy() for t in self.totals()]

    @classmethod
    def from_rows(cls, rows: list[dict]) -> "ByteCounters":
        """Rebuild counters from :meth:`to_rows` output (e.g. a server's ``stats`` reply)."""
        c = cls()
        for r in rows:
            c._totals[(str(r["peer"]), str(r["direction"]), str(r["kind"]))] = [int(r["messages"]), int(r["nbytes"])]
        return c

    def clear(self) -> None:
        with self._lock:
            self._totals.clear()
