"""Wire byte counters: what one process put on and took off the wire, per peer and kind.

The :class:`~splitnn.accounting.Ledger` counts *tensor* bytes (numel x itemsize), the
same in-process and over the network. These counters measure the *serialized gRPC
messages* (headers, control envelopes and all), so the overhead of the wire format
is measured, not estimated. Each server exposes its counters through the ``stats``
command; each :class:`~splitnn.client.remote.RemoteWorker` keeps its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitnn.accounting.tally import Tally

DIRECTIONS = ("sent", "recv")

#: Called with ``(peer, direction, kind, nbytes)`` for every message any counter of this process records
#: (a worker's Prometheus metrics, :mod:`splitnn.server.metrics`); empty unless something watches.
OBSERVERS: list = []


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
        self._tally = Tally()

    def record(self, peer: str, direction: str, kind: str, nbytes: int) -> None:
        """Count one message of ``nbytes`` bytes sent to / received from ``peer``."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        self._tally.add((peer, direction, kind), nbytes)
        for observe in OBSERVERS:
            observe(peer, direction, kind, nbytes)

    def totals(self) -> list[WireTotal]:
        """Every counter, sorted."""
        return [WireTotal(p, d, k, m, b) for (p, d, k), m, b in self._tally.items()]

    def total(self, *, peer: str | None = None, direction: str | None = None, kind: str | None = None) -> int:
        """Bytes over every counter matching the filters."""
        return sum(
            t.nbytes
            for t in self.totals()
            if (peer is None or t.peer == peer)
            and (direction is None or t.direction == direction)
            and (kind is None or t.kind == kind)
        )

    def to_rows(self) -> list[dict[str, object]]:
        """JSON-friendly rows."""
        return [t.__dict__.copy() for t in self.totals()]

    @classmethod
    def from_rows(cls, rows: list[dict]) -> ByteCounters:
        """Rebuild counters from :meth:`to_rows` output (e.g. a server's ``stats`` reply)."""
        c = cls()
        for r in rows:
            c._tally.add((str(r["peer"]), str(r["direction"]), str(r["kind"])), int(r["nbytes"]), int(r["messages"]))
        return c

    def clear(self) -> None:
        """Forget every counter."""
        self._tally.clear()
