"""Peer links over the TCP data plane (``splitnn worker --data-listen``), mixed with gRPC ones in one federation.

alice and claire listen for peer links on TCP, bob does not: alice -> bob and claire -> bob go over gRPC
streams, bob -> claire and bob -> alice over TCP, so both kinds carry activations and gradients in one run.
The oracle is the in-process run (weights, losses, ledger); a link emulator in front of claire's data plane
shows the traffic took it. The listener's checks (token, party, framing) are exercised with raw connections.
"""

from __future__ import annotations

import asyncio
import copy
import struct
import time

import pytest
import torch

import splitnn
from splitnn.models import tutorial_mlp
from splitnn.testing.linkemu import ThreadedLinkEmulator
from splitnn.transport import tcp
from tests.helpers import assert_same_weights, at_batch, data_plane_answer, framed, toy_dataset
from tests.transport.cluster import Cluster

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

NAMES = ("alice", "bob", "claire")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("tcp-plane"), tcp=False) as cl:
        for name in NAMES:
            cl.start(name, *(("--data-listen", "127.0.0.1:0") if name != "bob" else ()))
        yield cl
        assert all(w.alive() for w in cl.workers.values()), "a worker died during the tests"


def twin_run(segments, data, **fit):
    twin = splitnn.SplitNN(segments, [splitnn.VirtualWorker(n) for n in NAMES], optimizer="sgd:lr=0.03")
    history = twin.fit(data, **fit)
    return twin, history


@pytest.mark.parametrize("ship, pipeline", [(True, 1), (False, 1), (True, 8)], ids=["shipped", "per-op", "pipelined"])
def test_a_run_over_tcp_and_grpc_links_equals_the_in_process_run(remote, ship, pipeline):
    alice, bob, claire = remote
    assert alice.data_address.startswith("127.0.0.1:") and claire.data_address and bob.data_address is None
    with ThreadedLinkEmulator() as emu:
        claire.data_address = emu.add("claire-data", claire.data_address)  # bob dials claire through it
        torch.manual_seed(0)
        segments = tutorial_mlp()
        initial = copy.deepcopy(segments)
        data = toy_dataset(200)
        fit = dict(epochs=2, batch_size=16, pipeline=pipeline, progress=False)
        model = splitnn.SplitNN(segments, remote, optimizer="sgd:lr=0.03", ship_epochs=ship)
        history = model.fit(data, **fit)
        assert emu.drop("claire-data") >= 1  # bob's link to claire was a TCP connection through the proxy
    twin, twin_history = twin_run(initial, data, **fit)
    assert history.losses() == twin_history.losses()
    assert model.ledger.links() == twin.ledger.links()  # the same bytes, whichever way they went
    assert_same_weights(model.collect(), twin.collect())


def test_a_dropped_tcp_link_costs_no_step_of_a_shipped_epoch(remote):
    """bob's pushes to claire go over TCP; when claire's data-plane connections drop mid-epoch, bob sends the
    pushes claire had not acknowledged again on a new connection, and claire uses each once."""
    alice, bob, claire = remote
    with ThreadedLinkEmulator() as emu:
        claire.data_address = emu.add("claire-data", claire.data_address)
        # an activation is unacknowledged until its gradient comes back: the link drops while batch 7's is on its way
        # (the researcher sees the loss of batch 6 at most a progress interval, 0.05 s, after claire computed it)
        emu.set("claire-data", delay=0.15)
        torch.manual_seed(1)
        segments = tutorial_mlp()
        initial = copy.deepcopy(segments)
        data = toy_dataset(320)
        fit = dict(epochs=2, batch_size=32, progress=False)
        model = splitnn.SplitNN(segments, remote, optimizer="sgd:lr=0.03")
        drops = []
        at_batch(model, 6, lambda: (time.sleep(0.07), drops.append(emu.drop("claire-data"))))
        history = model.fit(data, **fit)
    assert drops and drops[0] >= 1
    twin, twin_history = twin_run(initial, data, **fit)
    assert history.losses() == twin_history.losses()
    assert model.ledger.links() == twin.ledger.links()  # every transfer recorded once
    assert_same_weights(model.collect(), twin.collect())
    sent = [row for row in bob.stats()["counters"] if row["direction"] == "sent"]
    assert sum(row["messages"] for row in sent if row["kind"] == "repush") >= 1  # sent again on a new link


