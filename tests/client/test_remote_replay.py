"""A transient fault costs no step and duplicates none, across real worker processes, without checkpoints.

A link emulator resets connections mid-epoch and lets new ones through: the researcher's
connection to bob (its command stream is resumed where it stood) and, separately, the peer
links into bob (a pull is asked again on a new link). The oracle is an uninterrupted in-process
run: the same weights bit for bit (Adam: a step lost or applied twice would change them), the
same per-epoch losses and the same ledger -- every transfer recorded once.
"""

from __future__ import annotations

import json
import queue

import grpc
import pytest
import torch
from torch import nn

import splitnn
from splitnn.common import serde
from splitnn.common.messages import new_session_id
from splitnn.common.operations import OPERATIONS
from splitnn.testing.linkemu import ThreadedLinkEmulator
from splitnn.wire.proto import CALL, SESSION, Command, Reply
from tests.helpers import assert_same_weights, at_batch, toy_dataset
from tests.transport.cluster import Cluster

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

NAMES = ("alice", "bob", "claire")
DATA = toy_dataset(320, shape=(1, 8, 8))
FIT = dict(epochs=2, batch_size=32, seed=3, progress=False)


def segments():
    torch.manual_seed(0)
    return [
        nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU()),
        nn.Sequential(nn.Linear(32, 16), nn.ReLU()),
        nn.Sequential(nn.Linear(16, 10), nn.LogSoftmax(dim=1)),
    ]


def build(workers, ship: bool):
    return splitnn.SplitNN(segments(), workers, optimizer="adam:lr=0.01", ship_epochs=ship)


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("replay"), lifetime=280) as cl:
        for n in NAMES:
            cl.start(n, "--peer-timeout", "30")
        yield cl


@pytest.fixture(scope="module")
def reference():
    model = build([splitnn.VirtualWorker(n) for n in NAMES], ship=False)
    history = model.fit(DATA, **FIT)
    links = model.ledger.links()  # (before collect() adds the weights' way to the researcher)
    return model.collect(), [(e.train_loss, e.bytes_sent) for e in history.epochs], links


def drop_at(model, batch: int, drop) -> list[int]:
    """Call ``drop()`` when the researcher has seen ``batch`` batches' losses; the batches seen, as a list."""

    def dropping():
        assert drop() > 0  # connections were reset (new ones get through)

    return at_batch(model, batch, dropping)


def check_same_run(model, history, seen, reference) -> None:
    weights, losses, links = reference
    assert seen[0] == 20  # every batch's loss reached the researcher once: none trained twice, none skipped
    assert [(e.train_loss, e.bytes_sent) for e in history.epochs] == losses
    assert model.ledger.links() == links  # every transfer recorded once
    assert_same_weights(model.collect(), weights)


@pytest.mark.parametrize("ship", [False, True], ids=["per-op", "shipped"])
def test_a_dropped_researcher_connection_costs_no_step(trio, reference, ship):
    cl = trio
    with ThreadedLinkEmulator() as emu:
        via = emu.add("bob", cl.workers["bob"].address)
        workers = [
            splitnn.connect(f"grpc://{via}" if n == "bob" else cl.workers[n].url, token=cl.token, name=n, timeout=60)
            for n in NAMES
        ]
        bob = workers[1]
        bob.address = cl.workers["bob"].address  # its peers reach it directly: only the researcher's link drops
        emu.set("bob", delay=0.01)  # commands in flight when the connection drops
        model = build(workers, ship)
        seen = drop_at(model, 6, lambda: emu.drop("bob"))
        history = model.fit(DATA, **FIT)  # no checkpoint_dir: the checkpoint route would raise
        assert bob.resumed >= 1  # the stream broke and was resumed
        check_same_run(model, history, seen, reference)
        for w in workers:
            w.close()


@pytest.mark.parametrize("ship", [False, True], ids=["per-op", "shipped"])
def test_a_dropped_peer_link_costs_no_step(trio, reference, ship):
    """Per-op: bob's activation and gradient are pulled, and a pull is asked again. Shipped: alice and claire push
    to bob, keep each push until bob acknowledges it, and send it again on a new link (bob uses it once)."""
    cl = trio
    with ThreadedLinkEmulator() as emu:
        via = emu.add("bob-peers", cl.workers["bob"].address)
        workers = [splitnn.connect(cl.workers[n].url, token=cl.token, name=n, timeout=60) for n in NAMES]
        workers[1].address = via  # alice and claire reach bob through the emulator; the researcher does not
        # shipped: a push into bob awaits its acknowledgement for a round trip (2 x 50 ms) and one leaves every
        # ~50 ms (alice's activation, then claire's gradient), so one is always unacknowledged when the links drop
        emu.set("bob-peers", delay=0.05 if ship else 0.01)
        model = build(workers, ship=ship)
        drops = []
        seen = drop_at(model, 6, lambda: drops.append(emu.drop("bob-peers")) or drops[-1])
        history = model.fit(DATA, **FIT)
        assert all(w.resumed == 0 for w in workers)  # the researcher's streams never broke
        check_same_run(model, history, seen, reference)
        rows = [row for w in (workers[0], workers[2]) for row in w.stats()["counters"] if row["direction"] == "sent"]
        # shipped: alice or claire pushed to bob again on a new link. Per-op: a pull in flight at the drop is asked
        # again, and either way the broken link is dialled again (a pull that comes after the drop was noticed
        # finds the link closed: no pull is repeated then)
        kinds = ("repush",) if ship else ("repull", "relink")
        repeated = {k: sum(row["messages"] for row in rows if row["kind"] == k) for k in kinds}
        assert repeated["repush" if ship else "relink"] >= 1, repeated
        if ship:  # what was pushed again is counted as re-sent, never as another activation or gradient
            assert sum(row["nbytes"] for row in rows if row["kind"] == "resent") > 0
        for w in workers:
            w.close()


