"""A worker's TCP data plane: peer links without gRPC (``splitnn worker --data-listen``).

:class:`TcpPlane` is the listener (its docstring says what it checks and how it bounds memory);
:func:`check_data_plane` checks the options.
"""

from __future__ import annotations

import asyncio
import logging

from splitnn.accounting import RESEARCHER
from splitnn.common.messages import check_party_name, check_session_tag
from splitnn.errors import ConfigurationError, WireError, WorkerError
from splitnn.server.peers import Peers
from splitnn.transport import tcp
from splitnn.transport.addresses import join_host_port, split_host_port
from splitnn.transport.counters import ByteCounters
from splitnn.transport.memory import release_memory
from splitnn.transport.security import TLSConfig, token_matches

log = logging.getLogger("splitnn.worker")

#: Seconds a new connection has to send its hello frame.
HELLO_TIMEOUT = 10.0
#: Seconds after a connection closes before the freed heap is handed back (one trim for a burst of closes).
TRIM_DELAY = 0.5


def check_data_plane(listen: str | None, advertise: str | None) -> None:
    """Refuse a malformed ``--data-listen`` or ``--data-advertise``, or an advertised address without a listener
    (ConfigurationError), before anything starts."""
    for flag, value in (("--data-listen", listen), ("--data-advertise", advertise)):
        if value is not None:
            split_host_port(value, flag, any_port=True, host_optional=True)
    if advertise is not None and listen is None:
        raise ConfigurationError("--data-advertise needs --data-listen (where the data plane listens)")


