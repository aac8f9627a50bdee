"""The configurations of issue 3 on `splitnn worker` processes: each ends torch.equal to the same model on
in-process VirtualWorkers (the oracle), with the same ledger, and the bytes take the links the configuration
promises -- measured by the ledger and by the servers' own wire counters.

Parties: worker processes alice1, alice2 (data holders / clients) and bob (label holder, merger, store); alice3
(a third data holder for SplitFed with K = 3, or its third-party aggregator).
"""

from __future__ import annotations

import copy
import json
import threading
import time

import pytest
import torch
from torch import nn

import splitnn
from splitnn.accounting import RESEARCHER
from splitnn.data import column_partition
from splitnn.models import tutorial_mlp
from splitnn.privacy import CutNoise
from splitnn.training import epoch_batches
from splitnn.training.baselines import FedAvg, LargeBatchSGD
from splitnn.training.topologies import MultiHolderSplitNN, SplitFedSplitNN, UShapedSplitNN, VerticalSplitNN
from splitnn.training.topologies.presets import vertical_mlp
from splitnn.workers import BatchRef
from tests.helpers import assert_same_weights, toy_dataset
from tests.transport.cluster import Cluster

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

NAMES = ("alice1", "alice2", "bob")
EXTRA = ("alice3",)  # started too, but only the SplitFed tests connect to it
W = splitnn.VirtualWorker
N = 256  # training samples
BOTTOM_STATE_BYTES = (784 * 128 + 128) * 4  # the tutorial MLP's first segment, Linear(784, 128), float32
FRAME_OVERHEAD = 64  # bound on a peer frame's bytes beyond its tensor's (24-byte frame + tensor header)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("topologies")) as cl:
        for name in (*NAMES, *EXTRA):
            cl.start(name)
        yield cl
        assert all(w.alive() for w in cl.workers.values()), "a worker died during the tests"


@pytest.fixture()
def alice3(cluster):
    (worker,) = cluster.connect("alice3")
    yield worker
    worker.close()


def _virtual() -> list[splitnn.VirtualWorker]:
    return [W(n) for n in NAMES]


def _counters(workers) -> dict[str, dict[tuple[str, str, str], int]]:
    """Each server's own wire counters: {worker: {(peer, direction, kind): bytes}}."""
    return {
        w.name: {(r["peer"], r["direction"], r["kind"]): r["nbytes"] for r in w.stats()["counters"]} for w in workers
    }


def _delta(before: dict, after: dict) -> dict[str, dict[tuple[str, str, str], int]]:
    return {
        w: {k: b - before[w].get(k, 0) for k, b in rows.items() if b != before[w].get(k, 0)}
        for w, rows in after.items()
    }


def _kinds(rows: dict, peer: str, direction: str) -> set[str]:
    return {k for (p, d, k), b in rows.items() if p == peer and d == direction and b}


def _weights_links(ledger) -> dict[tuple[str, str], tuple[int, int]]:
    return {
        (l.src, l.dst): (l.count, l.nbytes)
        for l in ledger.links()
        if l.kind == "weights" and RESEARCHER not in (l.src, l.dst)
    }


def _researcher_moved_no_tensors(workers) -> None:
    """The researcher's own counters: nothing but control messages during training (data was placed before)."""
    for w in workers:
        assert {t.kind for t in w.counters.totals()} <= {"control", "data", "weights"}, w.name