def test_the_listener_admits_only_peers_with_the_token(cluster, remote):
    alice = remote[0]
    address = alice.data_address
    refusals = {
        "wrong federation token": framed(tcp.hello("not-the-token", "bob", None)),
        "not JSON": framed(b"GET / HTTP/1.1"),
        "'researcher' is not a peer": framed(tcp.hello(cluster.token, "researcher", None)),
        "'alice' is not a peer": framed(tcp.hello(cluster.token, "alice", None)),
        "session tag": framed(tcp.hello(cluster.token, "bob", "not a tag")),
    }
    for why, first in refusals.items():
        answer = data_plane_answer(address, first)
        assert answer is not None and answer.startswith(tcp.NO) and why in answer.decode(), (why, answer)
    assert (
        data_plane_answer(address, struct.pack("<I", 2**31)) is None
    )  # a length over the limit: closed, nothing buffered
    assert data_plane_answer(address, framed(tcp.hello(cluster.token, "bob", None))) == tcp.OK
    assert cluster.workers["alice"].alive()


def test_a_peer_that_refuses_the_hello_fails_the_run_naming_why(cluster, tmp_path):
    """eve has another federation's token: alice's connection to eve's data plane is refused, not retried, and the
    researcher learns why."""
    other = tmp_path / "OTHER_TOKEN"
    other.write_text("another-federation\n")
    cluster.start("eve", "--data-listen", "127.0.0.1:0", token_file=other)
    alice = splitnn.connect(cluster.workers["alice"].url, token=cluster.token, name="alice", timeout=60)
    eve = splitnn.connect(cluster.workers["eve"].url, token="another-federation", name="eve", timeout=60)
    try:
        torch.manual_seed(0)
        segments = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), torch.nn.LogSoftmax(dim=1)]
        model = splitnn.SplitNN(segments, [alice, eve], optimizer="sgd:lr=0.03")
        with pytest.raises(splitnn.errors.WorkerError, match="refused the connection.*wrong federation token"):
            model.fit(toy_dataset(64, shape=(1, 8, 8)), epochs=1, batch_size=32, progress=False)
    finally:
        alice.close()
        eve.close()
        cluster.stop("eve")
        del cluster.workers["eve"]


def test_the_listener_holds_at_most_max_rpcs_connections():
    from splitnn.server.server import WorkerServer

    async def main() -> list:
        server = WorkerServer("alice", "a-federation-token", data_listen="127.0.0.1:0", max_rpcs=2)
        await server.start("127.0.0.1:0")
        host, port = server.data_plane.host, server.data_plane.port
        streams = []
        try:
            for _ in range(3):
                stream = tcp.FrameStream(1 << 20)
                await asyncio.get_running_loop().create_connection(lambda s=stream: s, host, port)
                streams.append(stream)
                await asyncio.sleep(0.2)  # the listener has seen it
            third = await asyncio.wait_for(streams[2].read(), 20)  # closed at once, nothing said
            await streams[0].send(tcp.hello("a-federation-token", "bob", None))
            first = await asyncio.wait_for(streams[0].read(), 20)  # the two before it are served
            return [third, None if first is None else bytes(first)]
        finally:
            for stream in streams:
                stream.cancel()
            await server.stop(0.5)

    assert asyncio.run(main()) == [None, tcp.OK]


def test_a_data_port_in_use_fails_the_start_and_leaves_nothing_listening():
    import socket

    from splitnn.errors import WorkerError
    from splitnn.server.server import WorkerServer

    async def main() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            server = WorkerServer("alice", "a-federation-token", data_listen=f"127.0.0.1:{port}")
            with pytest.raises(WorkerError, match=f"cannot listen on 127.0.0.1:{port} for its data plane"):
                await server.start("127.0.0.1:0")
            with pytest.raises(OSError):  # its gRPC port was closed again
                await asyncio.open_connection(*server.address.rsplit(":", 1))

    asyncio.run(main())
