"""Length-prefixed peer frames over TCP (splitnn.transport.tcp): the receiver's buffer logic, a real loopback
connection, refusals of oversized lengths and malformed hellos."""

from __future__ import annotations

import asyncio
import random
import socket
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitnn.errors import WireError
from splitnn.transport import frames as peer_frames
from splitnn.transport import tcp
from tests.helpers import framed


def wire_bytes(frames: list[bytes]) -> bytes:
    return b"".join(framed(f) for f in frames)  # (framed writes the length out plainly, not with tcp.LENGTH)


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = self.paused = False

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str, default=None):
        return default

    def pause_reading(self) -> None:
        self.paused = True

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self.high = high

    def resume_reading(self) -> None:
        self.paused = False


def feed(stream: tcp.FrameStream, data: bytes, cuts: list[int]) -> None:
    """Deliver ``data`` as asyncio would: into the buffers the protocol hands out, in pieces ending at ``cuts``
    (and never more than a buffer holds)."""
    pos = 0
    for end in [*sorted(cuts), len(data)]:
        while pos < end:
            buf = stream.get_buffer(-1)
            n = min(len(buf), end - pos)
            assert n > 0, "the protocol handed out an empty buffer"
            buf[:n] = data[pos : pos + n]
            stream.buffer_updated(n)
            pos += n


def drain(stream: tcp.FrameStream) -> list[bytes]:
    out = []
    while stream._frames:
        out.append(bytes(asyncio.run(stream.read())))
    return out


SIZES = [0, 1, 5, tcp.SCRATCH_BYTES - 4, tcp.SCRATCH_BYTES - 3, tcp.SCRATCH_BYTES, 3 * tcp.SCRATCH_BYTES + 7]


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.sampled_from(SIZES) | st.integers(0, 5000), min_size=1, max_size=8),
    seed=st.integers(0, 2**32 - 1),
    ncuts=st.integers(0, 12),
)
def test_frames_come_out_whole_and_in_order_however_the_bytes_arrive(sizes, seed, ncuts):
    rng = random.Random(seed)
    frames = [rng.randbytes(n) for n in sizes]
    data = wire_bytes(frames)
    cuts = [rng.randrange(len(data) + 1) for _ in range(ncuts)]
    # every frame of 13 bytes or more "carries a payload at byte 13": each goes to memory of its own, aligned there
    align = (lambda head: 13 if len(head) >= 13 else 0) if seed % 2 else None
    stream = tcp.FrameStream(max_frame=4 * tcp.SCRATCH_BYTES, align=align)
    stream.connection_made(FakeTransport())
    feed(stream, data, cuts)
    assert drain(stream) == frames
    assert stream._fill == 0 and stream._big is None  # nothing left half-read


def test_before_its_hello_is_admitted_a_stream_takes_only_a_hellos_size():
    """A peer stream buffers nothing until bytes arrive, then at most the hello's size (8 KiB) per frame: a bigger
    first frame ends the connection before it is buffered. After ``admit`` the full limit holds, and bytes that
    came behind the hello are kept."""
    stream = tcp.FrameStream.for_peer_frames(1 << 20)
    stream.connection_made(FakeTransport())
    assert len(stream._scratch) == 0  # an idle connection holds no buffer
    hello, after = b"h" * tcp.MAX_HELLO_BYTES, b"x" * 100
    feed(stream, wire_bytes([hello]) + wire_bytes([after])[:50], [])
    assert len(stream._scratch) == tcp.LENGTH.size + tcp.MAX_HELLO_BYTES
    assert drain(stream) == [hello]
    stream.admit()
    big = b"b" * (512 * 1024)
    feed(stream, wire_bytes([after])[50:] + wire_bytes([big]), [1000])
    assert drain(stream) == [after, big] and len(stream._scratch) == tcp.SCRATCH_BYTES

    eager = tcp.FrameStream.for_peer_frames(1 << 20)
    eager.connection_made(FakeTransport())
    feed(eager, struct.pack("<I", tcp.MAX_HELLO_BYTES + 1) + b"{", [])
    assert eager.error is not None and "before the hello was accepted" in str(eager.error)
    assert eager.transport.aborted and eager._big is None


