"""Three `splitnn worker` processes + this researcher train the tutorial network bit-identically
to the in-process run, with the same ledger, and the researcher moves no activation/gradient bytes --
both with shipped epochs (the default of fit) and with one pipelined command per operation."""

from __future__ import annotations

import copy

import pytest
import torch

import splitnn
from splitnn.accounting import RESEARCHER
from splitnn.data import load_dataset
from splitnn.errors import ConfigurationError, PolicyError, WorkerError
from splitnn.models import small_cnn, tutorial_mlp
from splitnn.training import epoch_batches
from tests.helpers import assert_same_weights, toy_dataset
from tests.transport.cluster import Cluster

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

NAMES = ("alice", "bob", "claire")
N = 320  # MNIST test samples used


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, shared_data):
    mnist = shared_data / "mnist"
    with Cluster(tmp_path_factory.mktemp("cluster")) as cl:
        cl.start("alice", "--data", f"mnist:test={mnist},parts=features,limit={N}")
        cl.start("bob")
        cl.start("claire", "--data", f"mnist:test={mnist},parts=labels,limit={N}", "--allow-outputs")
        yield cl
        assert all(w.alive() for w in cl.workers.values()), "a worker died during the tests"


def _in_process(segments, data, **fit_kwargs):
    model = splitnn.SplitNN(segments, [splitnn.VirtualWorker(n) for n in NAMES], optimizer="sgd:lr=0.03")
    history = model.fit(data, progress=False, **fit_kwargs)
    return model, history


@pytest.mark.parametrize("ship", [True, False], ids=["shipped-epochs", "per-op"])
def test_tutorial_network_matches_in_process_run_bit_for_bit(remote, cluster, shared_data, ship):
    torch.manual_seed(0)
    segments = tutorial_mlp()
    initial = copy.deepcopy(segments)
    model = splitnn.SplitNN(segments, remote, optimizer="sgd:lr=0.03", ship_epochs=ship)
    counters_before = [w.stats()["counters"] for w in remote]
    history = model.fit("mnist:test", epochs=2, batch_size=64, seed=5, progress=False)  # data held by the workers
    trained = model.collect()

    data = load_dataset("mnist", "test", data_dir=shared_data / "mnist", download=False, limit=N)
    twin, twin_history = _in_process(initial, data, epochs=2, batch_size=64, seed=5)
    assert_same_weights(trained, twin.collect())
    assert history.losses() == twin_history.losses()
    # per-epoch bytes are exact: the last batch's gradients are counted in their own epoch
    assert [e.bytes_sent for e in history.epochs] == [e.bytes_sent for e in twin_history.epochs]

    # the researcher's ledger holds exactly the in-process records
    assert model.ledger.links() == twin.ledger.links()
    for kind in ("activation", "gradient", "features", "labels"):
        assert model.ledger.total(src=RESEARCHER, kind=kind) == 0
        assert model.ledger.total(dst=RESEARCHER, kind=kind) == 0
    assert model.ledger.total(src="alice", dst="bob", kind="activation") == 2 * N * 128 * 4

    # ... and so do the servers' own wire counters (this test's share of them): nothing but control
    # and weights between the researcher and any worker
    for w, before in zip(remote, counters_before):
        rows = _counter_delta(before, w.stats()["counters"])
        from_researcher = {k for (p, d, k), b in rows.items() if p == RESEARCHER and d == "recv" and b}
        assert from_researcher <= {"control", "weights"}, (w.name, from_researcher)
        to_researcher = {k for (p, d, k), b in rows.items() if p == RESEARCHER and d == "sent" and b}
        assert to_researcher <= {"control", "weights"}, (w.name, to_researcher)
    bob_rows = _counter_delta(counters_before[1], remote[1].stats()["counters"])
    got = sum(b for (p, d, k), b in bob_rows.items() if p == "alice" and d == "recv" and k == "activation")
    assert 2 * N * 128 * 4 <= got <= 2 * N * 128 * 4 * 1.01  # raw bytes + small frame headers
    for w in remote:  # the researcher's own counters agree
        assert {t.kind for t in w.counters.totals() if t.direction == "sent"} <= {"control", "weights"}


def _counter_delta(before: list[dict], after: list[dict]) -> dict[tuple[str, str, str], int]:
    old = {(r["peer"], r["direction"], r["kind"]): r["nbytes"] for r in before}
    return {
        (r["peer"], r["direction"], r["kind"]): r["nbytes"] - old.get((r["peer"], r["direction"], r["kind"]), 0)
        for r in after
    }


