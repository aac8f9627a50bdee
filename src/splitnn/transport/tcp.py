"""Peer frames over a plain TCP (or TLS) connection: the data plane without gRPC.

Each :mod:`~splitnn.transport.frames` frame goes on a TCP connection behind a 4-byte little-endian
length. :class:`FrameStream` is one connection (its docstring says how it buffers, the hello and TLS);
:func:`hello` / :func:`read_hello` are the opening exchange; :func:`server_context` and
:func:`client_context` the TLS contexts.
"""

from __future__ import annotations

import asyncio
import collections
import json
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any

import numpy

from splitnn.errors import WireError
from splitnn.transport import frames
from splitnn.transport.security import TLSConfig

LENGTH = struct.Struct("<I")
#: Receive buffer for frames that fit in it (most control frames and small tensors).
SCRATCH_BYTES = 256 * 1024
#: Bytes of frames received but not yet read after which the connection stops reading.
HIGH_WATER = 64 * 1024 * 1024
#: Largest hello frame (JSON).
MAX_HELLO_BYTES = 8192
#: Frames (and parts of a frame) shorter than this are joined with their length prefix into one write.
JOIN_BELOW = 64 * 1024
#: Where a received frame's tensor payload is placed in memory (a multiple of this address; the torch allocator's).
ALIGN = 64
#: Frames of a tensor this long or longer are handed over in memory of their own (shorter ones as ``bytes``: below
#: this, allocating aligned memory costs more than the copy it saves the decoder).
OWN_FROM = 64 * 1024
#: Room, beyond a chunk, in the largest frame a peer link takes: the frame header and the payload header.
FRAME_ROOM = 64 * 1024
OK, NO = b"OK", b"NO"


def _unaligned(head: memoryview) -> int:
    return 0