def test_tensor_frames_are_handed_over_aligned_in_memory_of_their_own():
    ts = [torch.randn(256, 128), torch.randn(1024, 128)]  # one cut out of the scratch buffer, one too big for it
    push = peer_frames.PUSH
    raws = [next(peer_frames.data_frames("activation", i, t, 1 << 22, type_=push)) for i, t in enumerate(ts)]
    control = peer_frames.request("gradient", 9)
    stream = tcp.FrameStream.for_peer_frames(1 << 22)
    stream.connection_made(FakeTransport())
    stream.admit()  # (past the hello)
    feed(stream, wire_bytes([*raws, control]), [100, 5000])
    got = [asyncio.run(stream.read()) for _ in range(3)]
    for raw, frame, t in zip(raws, got, ts):
        assert isinstance(frame, memoryview) and not frame.readonly and bytes(frame) == raw
        out = peer_frames.Reassembler(1 << 30).feed_arrival(*peer_frames.parse(frame), owned=True).value
        assert torch.equal(out, t) and out.data_ptr() % tcp.ALIGN == 0
        out.zero_()
        assert bytes(frame) != raw  # the tensor is built on the frame's memory: no copy was made
    assert got[2] == control and isinstance(got[2], bytes)  # a frame without a tensor: as it came
    small = next(peer_frames.data_frames("activation", 5, torch.randn(2, 3), 1 << 22, type_=push))
    feed(stream, wire_bytes([small]), [])
    assert asyncio.run(stream.read()) == small  # a small one as bytes: copying it costs less than aligning it


class HoldingTransport(FakeTransport):
    """Keeps what it is given, as asyncio's transport does with what the kernel did not take yet."""

    def __init__(self, protocol: tcp.FrameStream) -> None:
        super().__init__()
        self.protocol, self.held = protocol, []

    def is_closing(self) -> bool:
        return False

    def write(self, data) -> None:
        self.held.append(data)
        if len(self.held) == 1 and self.high == 0:
            self.protocol.pause_writing()

    def get_write_buffer_size(self) -> int:
        return sum(len(d) for d in self.held)

    def drain(self) -> bytes:
        out, self.held = b"".join(self.held), []
        self.protocol.resume_writing()
        return out


def test_send_returns_once_the_transport_let_go_of_the_parts():
    async def main() -> None:
        stream = tcp.FrameStream(max_frame=1 << 20)
        transport = HoldingTransport(stream)
        stream.connection_made(transport)
        assert transport.high == 0  # paused as soon as anything is held back
        payload = bytearray(b"p" * tcp.JOIN_BELOW)
        sending = asyncio.ensure_future(stream.send((b"head", memoryview(payload))))
        await asyncio.sleep(0.01)
        assert not sending.done()  # the transport still holds a view of the payload
        wire = transport.drain()
        await asyncio.wait_for(sending, 1)
        assert wire == framed(b"head" + b"p" * tcp.JOIN_BELOW)
        payload[:] = b"q" * len(payload)  # the sender's memory is its own again

    asyncio.run(main())


def test_a_length_over_the_limit_ends_the_connection_before_buffering():
    stream = tcp.FrameStream(max_frame=1000)
    transport = FakeTransport()
    stream.connection_made(transport)
    feed(stream, wire_bytes([b"x" * 10]) + struct.pack("<I", 1001) + b"y" * 50, [])
    assert transport.aborted and "1,001 bytes" in str(stream.error)
    assert bytes(asyncio.run(stream.read())) == b"x" * 10  # what came whole before it is still read
    assert asyncio.run(stream.read()) is None


def test_a_reader_that_falls_behind_pauses_the_connection(monkeypatch):
    monkeypatch.setattr(tcp, "HIGH_WATER", 100)
    stream = tcp.FrameStream(max_frame=1000)
    transport = FakeTransport()
    stream.connection_made(transport)
    feed(stream, wire_bytes([b"a" * 60, b"b" * 60]), [])
    assert transport.paused
    asyncio.run(stream.read())
    assert transport.paused  # 60 bytes still queued: over half the mark
    asyncio.run(stream.read())
    assert not transport.paused