@pytest.mark.parametrize("compression", [None, "topk:0.3"], ids=["plain", "topk"])
def test_a_dropped_peer_link_costs_no_step_of_a_pipelined_compressed_epoch(trio, compression):
    """K = 3 batches in flight (and topk with its error feedback at both cuts): pushes ahead of their receive,
    several unacknowledged at once, are sent again on a new link after the drop, each used once and in order,
    so the run equals the in-process pipelined run."""

    def pipelined(workers):
        return splitnn.SplitNN(segments(), workers, optimizer="adam:lr=0.01", compression=compression)

    reference = pipelined([splitnn.VirtualWorker(n) for n in NAMES])
    ref_history = reference.fit(DATA, pipeline=3, **FIT)
    ref_links = reference.ledger.links()
    cl = trio
    with ThreadedLinkEmulator() as emu:
        via = emu.add("bob-peers", cl.workers["bob"].address)
        workers = [splitnn.connect(cl.workers[n].url, token=cl.token, name=n, timeout=60) for n in NAMES]
        workers[1].address = via
        emu.set("bob-peers", delay=0.05)
        model = pipelined(workers)
        drops = []
        seen = drop_at(model, 6, lambda: drops.append(emu.drop("bob-peers")) or drops[-1])
        history = model.fit(DATA, pipeline=3, **FIT)
        assert seen[0] == 20
        assert [(e.train_loss, e.bytes_sent) for e in history.epochs] == [
            (e.train_loss, e.bytes_sent) for e in ref_history.epochs
        ]
        assert model.ledger.links() == ref_links
        assert_same_weights(model.collect(), reference.collect())
        rows = [row for w in (workers[0], workers[2]) for row in w.stats()["counters"] if row["direction"] == "sent"]
        assert sum(row["messages"] for row in rows if row["kind"] == "repush") >= 1
        for w in workers:
            w.close()


def test_a_dropped_connection_costs_a_splitfed_run_no_step(trio):
    """SplitFed v2 with alice and claire as data holders on threads of their own and bob serving them: the
    researcher's connection to bob and, later, the holders' peer links to bob drop mid-epoch (commands and
    pulls in flight from both threads); the run equals the uninterrupted in-process one (Adam: a step lost or
    applied twice would show), with every transfer recorded once."""
    from splitnn.training.topologies import SplitFedSplitNN

    def splitfed(holders, bob):
        torch.manual_seed(0)
        bottom = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
        top = [nn.Sequential(nn.Linear(32, 16), nn.ReLU()), nn.Sequential(nn.Linear(16, 10), nn.LogSoftmax(dim=1))]
        return SplitFedSplitNN(
            bottom, top, holders, [bob, bob], variant="v2", round_batches=2, optimizer="adam:lr=0.01"
        )

    virtual = {n: splitnn.VirtualWorker(n) for n in NAMES}
    reference = splitfed([virtual["alice"], virtual["claire"]], virtual["bob"])
    ref_history = reference.fit(DATA, **FIT)
    cl = trio
    with ThreadedLinkEmulator() as emu:
        researcher_via = emu.add("bob", cl.workers["bob"].address)
        peers_via = emu.add("bob-peers", cl.workers["bob"].address)
        workers = {
            n: splitnn.connect(
                f"grpc://{researcher_via}" if n == "bob" else cl.workers[n].url, token=cl.token, name=n, timeout=60
            )
            for n in NAMES
        }
        bob = workers["bob"]
        bob.address = peers_via  # the holders reach bob through a proxy of their own
        emu.set("bob", delay=0.01)
        emu.set("bob-peers", delay=0.01)
        steps, drops = [0], []
        step = bob.step

        def counting_step(*args, **kwargs):  # bob's steps, from both holders' threads
            steps[0] += 1
            if steps[0] in (5, 13):
                drops.append(emu.drop("bob" if steps[0] == 5 else "bob-peers"))
            return step(*args, **kwargs)

        bob.step = counting_step
        model = splitfed([workers["alice"], workers["claire"]], bob)
        assert model.parallel is True
        history = model.fit(DATA, **FIT)
        assert len(drops) == 2 and all(d > 0 for d in drops)  # connections were reset, new ones got through
        assert bob.resumed >= 1  # the researcher's stream to bob broke and was resumed
        assert history.losses() == ref_history.losses()
        assert [e.bytes_sent for e in history.epochs] == [e.bytes_sent for e in ref_history.epochs]
        assert model.ledger.links() == reference.ledger.links()
        assert_same_weights(model.collect(), reference.collect())
        counters = [row for n in ("alice", "claire") for row in workers[n].stats()["counters"]]
        rows = [row for row in counters if row["direction"] == "sent"]
        assert sum(row["messages"] for row in rows if row["kind"] == "repull") >= 1  # a pull asked again
        for w in workers.values():
            w.close()