# -- (a) many data holders ---------------------------------------------------------------------------------
@pytest.mark.parametrize("handoff", ["peer", "central"])
def test_multi_holder_k2_over_grpc_equals_in_process(remote, handoff):
    """K=2 holders take 2-batch turns; the bottom's weights go holder -> holder (peer) or via bob (central)."""
    alice1, alice2, bob = remote
    torch.manual_seed(11)
    segments = tutorial_mlp()
    initial = copy.deepcopy(segments)
    data, test = toy_dataset(N, seed=1), toy_dataset(64, seed=2)
    model = MultiHolderSplitNN(segments[0], segments[1:], [alice1, alice2], bob, handoff=handoff, turn_batches=2)
    v1, v2, vb = _virtual()
    twin = MultiHolderSplitNN(initial[0], initial[1:], [v1, v2], vb, handoff=handoff, turn_batches=2)
    model.prepare(data)
    before = _counters(remote)
    history = model.fit(data, epochs=2, batch_size=32, seed=3, progress=False)
    counters = _delta(before, _counters(remote))
    twin_history = twin.fit(data, epochs=2, batch_size=32, seed=3, progress=False)

    assert history.losses() == twin_history.losses()
    assert [e.bytes_sent for e in history.epochs] == [e.bytes_sent for e in twin_history.epochs]
    assert model.handoffs == twin.handoffs and len(model.handoffs) >= 6
    result, twin_result = model.evaluate(test), twin.evaluate(test)
    assert (result.accuracy, result.loss) == (twin_result.accuracy, twin_result.loss)
    assert_same_weights(model.collect(), twin.collect())
    assert model.ledger.links() == twin.ledger.links()

    links = _weights_links(model.ledger)
    if handoff == "peer":
        assert set(links) == {("alice1", "alice2"), ("alice2", "alice1")}
    else:
        assert set(links) == {("alice1", "bob"), ("alice2", "bob"), ("bob", "alice1"), ("bob", "alice2")}
    for count, nbytes in links.values():
        assert nbytes == count * BOTTOM_STATE_BYTES  # each hand-off is exactly the bottom segment's state

    # the servers' wire counters (fit only, so turn hand-offs): weights only on the links the ledger names,
    # each within 1% of the state bytes (safetensors and frame headers), nothing through the researcher
    turn_links: dict[tuple[str, str], int] = {}
    for h in model.handoffs:
        if h.reason == "turn":  # (the evaluation's hand-offs came after the counters were read)
            turn_links[(h.src, h.dst)] = turn_links.get((h.src, h.dst), 0) + 1
    for (src, dst), turns in turn_links.items():
        got = counters[dst].get((src, "recv", "weights"), 0)
        assert got == counters[src].get((dst, "sent", "weights"), 0)
        assert turns * BOTTOM_STATE_BYTES <= got <= turns * BOTTOM_STATE_BYTES * 1.01, (src, dst, got)
    for w, rows in counters.items():
        assert _kinds(rows, RESEARCHER, "recv") <= {"control"}, (w, rows)
        assert _kinds(rows, RESEARCHER, "sent") <= {"control"}, (w, rows)
        weight_peers = {p for (p, d, k), b in rows.items() if k == "weights" and b}
        assert weight_peers <= {s for s, d in links if d == w} | {d for s, d in links if s == w}, (w, rows)
    _researcher_moved_no_tensors(remote)


# -- SplitFed -------------------------------------------------------------------------------------------------
def test_splitfed_one_remote_holder_equals_in_process(remote):
    """SplitFed's step (bottom forward, bob's turn, bottom backward) over the wire, with v2's one top: one
    holder averages nothing and runs on one thread."""
    alice1, alice2, bob = remote
    torch.manual_seed(12)
    segments = tutorial_mlp()
    initial = copy.deepcopy(segments)
    data = toy_dataset(N, seed=4)
    model = SplitFedSplitNN(segments[0], segments[1:], [alice1], bob, variant="v2", round_batches=3)
    v1, _, vb = _virtual()
    twin = SplitFedSplitNN(initial[0], initial[1:], [v1], vb, variant="v2", round_batches=3)
    history = model.fit(data, epochs=2, batch_size=32, seed=3, progress=False)
    twin_history = twin.fit(data, epochs=2, batch_size=32, seed=3, progress=False)
    assert history.losses() == twin_history.losses()
    assert_same_weights(model.collect(), twin.collect())
    assert model.ledger.links() == twin.ledger.links()
    assert model.parallel is False