class FrameStream(asyncio.BufferedProtocol):
    """One TCP connection carrying length-prefixed frames; ``read`` and ``send`` are the peer link's calls.

    The peer data plane (:mod:`splitnn.server.peers`) puts :mod:`~splitnn.transport.frames` on a
    stream that gives it two calls, ``send(frame)`` and ``read() -> frame | None``. gRPC's
    bidirectional stream is one such stream; this module is another: each frame goes on a TCP
    connection behind a 4-byte little-endian length. Through ``fit`` on this machine's loopback, peer
    links over TCP cost about a third less per byte and a millisecond less per batch than over gRPC
    (``benchmarks/bench_network.py --data-plane grpc,tcp``; docs/performance.md).

    :class:`FrameStream` is the asyncio protocol of one connection. It receives into its own
    buffer (no stream reader's copies): small frames are cut out of a 256 KiB scratch buffer,
    a frame too big for it is read straight into a buffer of its own size. A declared length
    above the limit ends the connection before anything is buffered. Until its first frame (the
    hello, or the answer to it) is read and the connection let in (:meth:`FrameStream.admit`), a
    stream takes at most :data:`MAX_HELLO_BYTES` per frame into a buffer of that size, allocated
    when the first bytes arrive: a connection that never says hello costs no more than that
    (an idle one nothing), and its buffers go when it closes. A frame carrying a tensor is
    handed to the reader in memory of its own with the tensor's bytes at a 64-byte boundary
    (``align``; from 64 KiB), so that the tensor can be built on it; and a frame given as parts (a header and
    views of a tensor's memory, :data:`splitnn.transport.frames.Frame`) is written without joining
    them: the kernel copies each byte once, from where it is.

    A connection starts with a *hello*: the dialling party sends one frame of JSON (federation
    token, its party name, the session tag it dials, as the gRPC metadata of a peer stream would
    carry them) and waits for the answer frame: ``OK``, or ``NO`` followed by the reason (the
    listener then closes). Authentication itself is the listener's (:mod:`splitnn.server.tcp_plane`).

    With TLS both sides use the party's certificate and the federation CA, as gRPC does: the
    dialler checks that the listener's certificate names the peer it meant to reach; with a CA the
    listener requires the dialler's certificate and :func:`certificate_names` says whom it names.
    """

    def __init__(
        self,
        max_frame: int,
        on_open: Callable[[FrameStream], None] | None = None,
        *,
        align: Callable[[memoryview], int] | None = None,
        hello_first: bool = False,
    ) -> None:
        self._max_frame = max_frame
        # until admit(): the hello's size at most, in a buffer of that size (allocated when bytes arrive)
        self.max_frame = min(max_frame, MAX_HELLO_BYTES) if hello_first else max_frame
        self._scratch_bytes = LENGTH.size + self.max_frame if hello_first else SCRATCH_BYTES
        self._on_open = on_open
        self._align = align or _unaligned  # (a frame's first bytes) -> the offset in it to put at an ALIGN boundary
        self.transport: asyncio.Transport | None = None
        self._scratch = bytearray()  # allocated by get_buffer, when the first bytes arrive
        self._fill = 0  # bytes of the scratch buffer received and not yet cut into frames
        self._big: memoryview | None = None  # a frame too big for the scratch buffer, being received
        self._big_fill = 0
        self._frames: collections.deque = collections.deque()
        self._queued = 0  # bytes in _frames
        self._waiter: asyncio.Future | None = None
        self._writable: asyncio.Future | None = None  # set while the transport asks us to stop writing
        self.lost: BaseException | None = None  # why the connection ended (None: still open)
        self.error: WireError | None = None  # a malformed length from the other side

    @classmethod
    def for_peer_frames(cls, chunk_bytes: int, on_open: Callable[[FrameStream], None] | None = None) -> FrameStream:
        """A stream of peer frames (:mod:`splitnn.transport.frames`) cut at ``chunk_bytes``: its frame limit leaves
        room for the headers, and tensor payloads are received aligned (:func:`frames.payload_start`). It opens with
        a hello (``hello_first``): at most :data:`MAX_HELLO_BYTES` are taken until :meth:`admit`."""
        return cls(chunk_bytes + FRAME_ROOM, on_open, align=frames.payload_start, hello_first=True)

    def admit(self) -> None:
        """The hello was accepted (or answered ``OK``): take frames up to the stream's full limit from now on."""
        if self.max_frame == self._max_frame:
            return
        self.max_frame, self._scratch_bytes = self._max_frame, SCRATCH_BYTES
        if self._scratch:  # what arrived after the hello moves into the bigger buffer
            grown = bytearray(SCRATCH_BYTES)
            grown[: self._fill] = self._scratch[: self._fill]
            self._scratch = grown

    # -- asyncio callbacks -------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        keep_alive(transport.get_extra_info("socket"))
        # pause_writing as soon as the transport holds anything back, so that send returns only once the kernel
        # has taken every part: parts are views of tensors, which asyncio (3.12 on; TLS in any version) may keep
        transport.set_write_buffer_limits(high=0)
        if self._on_open is not None:
            self._on_open(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._big is not None:
            return self._big[self._big_fill :]
        if not self._scratch:
            self._scratch = bytearray(self._scratch_bytes)
        return memoryview(self._scratch)[self._fill :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._big is not None:
            self._big_fill += nbytes
            if self._big_fill == len(self._big):
                big, self._big = self._big, None
                self._deliver(big)
            return
        self._fill += nbytes
        self._cut()

    def _cut(self) -> None:
        """Cut the whole frames out of the scratch buffer; move a frame too big for it into its own buffer."""
        buf, pos, fill = self._scratch, 0, self._fill
        view = memoryview(buf)
        while fill - pos >= LENGTH.size:
            (n,) = LENGTH.unpack_from(buf, pos)
            if n > self.max_frame:
                self._refuse(
                    f"peer frame of {n:,} bytes is over this worker's limit of {self.max_frame:,}"
                    + (" before the hello was accepted" if self.max_frame < self._max_frame else "")
                )
                return
            start = pos + LENGTH.size
            if fill - start >= n:
                frame = view[start : start + n]
                offset = self._align(frame) if n >= OWN_FROM else 0
                if offset:
                    own = self._own(n, offset)
                    own[:] = frame
                    self._deliver(own)
                else:
                    self._deliver(bytes(frame))
                pos = start + n
            elif LENGTH.size + n > len(buf):  # read the rest straight into the frame's own buffer
                big = self._own(n, self._align(view[start:fill]))
                big[: fill - start] = view[start:fill]
                self._big, self._big_fill, pos = big, fill - start, fill
                break
            else:
                break
        if pos:
            rest = fill - pos
            view[:rest] = view[pos:fill]
            self._fill = rest
        else:
            self._fill = fill

    @staticmethod
    def _own(n: int, offset: int) -> memoryview:
        """``n`` bytes of memory of their own (uninitialised), byte ``offset`` of them at an ALIGN boundary."""
        mem = numpy.empty(n + ALIGN, numpy.uint8)
        pad = -(mem.ctypes.data + offset) % ALIGN
        return memoryview(mem)[pad : pad + n]

    def _refuse(self, text: str) -> None:
        self.error = WireError(text)
        self._fill = 0
        if self.transport is not None:
            self.transport.abort()

    def _deliver(self, frame: bytes | memoryview) -> None:
        self._frames.append(frame)
        self._queued += len(frame)
        if self._queued > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()  # the reader is behind: let TCP's window push back on the sender
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = exc or ConnectionResetError("connection closed")
        self._scratch, self._big, self._fill = bytearray(), None, 0  # its buffers go with it (frames read stay)
        self._wake()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # -- the stream's two calls --------------------------------------------------------------
    async def read(self) -> bytes | memoryview | None:
        """The next frame; None once the connection has ended (or the other side broke the framing). A frame
        that is not ``bytes`` is the reader's own memory: nothing else writes to it."""
        while not self._frames:
            if self.lost is not None or self.error is not None:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        frame = self._frames.popleft()
        self._queued -= len(frame)
        if self._queued <= HIGH_WATER // 2 and self.transport is not None and self.lost is None:
            self.transport.resume_reading()
        return frame

    async def send(self, frame: frames.Frame | bytearray | memoryview) -> None:
        """Put one frame (whole, or as a tuple of its parts) on the connection; ConnectionError once it has
        ended. Parts are not joined: a big one is written as it is, and ``send`` returns once the transport
        holds none of it any more (the kernel has taken it all), so the memory may change afterwards."""
        if self.lost is not None or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        parts = frame if isinstance(frame, tuple) else (frame,)
        small = [LENGTH.pack(frames.frame_len(frame))]
        for part in parts:  # runs of small parts joined (with the length), big ones written as they are
            if len(part) < JOIN_BELOW:
                small.append(part)
                continue
            if small:
                self.transport.write(b"".join(small))
                small = []
            self.transport.write(part)
        if small:
            self.transport.write(b"".join(small))
        if self._writable is not None:
            if not self.transport.get_write_buffer_size():
                # nothing held back: a TLS transport pauses at an empty buffer too (its high-water test is ``>=``)
                # and would resume only at its next write or read, so a send waited for the peer to send something
                self._writable = None
                return
            await self._writable
            if self.lost is not None:
                raise ConnectionResetError("the connection closed while sending")

    def cancel(self) -> None:
        """End the connection now (a peer link's ``close``)."""
        if self.transport is not None:
            self.transport.abort()


#: TCP keepalive as the gRPC channels' pings (transport.limits.CLIENT_KEEPALIVE_OPTIONS): a probe after 10 s of
#: silence, the connection dead when one goes unanswered for 5 s, or when sent data stays unacknowledged 15 s.
KEEPALIVE = (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 1), ("TCP_USER_TIMEOUT", 15_000))


def keep_alive(sock: Any) -> None:
    """So that a peer that vanished without closing the connection (a machine lost, a network cut) is noticed in
    bounded time, and the link's reads and writes fail instead of waiting for the peer timeout."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in KEEPALIVE:
            if hasattr(socket, name):  # (Linux names; elsewhere the system's defaults)
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except OSError:  # not a TCP socket (a test's pipe): nothing to keep alive
        pass


def hello(token: str, party: str, tag: str | None) -> bytes:
    """The dialler's first frame."""
    return json.dumps({"token": token, "party": party, "session": tag}).encode()


def read_hello(frame: bytes | bytearray | None) -> tuple[str, str, str | None]:
    """``(token, party, session tag)`` of a hello frame; WireError if it is not one."""
    if frame is None or len(frame) > MAX_HELLO_BYTES:
        raise WireError("no hello frame (or one over 8 KiB) opened the connection")
    try:
        fields = json.loads(bytes(frame))
    except ValueError:
        raise WireError("the hello frame is not JSON") from None
    if not isinstance(fields, dict) or set(fields) != {"token", "party", "session"}:
        raise WireError("the hello frame must hold exactly 'token', 'party' and 'session'")
    token, party, tag = fields["token"], fields["party"], fields["session"]
    if not isinstance(token, str) or not isinstance(party, str) or not (tag is None or isinstance(tag, str)):
        raise WireError("the hello frame's token and party must be strings, its session a string or null")
    return token, party, tag


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    """The listener's TLS: its certificate; with a CA, callers must present one it signed (mutual TLS)."""
    tls.read_files()  # ConfigurationError naming a file that cannot be read
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.ca is not None:
        ctx.load_verify_locations(cafile=str(tls.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(tls: TLSConfig) -> ssl.SSLContext:
    """The dialler's TLS: the federation CA (or the system's) to check the listener, and its own certificate."""
    tls.read_files()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls.ca is not None:
        ctx.load_verify_locations(cafile=str(tls.ca))
    else:
        ctx.load_default_certs()
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return ctx


def certificate_names(cert: dict | None) -> set[str]:
    """Names a verified peer certificate (``SSLObject.getpeercert()``) vouches for: common name and DNS SANs."""
    names: set[str] = set()
    for rdn in (cert or {}).get("subject", ()):
        names.update(value for key, value in rdn if key == "commonName")
    names.update(value for key, value in (cert or {}).get("subjectAltName", ()) if key == "DNS")
    return names
