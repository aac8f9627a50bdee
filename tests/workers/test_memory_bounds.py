"""A worker's memory stays bounded under floods, before authentication and after (issue 24, item 5).

Real ``splitnn worker`` processes; the attacks are :mod:`splitnn.testing.floods` (also run by
``benchmarks/bench_floods.py``, which prints the figures). Each test reads the worker's resident memory
(``VmRSS``, and its peak ``VmHWM``) from /proc and asserts a bound with a wide margin: before the fix,
200 pre-hello connections took a worker up by about 260 MB and 200 idle ones by about 50 MB.
"""

from __future__ import annotations

import struct
import time

import pytest

from splitnn.testing import floods
from splitnn.transport import tcp
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