# ------------------------------------------------------------------ the worker's side, message by message
def issued_session(channel, cl: Cluster) -> str:
    """A new session's id, as the worker issues it (a hello call asking for one)."""
    md = [("x-splitnn-token", cl.token), ("x-splitnn-party", "researcher"), ("x-splitnn-new-session", "1")]
    _, call = channel.unary_unary(CALL, request_serializer=None, response_deserializer=None).with_call(
        Command(op="hello").SerializeToString(), metadata=md, timeout=60
    )
    return dict(call.trailing_metadata())["x-splitnn-session"]


class RawStream:
    """A researcher's Session stream spoken by hand: send commands, read replies one at a time."""

    def __init__(self, channel, cl: Cluster, session: str, stream: str | None):
        md = [("x-splitnn-token", cl.token), ("x-splitnn-party", "researcher"), ("x-splitnn-session", session)]
        if stream is not None:
            md.append(("x-splitnn-stream", stream))
        self.requests: queue.SimpleQueue = queue.SimpleQueue()

        def requests():
            while (item := self.requests.get()) is not None:
                yield item

        call = channel.stream_stream(SESSION, request_serializer=None, response_deserializer=None)
        self.call = call(requests(), metadata=md, timeout=60)

    def send(self, seq: int, op: str, args: dict, blobs=(), ack: int = 0) -> None:
        cmd = Command(seq=seq, op=op, args_json=json.dumps(args), blobs=list(blobs), ack=ack)
        self.requests.put(cmd.SerializeToString())

    def reply(self) -> Reply:
        return Reply.FromString(next(self.call))

    def close(self) -> None:
        self.requests.put(None)


def put(stream: RawStream, seq: int, tid: int) -> None:
    stream.send(seq, "put", *OPERATIONS["put"].encode_args(id=tid, kind="features", values=torch.ones(4)))


def puts_recorded(stream: RawStream, seq: int) -> int:
    stream.send(seq, "stats", {})
    reply = stream.reply()
    assert reply.seq == seq and reply.ok, reply.error
    rows = serde.stats_from_result(json.loads(reply.result_json))["ledger"]
    return sum(r["count"] for r in rows if r["kind"] == "features")


def test_the_worker_runs_a_re_sent_command_once_and_re_sends_its_kept_reply(trio):
    cl = trio
    stream_id = new_session_id()
    with grpc.insecure_channel(cl.workers["bob"].address) as channel:
        session = issued_session(channel, cl)
        first = RawStream(channel, cl, session, stream_id)
        put(first, 1, 101)
        put(first, 1, 101)  # a copy of #1 (as a client re-sends it after a broken connection): not run again
        assert first.reply().seq == 1
        assert puts_recorded(first, 2) == 1  # the reply to #2 is next: the copy got none
        put(first, 3, 103)
        assert first.reply().seq == 3  # (it ran) ...
        first.call.cancel()  # ... and the connection broke before the client could take in that reply

        second = RawStream(channel, cl, session, stream_id)
        second.send(0, "resume", {}, ack=2)  # the client had the replies up to #2
        hello = second.reply()
        assert hello.ok and json.loads(hello.result_json) == {"received": 3}
        kept = second.reply()
        assert kept.seq == 3 and kept.ok  # #3's reply, kept for the resume
        put(second, 3, 103)  # re-sent anyway: not run again
        assert puts_recorded(second, 4) == 2
        second.close()

        # a stream the worker does not know cannot be resumed: the client must fall back (checkpoints)
        third = RawStream(channel, cl, session, new_session_id())
        third.send(0, "resume", {}, ack=0)
        refused = third.reply()
        assert not refused.ok and refused.error_type == "WorkerUnreachableError"
        assert "cannot resume" in refused.error
        third.close()


def test_a_stream_without_an_id_runs_every_command(trio):
    """A tool that speaks the protocol without stream ids (and numbers its commands as it likes) is served as
    before: nothing is deduplicated."""
    cl = trio
    with grpc.insecure_channel(cl.workers["bob"].address) as channel:
        raw = RawStream(channel, cl, issued_session(channel, cl), None)
        put(raw, 1, 201)
        put(raw, 1, 202)
        assert [raw.reply().seq, raw.reply().seq] == [1, 1]
        assert puts_recorded(raw, 1) == 2
        raw.close()