@pytest.mark.slow
@pytest.mark.parametrize(
    ("variant", "k", "round_batches", "third_party"),
    [("v1", 2, None, False), ("v2", 2, 2, False), ("v1", 3, 2, False), ("v2", 3, None, False), ("v2", 2, 3, True)],
    ids=["v1-K2-epoch", "v2-K2-rounds2", "v1-K3-rounds2", "v2-K3-epoch", "v2-K2-rounds3-aggregator"],
)
def test_splitfed_networked_holders_on_threads_equal_in_process(remote, alice3, variant, k, round_batches, third_party):
    """K `splitnn worker` holders, each driven from a thread of its own, bob serving them (v2 in its seeded order):
    the same losses, weights (every holder's bottom and the top) and ledger as in-process; activations and
    gradients on the holder <-> bob links only; averaging moves weights holder <-> aggregator only."""
    alice1, alice2, bob = remote
    holders = [alice1, alice2, alice3][:k]
    aggregator = alice3 if third_party else None
    torch.manual_seed(20 + k)
    segments = tutorial_mlp()
    initial = copy.deepcopy(segments)
    data, test = toy_dataset(N, seed=5), toy_dataset(64, seed=6)
    opts = {"variant": variant, "round_batches": round_batches}
    model = SplitFedSplitNN(segments[0], segments[1:], holders, bob, aggregator=aggregator, **opts)
    virtual = {n: W(n) for n in ("alice1", "alice2", "alice3", "bob")}
    twin = SplitFedSplitNN(
        initial[0],
        initial[1:],
        [virtual[h.name] for h in holders],
        virtual["bob"],
        aggregator=virtual["alice3"] if third_party else None,
        **opts,
    )
    assert model.parallel is True and twin.parallel is True
    model.prepare(data)
    history = model.fit(data, epochs=2, batch_size=32, seed=3, progress=False)
    twin_history = twin.fit(data, epochs=2, batch_size=32, seed=3, progress=False)

    assert history.losses() == twin_history.losses()
    assert [e.bytes_sent for e in history.epochs] == [e.bytes_sent for e in twin_history.epochs]
    assert model.rounds == twin.rounds >= 2
    assert model.ledger.links() == twin.ledger.links()
    result, twin_result = model.evaluate(test), twin.evaluate(test)
    assert (result.accuracy, result.loss) == (twin_result.accuracy, twin_result.loss)

    names = [h.name for h in holders]
    agg = "alice3" if third_party else "bob"
    ledger = model.ledger
    for name in names:  # the cut's tensors go holder <-> label holder over their peer link
        assert ledger.total(src=name, dst="bob", kind="activation") > 0
        assert ledger.total(src="bob", dst=name, kind="gradient") > 0
        weights = ledger.total(src=name, dst=agg, kind="weights")
        assert weights > 0 and weights % BOTTOM_STATE_BYTES == 0
        assert ledger.total(src=agg, dst=name, kind="weights") == model.rounds * BOTTOM_STATE_BYTES
    for link in ledger.links():
        assert link.kind not in ("activation", "gradient") or {link.src, link.dst} <= {*names, "bob"}, link
        assert link.kind != "weights" or RESEARCHER in (link.src, link.dst) or agg in (link.src, link.dst), link
    _researcher_moved_no_tensors([*holders, bob])

    assert_same_weights(model.collect(), twin.collect())
    for h in range(k):  # after the last round every holder holds the same averaged bottom
        got = model.stages_of(h)[0]
        want = twin.stages_of(h)[0]
        state, twin_state = got.worker.get_state(got.key), want.worker.get_state(want.key)
        assert list(state) == list(twin_state) and all(torch.equal(state[n], twin_state[n]) for n in state)


def _tiny_segments() -> tuple[nn.Module, list[nn.Module]]:
    torch.manual_seed(0)
    return nn.Linear(4, 3), [nn.Sequential(nn.ReLU(), nn.Linear(3, 2), nn.LogSoftmax(dim=1))]


SIZES = (5, 3, 8)  # uneven shards of 16 samples: rows 0-4, 5-7, 8-15


def _uneven(labels, k, seed):
    bounds = [0, 5, 8, 16]
    return [torch.arange(bounds[i], bounds[i + 1]) for i in range(k)]