def test_frames_cross_a_real_connection_both_ways():
    frames = [b"", b"small", bytes(range(256)) * 4000, b"z" * (tcp.JOIN_BELOW + 1), b"end"]

    async def main() -> tuple[list[bytes], list[bytes]]:
        got_by_server: list[bytes] = []
        done = asyncio.Event()

        def opened(stream: tcp.FrameStream) -> None:
            async def echo() -> None:
                while (frame := await stream.read()) is not None:
                    got_by_server.append(bytes(frame))
                    await stream.send(bytes(frame)[::-1])
                done.set()

            asyncio.get_running_loop().create_task(echo())

        server = await asyncio.get_running_loop().create_server(
            lambda: tcp.FrameStream(1 << 22, on_open=opened), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        client = tcp.FrameStream(1 << 22)
        await asyncio.get_running_loop().create_connection(lambda: client, "127.0.0.1", port)
        sock = client.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1  # a vanished peer is noticed
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 15_000
        for f in frames[:3]:
            await client.send(f)
        await client.send((b"z", memoryview(b"z" * tcp.JOIN_BELOW)))  # frames in parts: a big part written as it
        await client.send((b"e", memoryview(b"n"), b"d"))  # is, small ones joined; one frame each on the wire
        answers = [bytes(await client.read()) for _ in frames]
        client.cancel()
        await asyncio.wait_for(done.wait(), 20)
        assert await client.read() is None
        with pytest.raises(ConnectionError):
            await client.send(b"after the end")
        server.close()
        await server.wait_closed()
        return got_by_server, answers

    got, answers = asyncio.run(main())
    assert got == frames
    assert answers == [f[::-1] for f in frames]


def test_a_send_over_tls_returns_without_waiting_for_the_peer_to_send(tmp_path):
    """A TLS transport pauses the stream even when it holds nothing back (its high-water test is ``>=``) and would
    resume it only at its next write or read: a send must return once the transport holds none of the frame,
    not when the peer next sends something (shipped epochs hung so over TLS once an activation got no ACK)."""
    from splitnn.transport.security import TLSConfig
    from tests.transport.certs import make_ca, make_party

    ca, ca_cert, ca_key = make_ca(tmp_path)
    server_tls = TLSConfig(*make_party(tmp_path, "claire", ca_cert, ca_key), ca)
    client_tls = TLSConfig(*make_party(tmp_path, "bob", ca_cert, ca_key), ca)
    frames = [b"a" * 10, b"b" * (tcp.JOIN_BELOW + 1), b"c" * 3]

    async def main() -> list[bytes]:
        got: list[bytes] = []
        server_streams: list[tcp.FrameStream] = []
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: tcp.FrameStream(1 << 22, on_open=server_streams.append),
            "127.0.0.1",
            0,
            ssl=tcp.server_context(server_tls),
        )
        port = server.sockets[0].getsockname()[1]
        client = tcp.FrameStream(1 << 22)
        await loop.create_connection(
            lambda: client, "127.0.0.1", port, ssl=tcp.client_context(client_tls), server_hostname="claire"
        )
        for f in frames:  # the server reads, and never writes
            await asyncio.wait_for(client.send(f), 20)  # (a bound on a hang, not a timing: it took the peer timeout)
            got.append(bytes(await asyncio.wait_for(server_streams[0].read(), 20)))
        client.cancel()
        server.close()
        await server.wait_closed()
        return got

    assert asyncio.run(main()) == frames


def test_hello_round_trips_and_junk_is_refused():
    assert tcp.read_hello(tcp.hello("t0k", "alice", "a" * 32)) == ("t0k", "alice", "a" * 32)
    assert tcp.read_hello(tcp.hello("t0k", "alice", None)) == ("t0k", "alice", None)
    for junk in (
        None,
        b"",
        b"not json",
        b"[1, 2]",
        b'{"token": "t"}',
        b'{"token": 1, "party": "a", "session": null}',
        b'{"token": "t", "party": "a", "session": null, "more": 1}',
        b"{" + b" " * 9000 + b"}",
    ):
        with pytest.raises(WireError):
            tcp.read_hello(junk)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_hello_parsing_raises_only_wire_errors(junk):
    try:
        tcp.read_hello(junk)
    except WireError:
        pass


def test_certificate_names_are_the_common_name_and_dns_sans():
    cert = {
        "subject": ((("countryName", "XX"),), (("commonName", "alice"),)),
        "subjectAltName": (("DNS", "alice.example"), ("IP Address", "10.0.0.1")),
    }
    assert tcp.certificate_names(cert) == {"alice", "alice.example"}
    assert tcp.certificate_names(None) == set()
