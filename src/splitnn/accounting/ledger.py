"""The ledger: one place that records every transfer between parties.

Each record is (source, destination, kind, bytes). Reports, benchmarks and the
federated-learning comparisons read this ledger; nothing estimates what can be
measured. Records are aggregated per (source, destination, kind) so recording
costs a dictionary update, cheap enough for the per-batch hot path.

Compression at a cut (``SplitNN(..., compression=...)``): the bytes of a record are
those actually sent (the codec's payloads), and its *raw* bytes, kept beside them, the
size the same tensors have uncompressed. Without compression both are the same.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from splitnn.accounting.tally import Tally

#: Name under which the orchestrating process appears in the ledger.
RESEARCHER = "researcher"

#: Kinds of transfer the library records.
KINDS = ("activation", "gradient", "weights", "labels", "features", "output", "control", "psi")

#: Called with ``(src, dst, kind, nbytes)`` for every transfer any ledger of this process records (not for
#: totals merged from elsewhere): a worker's Prometheus metrics (:mod:`splitnn.server.metrics`).
OBSERVERS: list = []


@dataclass(frozen=True)
class LinkTotal:
    """Aggregated transfers over one (source, destination, kind) link.

    ``nbytes`` is what was sent; ``raw_nbytes`` what the same tensors weigh uncompressed
    (default: ``nbytes``; it differs only where a cut compresses, see :class:`Ledger`).
    """

    src: str
    dst: str
    kind: str
    count: int
    nbytes: int
    raw_nbytes: int | None = None

    def __post_init__(self) -> None:
        if self.raw_nbytes is None:
            object.__setattr__(self, "raw_nbytes", self.nbytes)


class Ledger:
    """Thread-safe byte ledger of transfers between named parties.

    >>> ledger = Ledger()
    >>> ledger.record("alice", "bob", "activation", 32768)
    >>> ledger.total(src="alice")
    32768
    """

    def __init__(self) -> None:
        self._tally = Tally()

    def record(self, src: str, dst: str, kind: str, nbytes: int, raw: int | None = None) -> None:
        """Record one transfer of ``nbytes`` bytes of ``kind`` from ``src`` to ``dst`` (``raw``: its size
        uncompressed, when a codec made it ``nbytes``; default ``nbytes``)."""
        if kind not in KINDS:
            raise ValueError(f"unknown transfer kind {kind!r}; expected one of {KINDS}")
        if nbytes < 0 or (raw is not None and raw < 0):
            raise ValueError(f"a transfer of {nbytes} bytes from {src!r} to {dst!r}: byte counts cannot be negative")
        self._tally.add((src, dst, kind), nbytes, 1, raw)
        for observe in OBSERVERS:
            observe(src, dst, kind, nbytes)

    def merge(self, links: Iterable[LinkTotal]) -> None:
        """Add totals measured elsewhere (e.g. reported by a remote worker)."""
        for link in links:
            self._tally.add((link.src, link.dst, link.kind), link.nbytes, link.count, link.raw_nbytes)

    def links(self) -> list[LinkTotal]:
        """All links with their totals, sorted by (source, destination, kind)."""
        return [LinkTotal(s, d, k, c, b, r) for (s, d, k), c, b, r in self._tally.items_raw()]

    def total(self, *, src: str | None = None, dst: str | None = None, kind: str | None = None) -> int:
        """Bytes over all links matching the given source, destination and kind."""
        return sum(link.nbytes for link in self._matching(src, dst, kind))

    def raw_total(self, *, src: str | None = None, dst: str | None = None, kind: str | None = None) -> int:
        """Uncompressed bytes over all links matching the filters (equal to :meth:`total` without compression)."""
        return sum(link.raw_nbytes for link in self._matching(src, dst, kind))

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

    def raw_sent_by(self) -> dict[str, int]:
        """Uncompressed bytes sent by each party (equal to :meth:`sent_by` without compression)."""
        out: dict[str, int] = {}
        for link in self.links():
            out[link.src] = out.get(link.src, 0) + link.raw_nbytes
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
        before = {(l.src, l.dst, l.kind): (l.count, l.nbytes, l.raw_nbytes) for l in earlier.links()}
        diff = Ledger()
        for link in self.links():
            c0, b0, r0 = before.get((link.src, link.dst, link.kind), (0, 0, 0))
            if link.count != c0 or link.nbytes != b0 or link.raw_nbytes != r0:
                diff.merge(
                    [LinkTotal(link.src, link.dst, link.kind, link.count - c0, link.nbytes - b0, link.raw_nbytes - r0)]
                )
        return diff

    def clear(self) -> None:
        """Forget every record."""
        self._tally.clear()

    def to_rows(self) -> list[dict[str, object]]:
        """Rows for CSV/JSON reports."""
        return [link.__dict__.copy() for link in self.links()]

    def format_table(self) -> str:
        """A plain-text table of every link (with a ``raw bytes`` column when something was compressed)."""
        links = self.links()
        raw = any(l.raw_nbytes != l.nbytes for l in links)
        rows = [("from", "to", "kind", "transfers", "bytes", "raw bytes")[: 6 if raw else 5]]
        rows += [
            (l.src, l.dst, l.kind, str(l.count), str(l.nbytes), str(l.raw_nbytes))[: 6 if raw else 5] for l in links
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
        ]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Ledger({len(self._tally)} links, {self.total()} bytes)"