@pytest.mark.slow
def test_networked_v1_round_averages_equal_a_hand_computation(remote, alice3):
    """Three networked holders with uneven shards (5, 3, 8 samples) train one local epoch on threads; every
    holder's bottom and bob's every top copy then equal (5 a + 3 b + 8 c) / 16 of three chains trained alone with
    plain PyTorch, as SplitFed v1 prescribes."""
    alice1, alice2, bob = remote
    bottom, top = _tiny_segments()
    initial = [copy.deepcopy(bottom), *copy.deepcopy(top)]
    g = torch.Generator().manual_seed(1)
    data = splitnn.Dataset(torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g), "tiny", 2)
    model = SplitFedSplitNN(bottom, top, [alice1, alice2, alice3], bob, variant="v1", partition=_uneven)
    name, n = model.prepare(data)
    model.train_epoch(name, model.epoch_plan(name, n, 2, seed=0, epoch=0), lambda stats: None)
    assert model.rounds == 1

    twins = []  # holder h's bottom and top trained alone on its shard: plain SGD, lr 0.03, its documented order
    start = 0
    for h, size in enumerate(SIZES):
        parts = copy.deepcopy(initial)
        opt = torch.optim.SGD([p for part in parts for p in part.parameters()], lr=0.03)
        x, y = data.features[start : start + size], data.labels[start : start + size]
        for idx in epoch_batches(size, 2, seed=0 + 7919 * h, epoch=0):
            opt.zero_grad()
            nn.NLLLoss()(nn.Sequential(*parts)(x[idx]), y[idx]).backward()
            opt.step()
        twins.append([part.state_dict() for part in parts])
        start += size

    for part in range(2):  # the bottom, then the top copy
        a, b, c = (twins[h][part] for h in range(3))
        expected = {key: (5 * a[key] + 3 * b[key] + 8 * c[key]) / 16 for key in a}  # weighted by 5, 3, 8 samples
        for h in range(3):
            stage = model.stages_of(h)[part]
            got = stage.worker.get_state(stage.key)
            assert list(got) == list(expected)
            for key in expected:
                torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)


def test_average_states_at_a_worker_process_equals_the_arithmetic_and_refuses_mistakes(remote):
    """The `average_states` command: the weighted average of segments bob hosts, loaded into others, written out
    by hand; mistakes refused with the words of the in-process worker, and a failed average writes nothing."""
    _, _, bob = remote

    def layer(weight, bias):
        m = nn.Linear(2, 2)
        with torch.no_grad():
            m.weight.copy_(torch.tensor(weight))
            m.bias.copy_(torch.tensor(bias))
        return m

    for worker in (bob, W("bob")):
        worker.add_segment("avg.a", layer([[1.0, 2.0], [3.0, 4.0]], [8.0, -4.0]), None)
        worker.add_segment("avg.b", layer([[5.0, 6.0], [7.0, 8.0]], [0.0, 4.0]), None)
        worker.add_segment("avg.c", nn.Linear(2, 2), None)
        worker.add_segment("avg.wide", nn.Linear(3, 2), None)
        before = worker.ledger.total()
        worker.average_states(["avg.a", "avg.b"], [1, 3], into=["avg.c", "avg.b"])
        assert worker.ledger.total() == before  # local: nothing travelled
        # (1 * a + 3 * b) / 4, element by element
        for key in ("avg.c", "avg.b"):
            state = worker.get_state(key)
            assert torch.equal(state["weight"], torch.tensor([[4.0, 5.0], [6.0, 7.0]])), worker
            assert torch.equal(state["bias"], torch.tensor([2.0, 2.0])), worker
        assert torch.equal(worker.get_state("avg.a")["weight"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))

        with pytest.raises(splitnn.WorkerError, match="hosts no segment 'avg.nope'"):
            worker.average_states(["avg.a", "avg.nope"], [1, 1], into=["avg.c"])
        with pytest.raises(splitnn.WorkerError, match="hosts no segment 'avg.nope'"):
            worker.average_states(["avg.a"], [1], into=["avg.c", "avg.nope"])
        for weights in ([1, 0], [1, -1], [1, float("nan")], [1, float("inf")], [1]):
            with pytest.raises(splitnn.ConfigurationError, match="weight"):
                worker.average_states(["avg.a", "avg.b"], weights, into=["avg.c"])
        with pytest.raises(splitnn.ConfigurationError, match="'weight' of state 1"):
            worker.average_states(["avg.a", "avg.wide"], [1, 1], into=["avg.c"])
        with pytest.raises(splitnn.ConfigurationError, match="segment 'avg.wide' does not have"):
            worker.average_states(["avg.a", "avg.b"], [1, 1], into=["avg.c", "avg.wide"])
        # checked before anything was loaded: avg.c still holds the first average
        assert torch.equal(worker.get_state("avg.c")["weight"], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))


