"""Private set intersection across `splitnn worker` processes, each holding its own table (`--data
NAME=table:...`): every party ends with exactly the rows it ends with in process (row i is the same patient
everywhere, checked with values only that patient has), the ledger's psi bytes equal the in-process run's,
the PSI messages travel between the parties only (the researcher's link carries no id: every byte it sends
or receives is searched), and the health example trained afterwards is torch.equal to the in-process run."""

from __future__ import annotations

import csv
import re
import types

import numpy as np
import pytest
import torch
from torch import nn

import splitnn
from splitnn.accounting import RESEARCHER
from splitnn.cli.main import main
from splitnn.client import command_stream
from splitnn.client import remote as client_remote
from splitnn.data import load_table
from splitnn.errors import ConfigurationError, PolicyError, WorkerError
from splitnn.experiments.health import (
    DATASET,
    HOSPITALS,
    ID_COLUMN,
    LAB,
    LABEL_COLUMN,
    HealthConfig,
    run_vertical_health,
    write_breast_cancer_tables,
)
from splitnn.training.alignment import intersect
from splitnn.workers import VirtualWorker
from splitnn.workers.refs import BatchRef
from tests.helpers import assert_same_weights
from tests.transport.cluster import Cluster

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

PARTIES = (*HOSPITALS, LAB)
PATIENTS = 120
HEALTH = HealthConfig(seed=1, epochs=3)  # the health example, shortened
FRAME_OVERHEAD = 64  # bound on a peer frame's bytes beyond its tensor's (24-byte frame + tensor header)


def _sid(n: int) -> str:
    return f"patient-{n:08d}-record"  # long enough that no id turns up in kilobytes of other bytes by chance


def _tables(directory) -> dict[str, dict[str, object]]:
    """Each party's CSV file: about 85% of the patients, in an order of its own; every value names its patient
    (hospital_a column a0 = 10 n, hospital_b column b0 = 10 n + 1, the lab's label y = n)."""
    rng = np.random.default_rng(7)
    out = {}
    for party in PARTIES:
        numbers = [int(n) for n in rng.choice(PATIENTS, size=int(0.85 * PATIENTS), replace=False)]
        path = directory / f"{party}.csv"
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            if party == LAB:
                w.writerow(["id", "y"])
                w.writerows([_sid(n), n] for n in numbers)
            else:
                col = "a" if party == HOSPITALS[0] else "b"
                w.writerow(["id", f"{col}0", f"{col}1"])
                w.writerows([_sid(n), 10 * n + (col == "b"), (n * 7) % 13] for n in numbers)
        out[party] = {"path": path, "ids": [_sid(n) for n in numbers]}
    return out