def test_shipped_epoch_costs_the_researcher_one_message_per_worker(remote):
    """An epoch is one plan per worker out, losses and ledger records back; batches pass peer to peer."""
    torch.manual_seed(3)
    segments = tutorial_mlp()
    twin = splitnn.SplitNN(copy.deepcopy(segments), [splitnn.VirtualWorker(n) for n in NAMES])
    model = splitnn.SplitNN(segments, remote)
    data = toy_dataset(200, seed=3)
    name, n = model.prepare(data)
    twin_name, _ = twin.prepare(data)
    sent_before = [w.counters.totals() for w in remote]
    batches = list(reversed(epoch_batches(n, 48, seed=7)))  # a plan of the model's own:
    losses = []  # explicit indices travel
    model.train_epoch(name, batches, losses.append)
    expected = [twin.train_batch(twin_name, idx) for idx in batches]
    assert losses == expected  # same values, same batch order (last batch short: 200 = 4 x 48 + 8)
    for w, before in zip(remote, sent_before):
        new = {t.kind: t.messages for t in w.counters.totals() if t.direction == "sent"}
        old = {t.kind: t.messages for t in before if t.direction == "sent"}
        assert {k: new[k] - old.get(k, 0) for k in new if new[k] != old.get(k, 0)} == {"control": 1}, w.name
    assert model.ledger.links() == twin.ledger.links()  # complete when train_epoch returns
    assert_same_weights(model.collect(), twin.collect())


@pytest.mark.parametrize(
    "placement",
    [("alice", "alice", "claire"), ("alice", "bob", "alice")],
    ids=["consecutive-on-one-party", "label-holder-is-data-holder"],
)
def test_shipped_epochs_with_several_segments_per_party(cluster, placement):
    """Consecutive segments on one worker hand over locally; a party may hold both ends of the chain."""
    by_name = {
        n: splitnn.connect(cluster.workers[n].url, token=cluster.token, name=n, timeout=60) for n in set(placement)
    }
    try:
        torch.manual_seed(4)
        segments = tutorial_mlp()
        virtual = {n: splitnn.VirtualWorker(n) for n in set(placement)}
        twin = splitnn.SplitNN(copy.deepcopy(segments), [virtual[n] for n in placement])
        model = splitnn.SplitNN(segments, [by_name[n] for n in placement])
        data = toy_dataset(160, seed=5)
        history = model.fit(data, epochs=2, batch_size=32, seed=2, progress=False)
        twin_history = twin.fit(data, epochs=2, batch_size=32, seed=2, progress=False)
        assert history.losses() == twin_history.losses()
        assert_same_weights(model.collect(), twin.collect())
        assert model.ledger.links() == twin.ledger.links()
    finally:
        for w in by_name.values():
            w.close()


def test_evaluate_matches_and_outputs_follow_policy(remote, shared_data):
    torch.manual_seed(1)
    segments = tutorial_mlp()
    initial = copy.deepcopy(segments)
    model = splitnn.SplitNN(segments, remote, optimizer="sgd:lr=0.03")
    model.fit("mnist:test", epochs=1, batch_size=64, progress=False)
    result = model.evaluate("mnist:test", batch_size=100)
    data = load_dataset("mnist", "test", data_dir=shared_data / "mnist", download=False, limit=N)
    twin, _ = _in_process(initial, data, epochs=1, batch_size=64)
    expected = twin.evaluate(data, batch_size=100)
    assert (result.accuracy, result.loss) == (expected.accuracy, expected.loss)
    # claire runs with --allow-outputs: predict works and matches; alice never releases raw features
    x = data.features[:8]
    assert torch.equal(model.predict(x), twin.predict(x))
    with pytest.raises(PolicyError):
        remote[0].fetch(remote[0].put(x, src=RESEARCHER, kind="features"))


def test_cnn_with_data_sent_by_the_researcher_matches(remote):
    torch.manual_seed(2)
    segments = small_cnn()
    initial = copy.deepcopy(segments)
    data = toy_dataset(96, seed=4)
    model = splitnn.SplitNN(segments, remote, optimizer="sgd:lr=0.05,momentum=0.9")
    model.fit(data, epochs=1, batch_size=32, seed=1, progress=False)
    twin = splitnn.SplitNN(initial, [splitnn.VirtualWorker(n) for n in NAMES], optimizer="sgd:lr=0.05,momentum=0.9")
    twin.fit(data, epochs=1, batch_size=32, seed=1, progress=False)
    assert_same_weights(model.collect(), twin.collect())


def test_callable_optimizer_is_refused_for_remote_workers(remote):
    with pytest.raises(ConfigurationError, match="optimizer factory"):
        splitnn.SplitNN(tutorial_mlp(), remote, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


def test_connect_errors_name_the_address_and_the_worker(cluster):
    with pytest.raises(WorkerError, match="127.0.0.1:9"):
        splitnn.connect("grpc://127.0.0.1:9", token=cluster.token, timeout=2)
    with pytest.raises(ConfigurationError, match="'bob'"):
        splitnn.connect(cluster.workers["bob"].url, token=cluster.token, name="mallory", timeout=10)
    with pytest.raises(ConfigurationError, match="grpc://HOST:PORT"):
        splitnn.connect("http://x", token=cluster.token)
