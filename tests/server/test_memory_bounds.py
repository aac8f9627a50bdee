"""A worker's memory stays bounded under floods, before authentication and after (issue 24, item 5).

Real ``splitnn worker`` processes; the attacks are :mod:`splitnn.testing.floods` (also run by
``benchmarks/bench_floods.py``, which prints the figures). Each test reads the worker's resident memory
(``VmRSS``, and its peak ``VmHWM``) from /proc and asserts a bound with a wide margin: before the fix,
200 pre-hello connections took a worker up by about 260 MB and 200 idle ones by about 50 MB.
"""

from __future__ import annotations

import asyncio
import struct
import time

import grpc
import pytest

from splitnn.server.shipped import EARLY_PUSH_BYTES, EARLY_RULE
from splitnn.testing import floods
from splitnn.transport import tcp
from splitnn.wire.proto import CALL
from tests.helpers import data_plane_answer, framed
from tests.transport.cluster import Cluster

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

MB = 1_000_000
CONNECTIONS = 200


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("floods"), tcp=True) as cl:
        cl.start("bob")
        yield cl
        assert cl.workers["bob"].alive(), "the worker died under a flood"


def data_address(cluster: Cluster) -> str:
    return cluster.data_listen("bob")


def settled_rss(wp, seconds: float = 1.0) -> int:
    time.sleep(seconds)  # (the listener sees the connections, or their end, and trims)
    return wp.rss_bytes()


def test_a_first_frame_over_the_hellos_size_ends_the_connection_unbuffered(cluster):
    """Before its hello is accepted a connection may send no frame over 8 KiB: one that declares more is closed at
    once (nothing answered), while a hello of up to 8 KiB is still read and judged."""
    address = data_address(cluster)
    assert data_plane_answer(address, struct.pack("<I", tcp.MAX_HELLO_BYTES + 1) + b"{") is None
    padded = b'{"token": "x", "party": "eve", "session": null}'.ljust(tcp.MAX_HELLO_BYTES)
    answer = data_plane_answer(address, framed(padded))
    assert answer is not None and answer.startswith(tcp.NO) and b"federation token" in answer
    assert data_plane_answer(address, framed(tcp.hello(cluster.token, "carol", None))) == tcp.OK


def test_a_pre_hello_flood_buffers_at_most_the_hellos_size(cluster):
    """200 connections without the token, each sending 1 MiB - 1 byte of a declared 1 MiB first frame: the worker
    holds none of it (before: up to 1.06 MiB each, +260 MB here), and has it all back when they close."""
    wp = cluster.workers["bob"]
    before = settled_rss(wp)
    with floods.pre_hello_flood(data_address(cluster), CONNECTIONS):
        during = settled_rss(wp)
    after = settled_rss(wp, 2.0)
    assert during - before < 40 * MB, (before, during)
    assert after - before < 20 * MB, (before, after)
    assert wp.alive()


def test_idle_connections_hold_no_receive_buffer_and_leave_nothing_behind(cluster):
    """200 connections that send nothing cost no receive buffer (before: 256 KiB each, +50 MB here) and leave
    nothing behind when they close."""
    wp = cluster.workers["bob"]
    before = settled_rss(wp)
    with floods.idle_flood(data_address(cluster), CONNECTIONS):
        during = settled_rss(wp)
    after = settled_rss(wp, 2.0)
    assert during - before < 25 * MB, (before, during)
    assert after - before < 15 * MB, (before, after)
    # and the data plane still serves a peer
    assert data_plane_answer(data_address(cluster), framed(tcp.hello(cluster.token, "carol", None))) == tcp.OK


def _worker_log(cluster: Cluster) -> str:
    return cluster.workers["bob"].log.read_text(errors="replace")


def test_a_tiny_topk_payload_declaring_512_mib_is_refused_before_it_is_decoded(cluster):
    """Six 68-byte early pushes, each a 40-byte topk payload declaring 2^27 float32 values, from six made-up
    peer names into the attacker's own session (before: the worker held 512 MiB per push, +3.2 GB here). Each
    is refused before anything is allocated, none is acknowledged, and the worker's peak memory stays put."""
    wp = cluster.workers["bob"]
    (researcher,) = cluster.connect("bob")
    try:
        before, peak_before = settled_rss(wp), wp.rss_bytes("VmHWM")
        acks = asyncio.run(floods.topk_bomb(data_address(cluster), cluster.token, researcher.session_tag, 6, parties=6))
        during, peak = wp.rss_bytes(), wp.rss_bytes("VmHWM")
    finally:
        researcher.close()
    assert acks == []
    assert during - before < 40 * MB and peak - max(peak_before, before) < 40 * MB, (before, during, peak)
    log = _worker_log(cluster)
    assert "refused a activation pushed by mallory5" in log and EARLY_RULE in log
    assert wp.alive()


def test_early_pushes_are_bounded_in_bytes_per_session_whatever_names_send_them(cluster):
    """Three early pushes of 32 MiB each (decoded; topk payloads of 128 KiB, within the codec's density rule) from
    three peer names into one session: the first two fill the session's 64 MiB for early pushes and are kept, the
    third is refused by the per-session byte bound (before: 64 pushes per claimed name, any size, and names are
    free). None is acknowledged by an ACK frame: an activation kept for a run is acknowledged by its gradient."""
    wp = cluster.workers["bob"]
    (researcher,) = cluster.connect("bob")
    n = EARLY_PUSH_BYTES // 2 // 4  # float32 values of 32 MiB
    logged = len(_worker_log(cluster))  # (the worker serves this module's tests: its log holds theirs)
    try:
        acks = asyncio.run(
            floods.topk_bomb(
                data_address(cluster), cluster.token, researcher.session_tag, 3, n, kept=n // 1024, parties=3
            )
        )
    finally:
        researcher.close()
    assert acks == []
    log = _worker_log(cluster)[logged:]
    assert "refused a activation pushed by mallory2" in log
    assert "pushed by mallory0" not in log and "pushed by mallory1" not in log  # (kept: refused ones are logged)
    assert wp.alive()


def test_grpc_calls_without_the_token_are_refused_before_their_message_is_read(cluster):
    """40 calls with a wrong token, each carrying a 4 MiB request message: refused UNAUTHENTICATED before gRPC reads
    the message (before: a unary call's whole message was buffered before its handler checked the token, +170 MB
    here, and kept)."""
    wp = cluster.workers["bob"]
    before = settled_rss(wp)
    channels = [
        grpc.insecure_channel(wp.address, options=[("grpc.max_send_message_length", 8 << 20)]) for _ in range(40)
    ]
    try:
        calls = [
            ch.unary_unary(CALL, request_serializer=None, response_deserializer=None).future(
                b"\0" * (4 << 20),
                metadata=(("x-splitnn-token", "wrong"), ("x-splitnn-party", "researcher")),
                timeout=60,
            )
            for ch in channels
        ]
        codes = {call.exception().code() for call in calls}
        during = wp.rss_bytes()
    finally:
        for ch in channels:
            ch.close()
    assert codes == {grpc.StatusCode.UNAUTHENTICATED}
    assert during - before < 60 * MB, (before, during)
    assert wp.alive()