def _data_flag(party: str, path, name: str = "p") -> str:
    return f"{name}=table:{path},id=id" + (",label=y" if party == LAB else "")


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    return _tables(tmp_path_factory.mktemp("tables"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tables):
    disjoint = tmp_path_factory.mktemp("disjoint")
    health = write_breast_cancer_tables(tmp_path_factory.mktemp("health"), seed=HEALTH.seed, coverage=HEALTH.coverage)
    with Cluster(tmp_path_factory.mktemp("psi")) as cl:
        for party in PARTIES:
            # a second table "d" whose ids the three parties never all share (hospital_a: only its own ids)
            other = disjoint / f"{party}.csv"
            head = ["id", "y"] if party == LAB else ["id", "x"]
            rows = [[f"{party}-{i}" if party == HOSPITALS[0] else f"shared-{i}", i % 2] for i in range(20)]
            with open(other, "w", newline="") as fh:
                csv.writer(fh).writerows([head, *rows])
            cl.start(
                party,
                "--data",
                _data_flag(party, tables[party]["path"]),
                "--data",
                _data_flag(party, other, "d"),
                "--data",  # the health example's table, as its party would load it
                f"{DATASET}=table:{health[party]},id={ID_COLUMN}" + (f",label={LABEL_COLUMN}" if party == LAB else ""),
                "--allow-outputs",
            )
        yield cl
        assert all(w.alive() for w in cl.workers.values()), "a worker died during the tests"


def _connect(cluster) -> dict[str, splitnn.RemoteWorker]:
    return {n: splitnn.connect(cluster.workers[n].url, token=cluster.token, name=n, timeout=60) for n in PARTIES}


@pytest.fixture()
def remote(cluster):
    workers = _connect(cluster)
    yield workers
    for w in workers.values():
        w.close()


def _in_process(tables) -> dict[str, VirtualWorker]:
    """The same parties in process, each loading its table as the worker's --data does."""
    workers = {}
    for party in PARTIES:
        table = load_table(tables[party]["path"], id_column="id", label_column="y" if party == LAB else None)
        workers[party] = VirtualWorker(party)
        workers[party].add_dataset("p", **table.parts())
    return workers


class _Spy:
    """Every command the researcher sends and every reply it receives, as bytes (the client's two modules build
    commands and parse replies with these names)."""

    def __init__(self, monkeypatch) -> None:
        self.sent: list[bytes] = []
        self.received: list[bytes] = []
        real_command, real_reply = command_stream.Command, command_stream.Reply

        def command(**kw):
            msg = real_command(**kw)
            self.sent.append(msg.SerializeToString())
            return msg

        def from_string(raw):
            self.received.append(bytes(raw))
            return real_reply.FromString(raw)

        for module in (command_stream, client_remote):
            monkeypatch.setattr(module, "Command", command)
            monkeypatch.setattr(module, "Reply", types.SimpleNamespace(FromString=from_string))

    def leaked(self, ids) -> list[str]:
        blob = b"".join(self.sent + self.received)
        return [s for s in ids if s.encode() in blob]


def _hospital_rows(worker, dataset: str, size: int) -> torch.Tensor:
    """The features of ``dataset``'s rows at a hospital, in its order (an identity segment's outputs: the
    worker runs with --allow-outputs)."""
    worker.add_segment("identity", nn.Identity(), None, replace=True)
    out = worker.fetch(worker.forward("identity", BatchRef(dataset, torch.arange(size)), train=False))
    worker.remove_segment("identity")
    return out


def _lab_labels(lab, hospital, dataset: str, size: int) -> list[float]:
    """The labels of ``dataset``'s rows at the lab, in its order: the l1 loss of a zero output, row by row."""
    zero = nn.Linear(2, 1)
    nn.init.zeros_(zero.weight), nn.init.zeros_(zero.bias)
    hospital.add_segment("zero", zero, None, replace=True)
    labels = []
    for i in range(size):
        row = BatchRef(dataset, torch.tensor([i]))
        labels.append(lab.loss(hospital.forward("zero", row, train=False), row, "l1", train=False).loss)
    hospital.remove_segment("zero")
    return labels


def _number(sid: str) -> int:
    return int(sid.split("-")[1])


def test_psi_over_workers_leaves_the_rows_of_the_in_process_run_and_moves_no_id_through_the_researcher(
    remote, tables, monkeypatch
):
    local = _in_process(tables)
    twin = intersect("p", [local[h] for h in HOSPITALS], local[LAB], split={"train": 0.75, "test": 0.25}, seed=3)
    spy = _Spy(monkeypatch)
    before = {n: w.stats()["counters"] for n, w in remote.items()}
    result = intersect("p", [remote[h] for h in HOSPITALS], remote[LAB], split={"train": 0.75, "test": 0.25}, seed=3)
    after = {n: w.stats()["counters"] for n, w in remote.items()}
    monkeypatch.undo()
    ledger = remote[LAB].ledger
    links = ledger.links()  # (before the checks below add their own records)

    common = sorted(set.intersection(*(set(tables[p]["ids"]) for p in PARTIES)))
    assert result == twin and result.size == len(common) > 50
    # the in-process parties hold the patients in ascending id order, each row's values naming its patient
    assert local[LAB].dataset("p").ids == common
    # the networked parties hold the very same rows: features at the hospitals ...
    for h, col in zip(HOSPITALS, (0, 1)):
        for name, size in (("p", result.size), *result.parts.items()):
            rows = _hospital_rows(remote[h], name, size)
            assert torch.equal(rows, local[h].dataset(name).features), (h, name)
        table = load_table(tables[h]["path"], id_column="id")  # undo this party's standardisation
        raw = _hospital_rows(remote[h], "p", result.size)[:, 0].double() * table.std[0] + table.mean[0]
        assert raw.round().tolist() == [10 * _number(s) + col for s in common]
    # ... and labels at the lab (its label y is the patient's number)
    for name, size in (("p", result.size), ("p:test", result.parts["p:test"])):
        expected = local[LAB].dataset(name).labels.tolist()
        assert _lab_labels(remote[LAB], remote[HOSPITALS[0]], name, size) == expected
    assert expected == [float(_number(s)) for s in local[LAB].dataset("p:test").ids]

    # the PSI messages: the same bytes on the same links as in process, nothing to or from the researcher
    assert links == local[LAB].ledger.links() and {l.kind for l in links} == {"psi"}
    assert {(l.src, l.dst) for l in links} == {(h, LAB) for h in HOSPITALS} | {(LAB, h) for h in HOSPITALS}
    assert all(w.ledger is ledger for w in remote.values())
    # the servers' wire counters: only control messages between the researcher and any party; psi frames
    # between the lab and each hospital (the ledger's bytes plus frame headers); the hospitals never talk
    for n in PARTIES:
        delta = _counter_delta(before[n], after[n])
        assert {k for (p, _, k) in delta if p == RESEARCHER} == {"control"}, (n, delta)
        talked = {p for (p, _, _) in delta} - {RESEARCHER}
        assert talked == (set(HOSPITALS) if n == LAB else {LAB}), (n, talked)
        for peer in talked:
            got = delta.get((peer, "recv", "psi"), 0)
            nbytes = sum(l.nbytes for l in links if (l.src, l.dst) == (peer, n))
            assert nbytes < got <= nbytes + 2 * FRAME_OVERHEAD, (n, peer, got, nbytes)
    # every byte the researcher sent or received during the intersection: not one id in it
    every_id = {s for p in PARTIES for s in tables[p]["ids"]}
    assert spy.sent and spy.received and not spy.leaked(every_id)


def _counter_delta(before: list[dict], after: list[dict]) -> dict[tuple[str, str, str], int]:
    """What a server's wire counters grew by: {(peer, direction, kind): bytes}, zeros left out."""
    old = {(r["peer"], r["direction"], r["kind"]): r["nbytes"] for r in before}
    delta = {(r["peer"], r["direction"], r["kind"]): r["nbytes"] for r in after}
    return {k: b - old.get(k, 0) for k, b in delta.items() if b != old.get(k, 0)}


def test_the_aligned_rows_are_this_sessions_own_and_the_party_table_stays_as_loaded(remote, cluster, tables):
    result = intersect("p", [remote[h] for h in HOSPITALS], remote[LAB])
    assert remote[LAB].dataset_stats("p").size == result.size < len(tables[LAB]["ids"])
    other = _connect(cluster)  # another researcher's session at the same parties
    try:
        assert {n: w.dataset_stats("p").size for n, w in other.items()} == {p: len(tables[p]["ids"]) for p in PARTIES}
        assert intersect("p", [other[h] for h in HOSPITALS], other[LAB]) == result  # from every row again
    finally:
        for w in other.values():
            w.close()


def test_disjoint_ids_give_the_in_process_error_and_change_nothing(remote):
    with pytest.raises(ConfigurationError, match="no common samples") as networked:
        intersect("d", [remote[h] for h in HOSPITALS], remote[LAB])
    sizes = {n: w.dataset_stats("d").size for n, w in remote.items()}
    assert sizes == dict.fromkeys(PARTIES, 20)  # every party keeps its rows
    # the same words as in process (parties holding the same ids)
    twins = {n: VirtualWorker(n) for n in PARTIES}
    for n, w in twins.items():
        ids = [f"{n}-{i}" if n == HOSPITALS[0] else f"shared-{i}" for i in range(20)]
        w.add_dataset("d", features=torch.zeros(20, 1), ids=ids)
    with pytest.raises(ConfigurationError, match="no common samples") as in_process:
        intersect("d", [twins[h] for h in HOSPITALS], twins[LAB])
    assert str(networked.value) == str(in_process.value)
    # nothing is left half-done: the hospitals and the lab intersect afresh
    assert intersect("d", [remote[HOSPITALS[1]]], remote[LAB]).size == 20


def test_ids_placed_by_the_researcher_take_no_part_and_a_party_without_ids_is_refused(remote, monkeypatch):
    a, b, lab = (remote[p] for p in PARTIES)
    spy = _Spy(monkeypatch)
    for w in (a, lab):
        w.add_dataset("q", features=torch.arange(6.0).view(6, 1), ids=[f"s{i}" for i in range(6)])
    assert spy.leaked(["s1", "s5", "s9"]) == ["s1", "s5"]  # the spy sees ids that do travel (placed by us)
    monkeypatch.undo()
    # a PSI runs only over what the parties' operators loaded (--data): the lab, the first to compute, refuses
    refused = r"'lab' refuses private set intersection over dataset 'q' \(policy rule psi_operator_data\)"
    with pytest.raises(PolicyError, match=refused):
        intersect("q", [a], lab)
    assert {w.dataset_stats("q").size for w in (a, lab)} == {6}  # nothing changed
    b.add_dataset("q", features=torch.zeros(6, 1))  # no ids: refused first, naming the fix
    b.psi_request("s", "q")
    with pytest.raises(WorkerError, match="holds no sample ids for dataset 'q'"):
        b.psi_size("q")
    b.psi_cancel("q")
    with pytest.raises(ConfigurationError, match=r"appear more than once \(e\.g\. \['s1'\]\)"):
        a.add_dataset("r", features=torch.zeros(3, 1), ids=["s1", "s1", "s2"])
    with pytest.raises(ConfigurationError, match="2 ids for 3 rows"):
        a.add_dataset("r", features=torch.zeros(3, 1), ids=["s1", "s2"])


def test_psi_messages_are_for_the_other_party_only(remote):
    """The researcher cannot fetch a PSI message, nor run one through a segment to fetch the output; a party that
    is not a peer of the session cannot pull one, and a peer pulling it as anything but ``psi`` gets nothing."""
    a, lab = remote[HOSPITALS[0]], remote[LAB]
    request = lab.psi_request("s1", "p")
    with pytest.raises(PolicyError, match="refuses to hand out psi"):
        lab.fetch(request)
    a.connect_peers(remote)  # a knows where lab is; lab's session names no peer
    a.add_segment("identity", nn.Identity(), None)
    with pytest.raises(WorkerError, match="hands a session's tensors only to the peers of its model"):
        a.fetch(a.forward("identity", lab.psi_request("s2", "p"), train=False))
    lab.connect_peers(remote)
    with pytest.raises(WorkerError, match="is not a activation"):
        a.fetch(a.forward("identity", lab.psi_request("s3", "p"), train=False))  # pulled as an activation
    # nor can the party that holds it run it through a segment of its own, to fetch the output
    lab.add_segment("identity", nn.Identity(), None)
    with pytest.raises(WorkerError, match="is not a activation"):
        lab.fetch(lab.forward("identity", lab.psi_request("s4", "p"), train=False))
    lab.psi_cancel("p")


@pytest.mark.slow
def test_the_health_example_over_workers_equals_the_in_process_run(remote):
    """PSI over the network, then the vertical model: torch.equal weights, the same losses, metrics and ledger."""
    networked = run_vertical_health(HEALTH, workers=remote, central=False)
    local = run_vertical_health(HEALTH, central=False)
    assert networked.psi == local.psi and networked.psi.size > 380
    assert networked.history.losses() == local.history.losses()
    assert networked.test == local.test and networked.test["auc"] > 0.95
    assert networked.ledger.links() == local.ledger.links()
    for h in HOSPITALS:
        assert networked.ledger.total(src=h, dst=LAB, kind="psi") > 0
        assert networked.ledger.total(src=h, dst=LAB, kind="activation") > 0
    assert networked.ledger.total(src=RESEARCHER) == networked.ledger.total(dst=RESEARCHER) == 0
    assert_same_weights(networked.model.collect(), local.model.collect())


@pytest.mark.slow
def test_the_cli_trains_the_health_example_on_worker_processes(cluster, capsys):
    urls = ",".join(cluster.workers[p].url for p in (LAB, *HOSPITALS))  # any order: the parties say who they are
    argv = ["train", "--dataset", "breast-cancer", "--topology", "vertical", "--workers", urls]
    argv += ["--token-file", str(cluster.token_file), "--seed", str(HEALTH.seed), "--epochs", "2", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    local = run_vertical_health(HealthConfig(seed=HEALTH.seed, epochs=2), central=False)
    assert f"private set intersection: {local.psi.size} common patients" in out
    assert f"{local.test['auc']:.4f}" in out and "central (joined table)" not in out
    for link in local.ledger.links():  # the ledger table: the in-process run's bytes on every link
        assert re.search(rf"{link.src}\s+{link.dst}\s+{link.kind}\s+{link.count}\s+{link.nbytes}\b", out), link