class TcpPlane:
    """The listener of a worker's TCP data plane; accepted links join the worker's :class:`Peers`.

    Beside its gRPC port a worker may listen on a second one that carries only peer links: the
    same frames, acknowledgements, re-sent pushes and session scoping as the gRPC ``Peer``
    stream (:mod:`splitnn.server.peers`), over :class:`~splitnn.transport.tcp.FrameStream`.
    The worker tells each researcher where (``hello``), the researcher tells the worker's peers
    (``peers``), and a peer that has the address dials it instead of opening a gRPC stream;
    a worker without one is reached over gRPC, so both kinds mix in one federation.

    The listener checks what the gRPC server checks of a peer stream, from the connection's
    hello frame (:func:`splitnn.transport.tcp.read_hello`): the federation token (constant
    time), a valid party name that is neither the researcher's nor this worker's, with mutual
    TLS a certificate naming that party, and a well-formed session tag. It answers ``NO`` and
    the reason, and closes, or ``OK``, and serves the link until either side ends it. It holds at most
    ``max_connections`` connections at once (the worker's ``max_rpcs``); more are closed at once.

    Memory. Until its hello is accepted a connection buffers at most the hello's size
    (:data:`splitnn.transport.tcp.MAX_HELLO_BYTES`, 8 KiB; a bigger first frame ends it), in a buffer
    allocated when its first bytes arrive (an idle connection holds none); only an admitted link gets the
    256 KiB receive buffer and the full frame limit. When connections close, their buffers are freed and
    the freed heap handed back to the system (:func:`splitnn.transport.memory.release_memory`, at most
    every :data:`TRIM_DELAY` seconds), so a flood leaves nothing behind.
    """

    def __init__(
        self,
        name: str,
        token: str,
        *,
        tls: TLSConfig | None,
        peers: Peers,
        counters: ByteCounters,
        max_connections: int = 4096,
    ) -> None:
        self.name, self._token, self._tls = name, token, tls
        self.peers, self.counters = peers, counters
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._served: set[asyncio.Task] = set()
        self._trim: asyncio.TimerHandle | None = None  # a release_memory() due after connections closed
        self.host, self.port = "", 0  # where it listens, once started (the port bound)

    @property
    def address(self) -> str:
        """``HOST:PORT`` where it listens."""
        return join_host_port(self.host, self.port)

    async def start(self, listen: str) -> str:
        """Listen on ``host:port`` (port 0: any free port); return the bound ``host:port``."""
        host, port = split_host_port(listen, "--data-listen", any_port=True, host_optional=True)
        ctx = tcp.server_context(self._tls) if self._tls is not None else None
        chunk = self.peers.limits.frame_bytes
        try:
            self._server = await asyncio.get_running_loop().create_server(
                lambda: tcp.FrameStream.for_peer_frames(chunk, on_open=self._open), host, port, ssl=ctx
            )
        except OSError as exc:
            raise WorkerError(f"worker {self.name!r} cannot listen on {listen} for its data plane: {exc}") from None
        self.host, self.port = host, self._server.sockets[0].getsockname()[1]
        return self.address

    def _open(self, stream: tcp.FrameStream) -> None:
        if len(self._served) >= self.max_connections:  # a flood of connections cannot exhaust the worker
            self.counters.record("?", "recv", "rejected", 0)
            stream.transport.abort()
            return
        task = asyncio.get_running_loop().create_task(self._serve(stream))
        self._served.add(task)
        task.add_done_callback(self._closed)

    def _closed(self, task: asyncio.Task) -> None:
        """A connection ended: hand the memory it held back to the system soon (once for a burst of them)."""
        self._served.discard(task)
        if self._trim is None:
            self._trim = asyncio.get_running_loop().call_later(TRIM_DELAY, self._trim_now)

    def _trim_now(self) -> None:
        self._trim = None
        release_memory()

    async def _serve(self, stream: tcp.FrameStream) -> None:
        try:
            party, tag = await self._admit(stream)
            if party is None:
                return
            stream.admit()  # from now on the full frame limit (before: the hello's size at most)
            await stream.send(tcp.OK)
            link = await self.peers.accept(party, tag, stream.send, stream.read, zero_copy=True)
            error = link.protocol_error or stream.error
            if error is not None:
                log.warning("worker %s: malformed data-plane frame from %s: %s", self.name, party, error)
        except ConnectionError:
            pass
        finally:
            if stream.transport is not None:
                stream.transport.close()  # after what is still buffered for the peer

    async def _admit(self, stream: tcp.FrameStream) -> tuple[str | None, str | None]:
        """The party and session tag the hello names, if the listener lets it in; else say why (and None)."""
        try:
            token, party, tag = tcp.read_hello(await asyncio.wait_for(stream.read(), HELLO_TIMEOUT))
        except (WireError, asyncio.TimeoutError) as exc:
            return await self._refuse(stream, "?", str(exc) or "no hello within 10 s")
        if not token_matches(token, self._token):
            return await self._refuse(stream, party, "missing or wrong federation token")
        try:
            check_party_name(party)
            if tag is not None:
                check_session_tag(tag)
        except WireError as exc:
            return await self._refuse(stream, "?", str(exc))
        if party in (RESEARCHER, self.name):
            return await self._refuse(stream, party, f"{party!r} is not a peer")
        if self._tls is not None and self._tls.ca is not None:
            names = tcp.certificate_names(stream.transport.get_extra_info("peercert"))
            if party not in names:
                return await self._refuse(
                    stream,
                    party,
                    f"caller claims to be {party!r} but its certificate is for {sorted(names) or 'nobody'}",
                )
        return party, tag

    async def _refuse(self, stream: tcp.FrameStream, party: str, why: str) -> tuple[None, None]:
        try:
            check_party_name(party)
        except WireError:
            party = "?"
        self.counters.record(party, "recv", "rejected", 0)
        try:
            await stream.send(tcp.NO + f"worker {self.name!r}: {why}".encode())
        except ConnectionError:
            pass
        return None, None

    async def stop(self) -> None:
        """Stop listening and end the links it accepted."""
        if self._server is not None:
            self._server.close()
        if self._trim is not None:
            self._trim.cancel()
            self._trim = None
        for task in list(self._served):
            task.cancel()
        if self._served:
            await asyncio.wait(set(self._served), timeout=2.0)
