from __future__ import annotations

import threading

import pytest

from splitnn.accounting import Ledger, LinkTotal


def test_records_aggregate_per_link():
    ledger = Ledger()
    ledger.record("alice", "bob", "activation", 100)
    ledger.record("alice", "bob", "activation", 50)
    ledger.record("bob", "alice", "gradient", 150)
    assert ledger.links() == [
        LinkTotal("alice", "bob", "activation", 2, 150),
        LinkTotal("bob", "alice", "gradient", 1, 150),
    ]
    assert ledger.total() == 300
    assert ledger.total(src="alice") == 150
    assert ledger.total(kind="gradient", dst="alice") == 150
    assert ledger.count(src="alice") == 2
    assert ledger.sent_by() == {"alice": 150, "bob": 150}
    assert ledger.received_by() == {"bob": 150, "alice": 150}


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown transfer kind 'pickle'"):
        Ledger().record("a", "b", "pickle", 1)


def test_since_reports_only_new_transfers():
    ledger = Ledger()
    ledger.record("a", "b", "weights", 10)
    before = ledger.snapshot()
    ledger.record("a", "b", "weights", 5)
    ledger.record("b", "c", "control", 1)
    diff = ledger.since(before)
    assert diff.links() == [LinkTotal("a", "b", "weights", 1, 5), LinkTotal("b", "c", "control", 1, 1)]
    assert before.total() == 10  # the snapshot did not move


def test_concurrent_records_are_not_lost():
    ledger = Ledger()

    def work():
        for _ in range(2000):
            ledger.record("a", "b", "activation", 1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.total() == 8000 and ledger.count() == 8000


def test_format_table_lists_every_link():
    ledger = Ledger()
    ledger.record("alice", "bob", "activation", 32768)
    text = ledger.format_table()
    assert "alice" in text and "32768" in text and text.count("\n") == 1


def test_negative_byte_counts_are_refused():
    with pytest.raises(ValueError, match="cannot be negative"):
        Ledger().record("a", "b", "activation", -1)


def test_compressed_transfers_keep_their_raw_size_beside_the_bytes_sent():
    ledger = Ledger()
    ledger.record("alice", "bob", "activation", 100)  # uncompressed: raw = sent
    ledger.record("alice", "bob", "activation", 30, raw=120)
    ledger.record("bob", "alice", "gradient", 40, raw=120)
    assert ledger.links() == [
        LinkTotal("alice", "bob", "activation", 2, 130, 220),
        LinkTotal("bob", "alice", "gradient", 1, 40, 120),
    ]
    assert LinkTotal("a", "b", "weights", 1, 5) == LinkTotal("a", "b", "weights", 1, 5, 5)
    assert ledger.total() == 170 and ledger.raw_total() == 340 and ledger.raw_total(kind="gradient") == 120
    assert ledger.sent_by() == {"alice": 130, "bob": 40} and ledger.raw_sent_by() == {"alice": 220, "bob": 120}
    before = ledger.snapshot()
    assert before.links() == ledger.links()
    ledger.record("bob", "alice", "gradient", 10, raw=60)
    assert ledger.since(before).links() == [LinkTotal("bob", "alice", "gradient", 1, 10, 60)]
    merged = Ledger()
    merged.merge(ledger.links())
    assert merged.links() == ledger.links()
    assert ledger.to_rows()[0] == {
        "src": "alice",
        "dst": "bob",
        "kind": "activation",
        "count": 2,
        "nbytes": 130,
        "raw_nbytes": 220,
    }
    text = ledger.format_table()
    assert text.splitlines()[0].split()[-2:] == ["raw", "bytes"] and "220" in text
    with pytest.raises(ValueError, match="negative"):
        ledger.record("a", "b", "activation", 1, raw=-1)


def test_without_compression_the_table_has_no_raw_column():
    ledger = Ledger()
    ledger.record("alice", "bob", "activation", 8)
    assert "raw" not in ledger.format_table()