def test_loss_deferred_is_the_loss_sent_without_waiting(remote):
    """`loss_deferred` gives the stats `loss` gives (its twin in process), and a failure where they are asked for."""
    _, _, bob = remote
    data = toy_dataset(8, seed=9)
    twin = W("bob")
    stats = []
    for worker in (bob, twin):
        worker.add_dataset("lossdef", features=data.features, labels=data.labels)
        torch.manual_seed(3)
        worker.add_segment("lossdef.s", nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.LogSoftmax(dim=1)), None)
        batch = BatchRef("lossdef", torch.tensor([0, 3, 5]))
        out = worker.forward("lossdef.s", batch, train=True)
        stats.append(worker.loss(out, batch, "nll", train=True))
    out = bob.forward("lossdef.s", batch, train=True)  # the same weights (no step was taken): the same stats
    later = bob.loss_deferred(out, batch, "nll", train=True)
    assert later() == stats[0] == stats[1]
    out = bob.forward("lossdef.s", batch, train=False)
    later = bob.loss_deferred(out, BatchRef("lossdef", torch.tensor([0, 99])), "nll", train=False)  # sent: no error yet
    with pytest.raises(splitnn.WireError, match="out of range"):
        later()


def test_a_remote_worker_serializes_concurrent_callers(remote):
    """Several threads calling one RemoteWorker take turns (each call whole) and each gets its own answer."""
    _, _, bob = remote
    bob.add_segment("lock.s", nn.Linear(6, 3), None)
    inside, most, errors, shapes = [0], [0], [], []
    send = bob._stream.send
    guard = threading.Lock()

    def watched(*args, **kwargs):  # how many callers are in the stream's send at once
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.002)
        try:
            return send(*args, **kwargs)
        finally:
            with guard:
                inside[0] -= 1

    bob._stream.send = watched

    def caller(rows: int) -> None:
        try:
            for _ in range(10):
                bob.zero_grad("lock.s")
                shapes.append((rows, bob.probe("lock.s", (rows, 6))))
        except Exception as exc:  # handed to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(r,)) for r in range(1, 5)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        bob._stream.send = send
    assert not errors and len(shapes) == 40
    assert all(shape == (rows, 3) for rows, shape in shapes)
    assert most[0] == 1


def _split(segments):
    return segments[0], segments[1:]


# -- (b) vertically partitioned data -----------------------------------------------------------------------
def test_vertical_two_halves_over_grpc_equals_in_process(remote):
    """Left/right image halves at alice1/alice2, bob concatenates; no holder hears from the other."""
    alice1, alice2, bob = remote
    torch.manual_seed(12)
    columns = column_partition((1, 28, 28), 2)
    bottoms, top = vertical_mlp([len(c) for c in columns], (32, 64), 10, "concat")
    twin_bottoms, twin_top = copy.deepcopy(bottoms), copy.deepcopy(top)
    data, test = toy_dataset(N, seed=3), toy_dataset(64, seed=4)
    model = VerticalSplitNN(bottoms, [alice1, alice2], top, bob, merge="concat", columns=columns)
    v1, v2, vb = _virtual()
    twin = VerticalSplitNN(twin_bottoms, [v1, v2], twin_top, vb, merge="concat", columns=columns)
    model.prepare(data)
    before = _counters(remote)
    history = model.fit(data, epochs=2, batch_size=32, seed=4, progress=False)
    counters = _delta(before, _counters(remote))
    twin_history = twin.fit(data, epochs=2, batch_size=32, seed=4, progress=False)

    assert history.losses() == twin_history.losses()
    assert [e.bytes_sent for e in history.epochs] == [e.bytes_sent for e in twin_history.epochs]
    result, twin_result = model.evaluate(test), twin.evaluate(test)
    assert (result.accuracy, result.loss) == (twin_result.accuracy, twin_result.loss)
    assert_same_weights(model.collect(), twin.collect())
    assert model.ledger.links() == twin.ledger.links()

    holders = {"alice1", "alice2"}
    assert not [l for l in model.ledger.links() if l.src in holders and l.dst in holders]
    for me, other in (("alice1", "alice2"), ("alice2", "alice1")):
        assert not [k for k in counters[me] if k[0] == other], counters[me]  # never talked to each other
        assert _kinds(counters[me], "bob", "sent") <= {"activation", "control"}
        assert _kinds(counters[me], "bob", "recv") <= {"gradient", "control"}
        # two epochs and one evaluation of a 32-wide activation; the counters saw the training part
        assert model.ledger.total(src=me, dst="bob", kind="activation") == (2 * N + 64) * 32 * 4
        act, frames = 2 * N * 32 * 4, 2 * N // 32
        assert act <= counters["bob"][(me, "recv", "activation")] <= act + frames * FRAME_OVERHEAD
    _researcher_moved_no_tensors(remote)


