"""Private set intersection aligns vertically partitioned parties: each keeps exactly the common samples, in
one order; PSI messages are ``psi`` bytes on the parties' own links and carry no id in the clear; the
researcher learns sizes only."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import splitnn
from splitnn.accounting import RESEARCHER
from splitnn.errors import ConfigurationError, PolicyError, WorkerError
from splitnn.training import VerticalSplitNN
from splitnn.training.alignment import intersect
from splitnn.training.topologies.vertical import VerticalData
from splitnn.workers import VirtualWorker
from tests.helpers import assert_same_weights


def _number(sid: str) -> int:
    return int("".join(ch for ch in sid if ch.isdigit()))


def _feature(sid: str, column: int) -> float:
    """A value only this patient has: row i is patient id_i exactly when the value matches."""
    return float(_number(sid) * 10 + column)


def _label(sid: str) -> float:
    return float(_number(sid) % 2)


def _parties(ids_a, ids_b, ids_lab):
    a, b, lab = VirtualWorker("hospital_a"), VirtualWorker("hospital_b"), VirtualWorker("lab")
    for w, ids in ((a, ids_a), (b, ids_b)):
        col = 0 if w is a else 1
        w.add_dataset("p", features=torch.tensor([[_feature(s, col), _feature(s, col + 2)] for s in ids]), ids=ids)
    lab.add_dataset("p", labels=torch.tensor([_label(s) for s in ids_lab]), ids=ids_lab)
    return a, b, lab


def _ids(n0: int, n1: int) -> list[str]:
    return [f"P{i}" for i in range(n0, n1)]


def test_overlapping_ids_leave_every_party_the_same_patients_in_the_same_order():
    ids_a = list(reversed(_ids(0, 60)))
    ids_b = _ids(20, 90)[::2] + _ids(20, 90)[1::2]  # another order
    ids_lab = _ids(10, 70)
    a, b, lab = _parties(ids_a, ids_b, ids_lab)
    result = intersect("p", [a, b], lab)
    common = sorted(set(ids_a) & set(ids_b) & set(ids_lab))
    assert result.size == len(common) == 40 and result.parts == {}
    for w in (a, b, lab):
        assert w._data["p"].ids == common  # ascending id order at everyone
    # row i is the same patient everywhere: check with values only that patient has
    assert a._data["p"].features[:, 0].tolist() == [_feature(s, 0) for s in common]
    assert b._data["p"].features[:, 0].tolist() == [_feature(s, 1) for s in common]
    assert lab._data["p"].labels.tolist() == [_label(s) for s in common]
    # each party now sees only its own ids and the intersection (here: exactly the intersection)
    for w, own in ((a, ids_a), (b, ids_b), (lab, ids_lab)):
        assert set(w._data["p"].ids) <= set(own) and set(w._data["p"].ids) == set(common)


def test_psi_messages_travel_on_the_parties_own_links_without_ids_in_the_clear(monkeypatch):
    # ids long enough that no one turns up in kilobytes of random-looking bytes by chance
    ids_a, ids_b, ids_lab = ([f"patient-{i:08d}-record" for i in range(*r)] for r in ((0, 50), (10, 60), (5, 55)))
    a, b, lab = _parties(ids_a, ids_b, ids_lab)
    seen: list[tuple[str, str, bytes]] = []
    receive = VirtualWorker._receive_bytes

    def spy(self, ref):
        payload = receive(self, ref)
        seen.append((ref.owner, self.name, payload))
        return payload

    monkeypatch.setattr(VirtualWorker, "_receive_bytes", spy)
    intersect("p", [a, b], lab)
    ledger = a.ledger
    assert {(l.src, l.dst) for l in ledger.links()} == {
        ("lab", "hospital_a"),
        ("hospital_a", "lab"),
        ("lab", "hospital_b"),
        ("hospital_b", "lab"),
    }  # the two hospitals never talk, the researcher gets nothing
    assert {l.kind for l in ledger.links()} == {"psi"}
    assert ledger.total(src=RESEARCHER) == ledger.total(dst=RESEARCHER) == 0
    assert sum(len(p) for *_, p in seen) == ledger.total(kind="psi")  # every message is counted, exactly
    every_id = {s.encode() for s in ids_a + ids_b + ids_lab}
    for src, dst, payload in seen:
        leaked = [s for s in every_id if s in payload]
        assert not leaked, f"{src} -> {dst} carries ids in the clear: {leaked[:3]}"


def test_the_researcher_learns_sizes_and_cannot_fetch_psi_messages():
    a, b, lab = _parties(_ids(0, 30), _ids(0, 30), _ids(0, 30))
    request = lab.psi_request("s", "p")
    with pytest.raises(PolicyError):
        lab.fetch(request)
    lab.psi_cancel("p")


def test_identical_id_lists_in_different_orders_keep_every_row():
    ids = _ids(100, 140)
    a, b, lab = _parties(ids, list(reversed(ids)), ids[::3] + ids[1::3] + ids[2::3])
    assert intersect("p", [a, b], lab).size == 40
    assert lab._data["p"].labels.tolist() == [_label(s) for s in sorted(ids)]
    assert b._data["p"].features[:, 1].tolist() == [_feature(s, 3) for s in sorted(ids)]


def test_disjoint_ids_are_refused_and_nothing_changes():
    a, b, lab = _parties(_ids(0, 20), _ids(10, 30), _ids(20, 40))  # every pair overlaps, all three do not
    before = {w.name: (list(w._data["p"].ids), w.dataset_stats("p").size) for w in (a, b, lab)}
    with pytest.raises(ConfigurationError, match="no common samples"):
        intersect("p", [a, b], lab)
    assert {w.name: (list(w._data["p"].ids), w.dataset_stats("p").size) for w in (a, b, lab)} == before
    assert intersect("p", [b], lab).size == 10  # a later attempt starts from every row again (P20..P29)
    with pytest.raises(WorkerError, match="no intersection was computed"):
        a.psi_apply("p")


def test_duplicated_ids_are_refused_naming_examples():
    with pytest.raises(ConfigurationError, match=r"appear more than once \(e\.g\. \['P3', 'P5'\]\)"):
        VirtualWorker("a").add_dataset("p", features=torch.zeros(5, 1), ids=["P3", "P5", "P3", "P5", "P1"])
    with pytest.raises(ConfigurationError, match="non-empty strings"):
        VirtualWorker("a").add_dataset("p", features=torch.zeros(2, 1), ids=[1, 2])
    with pytest.raises(ConfigurationError, match="2 ids for 3 rows"):
        VirtualWorker("a").add_dataset("p", features=torch.zeros(3, 1), ids=["a", "b"])


def test_a_party_without_ids_or_without_psi_is_refused():
    a, b, lab = _parties(_ids(0, 10), _ids(0, 10), _ids(0, 10))
    b.add_dataset("p", features=torch.zeros(10, 2), replace=True)  # replaced: no ids
    with pytest.raises(WorkerError, match="holds no sample ids for dataset 'p'"):
        intersect("p", [a, b], lab)
    assert a._data["p"].ids == _ids(0, 10)

    class Plain:
        name, ledger = "x", splitnn.Ledger()

    with pytest.raises(ConfigurationError, match="cannot run private set intersection"):
        intersect("p", [a, Plain()], lab)
    with pytest.raises(ConfigurationError, match="distinct"):
        intersect("p", [a, a], lab)


def test_split_cuts_the_same_patients_at_every_party():
    a, b, lab = _parties(_ids(0, 100), _ids(5, 100), _ids(0, 95))
    result = intersect("p", [a, b], lab, split={"train": 0.75, "test": 0.25}, seed=3)
    assert result.size == 90 and result.parts == {"p:train": 68, "p:test": 22}
    for part in ("p:train", "p:test"):
        ids = lab._data[part].ids
        assert a._data[part].ids == b._data[part].ids == ids
        assert a._data[part].features[:, 0].tolist() == [_feature(s, 0) for s in ids]
    assert set(lab._data["p:train"].ids).isdisjoint(lab._data["p:test"].ids)
    with pytest.raises(ConfigurationError, match="add up to more than 1"):
        intersect("p", [a, b], lab, split={"train": 0.8, "test": 0.3})


def test_training_on_psi_aligned_parties_equals_training_on_rows_aligned_in_the_clear():
    ids_a, ids_b, ids_lab = _ids(0, 80)[::-1], _ids(8, 90), _ids(4, 84)
    a, b, lab = _parties(ids_a, ids_b, ids_lab)
    intersect("p", [a, b], lab)
    common = sorted(set(ids_a) & set(ids_b) & set(ids_lab))
    torch.manual_seed(0)
    bottoms = [nn.Sequential(nn.Linear(2, 4), nn.ReLU()) for _ in range(2)]
    top = [nn.Linear(8, 1)]
    initial = copy.deepcopy((bottoms, top))

    def scaled(t):  # keep the values small for training
        return t / 1000

    for w in (a, b):
        w.add_dataset("p", features=scaled(w._data["p"].features), ids=w._data["p"].ids, replace=True)
    psi_model = VerticalSplitNN(bottoms, [a, b], top, lab, loss="bce_with_logits")
    psi_model.fit("p", epochs=2, batch_size=16, progress=False)

    clear = VerticalData(
        [scaled(torch.tensor([[_feature(s, c), _feature(s, c + 2)] for s in common])) for c in (0, 1)],
        torch.tensor([_label(s) for s in common]),
    )
    names = ("a", "b", "l")
    twin = VerticalSplitNN(*initial[:1], [VirtualWorker(n) for n in names[:2]], initial[1], VirtualWorker("l"))
    twin.loss = "bce_with_logits"
    twin.fit(clear, epochs=2, batch_size=16, progress=False)
    assert_same_weights(psi_model.collect(), twin.collect())
