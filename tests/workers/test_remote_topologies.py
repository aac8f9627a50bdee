"""The configurations of issue 3 on `splitnn worker` processes: each ends torch.equal to the same model on
in-process VirtualWorkers (the oracle), with the same ledger, and the bytes take the links the configuration
promises -- measured by the ledger and by the servers' own wire counters.

Parties: three worker processes alice1, alice2 (data holders / clients) and bob (label holder, merger, store).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import splitnn
from splitnn.accounting import RESEARCHER
from splitnn.data import column_partition
from splitnn.models import tutorial_mlp
from splitnn.privacy import CutNoise
from splitnn.training.baselines import FedAvg, LargeBatchSGD
from splitnn.training.topologies import MultiHolderSplitNN, SplitFedSplitNN, UShapedSplitNN, VerticalSplitNN
from splitnn.training.topologies.presets import vertical_mlp
from tests.helpers import assert_same_weights, toy_dataset
from tests.transport.cluster import Cluster

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

NAMES = ("alice1", "alice2", "bob")
W = splitnn.VirtualWorker
N = 256  # training samples
BOTTOM_STATE_BYTES = (784 * 128 + 128) * 4  # the tutorial MLP's first segment, Linear(784, 128), float32
FRAME_OVERHEAD = 64  # bound on a peer frame's bytes beyond its tensor's (24-byte frame + tensor header)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("topologies")) as cl:
        for name in NAMES:
            cl.start(name)
        yield cl
        assert all(w.alive() for w in cl.workers.values()), "a worker died during the tests"


@pytest.fixture()
def remote(cluster):
    workers = cluster.connect(*NAMES)
    yield workers
    for w in workers:
        w.close()


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
def test_splitfed_one_remote_holder_equals_in_process_and_more_need_average_states(remote):
    """SplitFed's step (bottom forward, bob's turn, bottom backward) over the wire, with v2's one top; averaging
    needs average_states, which networked workers lack today: refused before any work, naming it."""
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
    with pytest.raises(splitnn.ConfigurationError, match="worker 'bob' lacks average_states"):
        SplitFedSplitNN(*_split(tutorial_mlp()), [alice1, alice2], bob, variant="v2")
    with pytest.raises(splitnn.ConfigurationError, match="only in-process workers"):
        SplitFedSplitNN(*_split(tutorial_mlp()), [alice1], bob, parallel=True)


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
    "flags",
    [("multi", "--handoff", "central", "--turn-batches", "2"), ("vertical",)],
    ids=["multi-central", "vertical"],
)
def test_cli_trains_topology_on_worker_processes(cluster, shared_data, tmp_path, capsys, flags):
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
    assert f"{flags[0]}: 2 data holders alice1..alice2" in report and "test acc" in report


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