# -- (c) U-shaped ------------------------------------------------------------------------------------------
def test_u_shape_over_grpc_equals_in_process_and_keeps_labels_home(remote):
    """alice1 holds head, tail and labels; bob the middle. Only the two cut tensors leave alice1."""
    alice1, _, bob = remote
    torch.manual_seed(13)
    head, middle, tail = tutorial_mlp()
    twin_parts = copy.deepcopy([head, middle, tail])
    data, test = toy_dataset(N, seed=5), toy_dataset(64, seed=6)
    model = UShapedSplitNN(head, [middle], tail, alice1, bob)
    v1, _, vb = _virtual()
    twin = UShapedSplitNN(twin_parts[0], [twin_parts[1]], twin_parts[2], v1, vb)
    model.prepare(data)
    before = _counters([alice1, bob])
    history = model.fit(data, epochs=2, batch_size=32, seed=5, progress=False)
    counters = _delta(before, _counters([alice1, bob]))
    twin_history = twin.fit(data, epochs=2, batch_size=32, seed=5, progress=False)

    assert history.losses() == twin_history.losses()
    assert [e.bytes_sent for e in history.epochs] == [e.bytes_sent for e in twin_history.epochs]
    result, twin_result = model.evaluate(test), twin.evaluate(test)
    assert (result.accuracy, result.loss) == (twin_result.accuracy, twin_result.loss)
    assert_same_weights(model.collect(), twin.collect())
    assert model.ledger.links() == twin.ledger.links()

    assert {l.kind for l in model.ledger.links()} <= {"activation", "gradient", "weights"}  # no labels, no output
    assert {(l.src, l.dst, l.kind) for l in model.ledger.links() if l.src == "alice1"} == {
        ("alice1", "bob", "activation"),
        ("alice1", "bob", "gradient"),
        ("alice1", RESEARCHER, "weights"),
    }
    sent = model.ledger.total(src="alice1", dst="bob")
    assert sent == 2 * N * (128 + 640) * 4 + 64 * 128 * 4  # training cut tensors + evaluation activations
    assert _kinds(counters["alice1"], "bob", "sent") <= {"activation", "gradient", "control"}
    assert _kinds(counters["alice1"], RESEARCHER, "sent") <= {"control"}
    got = counters["bob"][("alice1", "recv", "activation")] + counters["bob"][("alice1", "recv", "gradient")]
    train_sent, frames = 2 * N * (128 + 640) * 4, 2 * (2 * N // 32)
    assert train_sent <= got <= train_sent + frames * FRAME_OVERHEAD


# -- (d) the federated baselines ---------------------------------------------------------------------------
def _small_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10), nn.LogSoftmax(dim=1))


@pytest.mark.parametrize("method", ["large-batch", "fedavg"])
def test_federated_baselines_with_two_remote_clients_equal_in_process(remote, method):
    """Large-batch SGD (get_grads) and FedAvg (get/set_state) on two client processes, unequal shards."""
    alice1, alice2, _ = remote
    torch.manual_seed(14)
    model = _small_model()
    shards = [toy_dataset(96, seed=7), toy_dataset(64, seed=8)]
    v1, v2, _ = _virtual()
    if method == "large-batch":
        fed, twin = LargeBatchSGD(copy.deepcopy(model), [alice1, alice2]), LargeBatchSGD(copy.deepcopy(model), [v1, v2])
        history = fed.fit(shards, epochs=2, batch_size=32, seed=1, progress=False)
        twin_history = twin.fit(shards, epochs=2, batch_size=32, seed=1, progress=False)
    else:
        fed, twin = FedAvg(copy.deepcopy(model), [alice1, alice2]), FedAvg(copy.deepcopy(model), [v1, v2])
        history = fed.fit(shards, rounds=2, local_epochs=1, batch_size=32, seed=1, progress=False)
        twin_history = twin.fit(shards, rounds=2, local_epochs=1, batch_size=32, seed=1, progress=False)
    assert history.losses() == twin_history.losses()
    assert_same_weights(fed.model, twin.model)
    assert not any(torch.equal(a, b) for a, b in zip(fed.model.state_dict().values(), model.state_dict().values()))
    assert fed.ledger.links() == twin.ledger.links()
    if method == "large-batch":
        state_bytes = sum(p.numel() * 4 for p in model.parameters())
        steps = 2 * 3 + 2 * 2  # ceil(96/32) + ceil(64/32) per epoch
        assert fed.ledger.total(dst=RESEARCHER, kind="gradient") == steps * state_bytes


