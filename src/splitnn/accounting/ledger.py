"""The ledger: one place that records every transfer between parties.

Each record is (source, destination, kind, bytes). Reports, benchmarks and the
federated-learning comparisons read this ledger; nothing estimates what can be
measured. Records are aggregated per (source, destination, kind) so recording
costs a dictionary update, cheap enough for the per-batch hot path.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from splitnn.accounting.tally import Tally

#: Name under which the orchestrating process appears in the ledger.
RESEARCHER = "researcher"

#: Kinds of transfer the library records.
KINDS = ("activation", "gradient", "weights", "labels", "features", "output", "control", "psi")


@dataclass(frozen=True)
class LinkTotal:
    """Aggregated transfers over one (source, destination, kind) link."""

    src: str
    dst: str
    kind: str
    count: int
    nbytes: int


class Ledger:
    """Thread-safe byte ledger of transfers between named parties.

    >>> ledger = Ledger()
    >>> ledger.record("alice", "bob", "activation", 32768)
    >>> ledger.total(src="alice")
    32768
    """

    def __init__(self) -> None:
        self._tally = Tally()

    def record(self, src: str, dst: str, kind: str, nbytes: int) -> None:
        """Record one transfer of ``nbytes`` bytes of ``kind`` from ``src`` to ``dst``."""
        if kind not in KINDS:
            raise ValueError(f"unknown transfer kind {kind!r}; expected one of {KINDS}")
        if nbytes < 0:
            raise ValueError(f"a transfer of {nbytes} bytes from {src!r} to {dst!r}: byte counts cannot be negative")
        self._tally.add((src, dst, kind), nbytes)

    def merge(self, links: Iterable[LinkTotal]) -> None:
        """Add totals measured elsewhere (e.g. reported by a remote worker)."""
        for link in links:
            self._tally.add((link.src, link.dst, link.kind), link.nbytes, link.count)

    def links(self) -> list[LinkTotal]:
        """All links with their totals, sorted by (source, destination, kind)."""
        return [LinkTotal(s, d, k, c, b) for (s, d, k), c, b in self._tally.items()]

    def total(self, *, src: str | None = None, dst: str | None = None, kind: str | None = None) -> int:
        """Bytes over all links matching the given source, destination and kind."""
        return sum(link.nbytes for link in self._matching(src, dst, kind))

    def count(self, *, src: str | None = None, dst: str | None = None, kind: str | None = None) -> int:
        """Number of transfers over all links matching the filters."""
        return sum(link.count for link in self._matching(src, dst, kind))

    def _matching(self, src: str | None, dst: str | None, kind: str | None) -> list[LinkTotal]:
        return [
            link
            for link in self.links()
            if (src is None or link.src == src)
            and (dst is None or link.dst == dst)
            and (kind is None or link.kind == kind)
        ]

    def parties(self) -> list[str]:
        """Every party that sent or received something."""
        return sorted({name for link in self.links() for name in (link.src, link.dst)})

    def sent_by(self) -> dict[str, int]:
        """Bytes sent by each party."""
        out: dict[str, int] = {}
        for link in self.links():
            out[link.src] = out.get(link.src, 0) + link.nbytes
        return out

    def received_by(self) -> dict[str, int]:
        """Bytes received by each party."""
        out: dict[str, int] = {}
        for link in self.links():
            out[link.dst] = out.get(link.dst, 0) + link.nbytes
        return out

    def snapshot(self) -> Ledger:
        """A copy of the ledger as it is now."""
        copy = Ledger()
        copy.merge(self.links())
        return copy

    def since(self, earlier: Ledger) -> Ledger:
        """The transfers recorded after ``earlier`` (a snapshot of this ledger) was taken."""
        before = {(l.src, l.dst, l.kind): (l.count, l.nbytes) for l in earlier.links()}
        diff = Ledger()
        for link in self.links():
            c0, b0 = before.get((link.src, link.dst, link.kind), (0, 0))
            if link.count != c0 or link.nbytes != b0:
                diff.merge([LinkTotal(link.src, link.dst, link.kind, link.count - c0, link.nbytes - b0)])
        return diff

    def clear(self) -> None:
        """Forget every record."""
        self._tally.clear()

    def to_rows(self) -> list[dict[str, object]]:
        """Rows for CSV/JSON reports."""
        return [link.__dict__.copy() for link in self.links()]

    def format_table(self) -> str:
        """A plain-text table of every link."""
        rows = [("from", "to", "kind", "transfers", "bytes")]
        rows += [(l.src, l.dst, l.kind, str(l.count), str(l.nbytes)) for l in self.links()]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [
            "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
        ]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Ledger({len(self._tally)} links, {self.total()} bytes)"