# -- defenses hosted remotely ------------------------------------------------------------------------------
def test_cut_noise_defended_model_trains_over_grpc_bit_identically(remote):
    """CutNoise (sigma 0.5, clip 5, seeded) at alice1: its layer spec reaches the worker, and its own seeded
    noise stream draws the same numbers there as in-process, so the run is bit-identical."""
    torch.manual_seed(15)
    segments = tutorial_mlp()
    segments[0] = nn.Sequential(segments[0], CutNoise(5.0, 0.5, seed=9))
    initial = copy.deepcopy(segments)
    undefended = copy.deepcopy(segments)
    undefended[0] = undefended[0][0]
    data, test = toy_dataset(N, seed=9), toy_dataset(64, seed=10)
    model = splitnn.SplitNN(segments, remote, optimizer="sgd:lr=0.03")
    twin = splitnn.SplitNN(initial, _virtual(), optimizer="sgd:lr=0.03")
    history = model.fit(data, epochs=2, batch_size=32, seed=6, progress=False)  # shipped epochs
    twin_history = twin.fit(data, epochs=2, batch_size=32, seed=6, progress=False)
    assert history.losses() == twin_history.losses()
    result, twin_result = model.evaluate(test), twin.evaluate(test)  # noise at inference too
    assert (result.accuracy, result.loss) == (twin_result.accuracy, twin_result.loss)
    trained = model.collect()
    assert_same_weights(trained, twin.collect())
    assert model.ledger.links() == twin.ledger.links()
    # the noise is real: without it the same run ends elsewhere
    plain = splitnn.SplitNN(undefended, _virtual(), optimizer="sgd:lr=0.03")
    assert plain.fit(data, epochs=2, batch_size=32, seed=6, progress=False).losses() != history.losses()


# -- the command line --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "label"),
    [
        (("multi", "--handoff", "central", "--turn-batches", "2"), "multi"),
        (("vertical",), "vertical"),
        (("splitfed", "--variant", "v2", "--round-batches", "2"), "splitfed v2"),
    ],
    ids=["multi-central", "vertical", "splitfed-v2"],
)
def test_cli_trains_topology_on_worker_processes(cluster, shared_data, tmp_path, capsys, flags, label):
    """`splitnn train --topology multi|vertical --workers grpc://...` reports what the in-process run reports."""
    from splitnn.cli.main import main

    def train(*more: str) -> list[dict]:
        out = tmp_path / f"history{len(more)}.json"
        code = main(
            [
                "train",
                "--dataset",
                "fashion-mnist",
                "--data-dir",
                str(shared_data / "fashion-mnist"),
                "--no-download",
                "--epochs",
                "1",
                "--limit",
                str(N),
                "--no-progress",
                "--json",
                str(out),
                "--clients",
                "2",
                "--topology",
                *flags,
                *more,
            ]
        )
        assert code == 0
        return [{k: v for k, v in e.items() if k != "seconds"} for e in json.loads(out.read_text())]

    urls = ",".join(cluster.workers[n].url for n in reversed(NAMES))  # any order: parties answer to their names
    remote = train("--workers", urls, "--token-file", str(cluster.token_file))
    report = capsys.readouterr().out
    assert remote == train()
    assert f"{label}: 2 data holders alice1..alice2" in report and "test acc" in report


def test_cli_refuses_workers_that_are_not_the_topologys_parties(cluster, shared_data, capsys):
    from splitnn.cli.main import main

    urls = ",".join(cluster.workers[n].url for n in ("alice1", "bob"))
    code = main(
        [
            "train",
            "--dataset",
            "fashion-mnist",
            "--data-dir",
            str(shared_data / "fashion-mnist"),
            "--no-download",
            "--epochs",
            "1",
            "--limit",
            "64",
            "--no-progress",
            "--topology",
            "multi",
            "--clients",
            "2",
            "--workers",
            urls,
            "--token-file",
            str(cluster.token_file),
        ]
    )
    assert code == 2
    assert "missing ['alice2']" in capsys.readouterr().err
