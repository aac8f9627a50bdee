"""The data plane between workers: persistent streams of raw frames, one per peer and session.

When the researcher tells bob to run a segment on alice's activation #7, bob *pulls* #7
from alice over their peer stream (a REQUEST frame, answered by DATA frames or an ERROR);
the researcher never sees the tensor. During a shipped epoch a worker *pushes* its
activations to its next party and its gradients to its previous one (PUSH frames), and
an ABORT frame tells an adjacent party that this worker's part of the epoch failed.
Frame layout and reassembly: :mod:`splitnn.transport.frames`.

Streams are scoped to sessions (:mod:`splitnn.server.sessions`). Each researcher's
session at a worker tells it, for each peer of its model, the peer's address and the
*tag* of the researcher's session there (``peers`` command); a worker dials a peer on
behalf of one of its sessions, naming that tag (``x-splitnn-peer-session``), so the
stream serves that one session at the peer: the peer hands out the tensors of that
session only, and only to the parties that session names as its peers, and delivers
the pushes into that session's inbox. A tag is public (a hash of the secret session
id), so a peer can scope its streams without being able to act as the researcher.

:class:`PeerLink` is one such stream. It is symmetric: whichever side dialled, both
sides may pull and push over it, each within its own session (the dialling side: the
session that dialled; the other: the session the tag names). :class:`Peers` is a
worker's set of links (one dial at a time per link, one channel per peer address,
shared by the sessions); :class:`SessionPeers` is one session's view of it.

A pull survives a link that breaks: :meth:`SessionPeers.pull` dials a new link and asks again,
up to :data:`PULL_RETRIES` times, and the owner hands the same tensor to the same peer again
when it had sent it already (:class:`~splitnn.server.exports.Exports` keeps the tensors it
handed out a while): the tensor arrives once, is recorded once, and is never lost. A pull the
peer does not answer in time is not repeated (the peer is alive but did not produce it).

A link is a gRPC ``Peer`` stream, or, to a peer that listens for them (``splitnn worker --data-listen``;
the researcher passes its address on in :class:`~splitnn.common.serde.PeerAddress`), a TCP connection
carrying the same frames (:mod:`splitnn.transport.tcp`, :mod:`splitnn.server.tcp_plane`): a
:class:`PeerLink` only sends and reads frames, so everything here works the same on both.

A push survives a link that breaks too: the sender keeps each push until the receiver
acknowledges it (an ACK frame; :mod:`splitnn.server.pushes`), and :meth:`SessionPeers.relink`
dials a new link and sends the unacknowledged pushes again on it, in order, before anything
else goes on it -- when a push fails (:meth:`SessionPeers.push`, up to :data:`PULL_RETRIES`
times), when a wait for the peer's push finds the link broken, and before a shipped epoch ends
(:meth:`SessionPeers.settle`). The receiver ignores a push it already has and acknowledges it again.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar

import grpc
import torch

from splitnn.client.channels import open_channel
from splitnn.common.serde import PeerAddress
from splitnn.errors import PolicyError, WireError, WorkerError, WorkerUnreachableError
from splitnn.server.exports import held_bytes
from splitnn.server.pushes import Outbox
from splitnn.server.shipped import EARLY_RULE, HELD_RULE, Inbox
from splitnn.transport import frames, tcp
from splitnn.transport.addresses import split_host_port
from splitnn.transport.counters import ByteCounters
from splitnn.transport.limits import Limits
from splitnn.transport.security import TLSConfig, call_metadata
from splitnn.wire.cut_codec import Arrived, Encoded
from splitnn.wire.proto import PEER

log = logging.getLogger("splitnn.worker")

#: Times a pull is asked again on a new link after its link broke.
PULL_RETRIES = 3
#: Seconds before the first repeated pull; doubled per attempt.
PULL_RETRY_WAIT = 0.25
#: Seconds a receiver gathers acknowledgements of pushes before it sends them, in one ACK frame (one message per
#: push would cost a shipped epoch a fifth of its time on a busy machine); its sender keeps the pushes meanwhile.
ACK_DELAY = 0.05


class LinkLost(WorkerUnreachableError):
    """The peer link broke (the peer may be fine: a new link may get through)."""


T = TypeVar("T")


async def on_new_links(
    attempt: Callable[[], Awaitable[T]],
    lost: type[Exception] = LinkLost,
    *,
    what: str | None = None,
    on_retry: Callable[[Exception], None] | None = None,
) -> T:
    """``attempt()``, and again (on a new link: each attempt takes the open one) each time it raises ``lost``,
    up to :data:`PULL_RETRIES` times, waiting :data:`PULL_RETRY_WAIT` s, doubled per attempt. The last failure
    is raised as it is, or as a LinkLost saying how many attempts to do ``what``."""
    for n in range(PULL_RETRIES + 1):
        try:
            return await attempt()
        except lost as exc:
            if n == PULL_RETRIES:
                if what is None:
                    raise
                raise LinkLost(f"{exc} ({n + 1} attempts to {what})") from None
            if on_retry is not None:
                on_retry(exc)
            await asyncio.sleep(PULL_RETRY_WAIT * 2**n)
    raise AssertionError("unreachable")  # pragma: no cover


def rpc_text(exc: BaseException) -> str:
    """``CODE: details`` of a gRPC error (``str(exc)`` of anything else), for error messages."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        try:
            return f"{exc.code().name}: {exc.details()}"
        except Exception:  # pragma: no cover - defensive
            pass
    return str(exc)


class PeerScope(Protocol):
    """What a peer stream needs from the session it serves (a :class:`~splitnn.server.sessions.Session`)."""

    tag: str
    inbox: Inbox
    counters: ByteCounters
    peers: SessionPeers

    async def serve(self, peer: str, tensor_id: int, kind: str) -> tuple[Any, bool]:
        """Hand ``peer`` this session's tensor ``tensor_id`` (PolicyError if ``peer`` is not one of its peers),
        and whether ``peer`` pulled it before."""


class PeerLink:
    """One persistent bidirectional stream to another worker, carrying raw frames, for one session.

    ``tag`` is the session tag the stream was opened with. A link this worker dialled belongs
    to ``scope`` (the local session that dialled); a link a peer opened serves the local
    session ``tag`` names, looked up when a frame arrives (it may have ended meanwhile).
    ``zero_copy``: the stream (a TCP link's :class:`~splitnn.transport.tcp.FrameStream`) takes a
    frame as its parts, and hands over each frame it reads, so a tensor is neither joined into a
    frame to send nor copied out of one it received.
    """

    def __init__(
        self,
        peers: Peers,
        peer: str,
        tag: str | None,
        send: Callable[[frames.Frame], Awaitable[None]],
        read: Callable[[], Awaitable[Any]],
        *,
        scope: PeerScope | None = None,
        call: Any = None,
        zero_copy: bool = False,
    ) -> None:
        self.peers, self.peer, self.tag = peers, peer, tag
        self.zero_copy = zero_copy
        self.me = peers.name
        self.scope = scope
        self._call = call
        self._task: asyncio.Task | None = None  # the task reading the stream (close() cancels it)
        self.channel_key: tuple[str, str] | None = None  # a dialled link's (peer, address) channel
        self._send, self._read = send, read
        self._lock = asyncio.Lock()
        self._pending: dict[int, asyncio.Future] = {}
        self._reasm = frames.Reassembler(peers.limits.max_tensor_bytes)
        self._push_reasm = frames.Reassembler(peers.limits.max_tensor_bytes)
        self._tasks: set[asyncio.Task] = set()  # pulls being served
        self._writes: set[asyncio.Future] = set()  # answers being written (never cancelled half-way)
        self.closed: BaseException | None = None
        self.protocol_error: WireError | None = None
        self.counted = False  # its channel's use was counted (Peers.forget uncounts it once)
        self._acks: list[tuple[str, int]] = []  # pushes received whole, not yet acknowledged
        self._ack_timer: asyncio.TimerHandle | None = None

    def _lost(self) -> WorkerError:
        return LinkLost(f"worker {self.me!r}: lost the connection to peer {self.peer!r}")

    def session(self) -> PeerScope | None:
        """The local session this stream serves (None: none, or it has ended)."""
        return self.scope if self.scope is not None else self.peers.resolve(self.tag)

    def _count(self, direction: str, kind: str, nbytes: int) -> None:
        scope = self.session()
        (scope.counters if scope is not None else self.peers.counters).record(self.peer, direction, kind, nbytes)

    def close(self) -> None:
        """End the stream (its session ended): stop reading; pending pulls fail."""
        if self._call is not None:
            self._call.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def send(self, frame: frames.Frame, kind: str) -> None:
        """Put one frame on the stream; a broken stream raises WorkerError naming the peer."""
        if self.closed is not None:
            raise self._lost()
        try:
            async with self._lock:
                await self._send(frame)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # grpc raises assorted types for a write on a dead stream
            if self.closed is None:  # nothing more goes over it: the next pull dials a new link
                self.closed = ConnectionError("a write failed")
                self.close()
            raise LinkLost(
                f"worker {self.me!r}: lost the connection to peer {self.peer!r} ({rpc_text(exc) or type(exc).__name__})"
            ) from None
        self._count("sent", kind, frames.frame_len(frame))

    def _frames(self, kind: str, frame_id: int, value: Any, type_: int) -> Iterator[frames.Frame]:
        """The frames carrying ``value`` on this link: cut at the peer chunk size; in parts on a zero-copy stream."""
        chunk = self.peers.limits.frame_bytes
        return frames.value_frames(kind, frame_id, value, chunk, type_=type_, joined=not self.zero_copy)

    async def pull(self, tensor_id: int, kind: str) -> Arrived:
        """Ask the peer for its tensor ``tensor_id`` (or tuple of them) and wait (up to the peer timeout) for it;
        it comes with the bytes it took on the wire and its raw size, for the receiver's ledger."""
        timeout = self.peers.timeout
        if self.closed is not None:
            raise LinkLost(f"worker {self.me!r}: the connection to peer {self.peer!r} is closed ({self.closed})")
        fut = asyncio.get_running_loop().create_future()
        self._pending[tensor_id] = fut
        try:
            await self.send(frames.request(kind, tensor_id), "control")
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise WorkerUnreachableError(
                f"worker {self.me!r}: peer {self.peer!r} did not send {kind} #{tensor_id} within "
                f"{timeout:g} s (is it alive?)"
            ) from None
        except grpc.RpcError as exc:
            raise LinkLost(f"worker {self.me!r}: cannot reach peer {self.peer!r}: {rpc_text(exc)}") from None
        finally:
            self._pending.pop(tensor_id, None)

    async def push(
        self, kind: str, frame_id: int, value: torch.Tensor | tuple | Encoded, *, count_as: str | None = None
    ) -> None:
        """Send ``value`` (a tensor, several, or as its sender encoded it) unasked as PUSH frames (shipped epochs);
        its bytes are counted as ``count_as`` (default: ``kind``)."""
        try:
            for frame in self._frames(kind, frame_id, value, frames.PUSH):
                await self.send(frame, count_as or kind)
        except WorkerError:
            raise
        except Exception as exc:
            raise WorkerUnreachableError(
                f"worker {self.me!r}: cannot send {kind} to peer {self.peer!r}: {rpc_text(exc) or type(exc).__name__}"
            ) from None

    # -- reading ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Read frames until the stream ends; serve pulls, deliver pulled and pushed tensors."""
        try:
            while True:
                raw = await self._read()
                if raw is grpc.aio.EOF or raw is None:
                    break
                try:
                    hdr, chunk = frames.parse(raw)
                except WireError as exc:
                    self._count("recv", "invalid", len(raw))
                    self.protocol_error = exc
                    break
                self._count("recv", hdr.kind if hdr.type in frames.PAYLOAD_TYPES else "control", len(raw))
                self._on_frame(hdr, chunk)
            if self._tasks:  # the peer is done sending but may still read: answer what it asked for
                await asyncio.wait(set(self._tasks), timeout=self.peers.timeout)
        except (grpc.RpcError, asyncio.CancelledError) as exc:
            self.closed = exc
        finally:
            self._shut()
            if self._writes:
                # An answer cut off half-way leaves a write pending in gRPC, and the call can then
                # never finish (the status cannot be sent): let the writes end, each on its own.
                try:
                    await asyncio.wait(set(self._writes), timeout=self.peers.timeout)
                except asyncio.CancelledError:
                    pass

    def _on_frame(self, hdr: frames.FrameHeader, chunk: memoryview) -> None:
        if hdr.type == frames.PUSH:
            self._pushed(hdr, chunk)
        elif hdr.type == frames.ABORT:
            scope = self.session()
            if scope is not None:
                scope.inbox.peer_aborted(self.peer, hdr.id, bytes(chunk).decode("utf-8", "replace"))
        elif hdr.type == frames.ACK:
            try:
                entries = frames.acked(chunk)
            except WireError as exc:
                log.warning("worker %s: bad acknowledgement from %s: %s", self.me, self.peer, exc)
                return
            scope = self.session()
            if not entries:  # the peer waits for them (the end of its epoch): acknowledge now
                self.flush_acks()
            elif scope is not None:
                for kind, frame_id in entries:
                    scope.peers.acked(self.peer, kind, frame_id)
        elif hdr.type == frames.REQUEST:
            task = asyncio.create_task(self._serve(hdr))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self._answered(hdr, chunk)

    def _answered(self, hdr: frames.FrameHeader, chunk: memoryview) -> None:
        """A DATA or ERROR frame answering one of our pulls."""
        fut = self._pending.get(hdr.id)
        if fut is None or fut.done():
            self._reasm.drop(hdr.id)
            return  # an answer nobody waits for any more (timed out): ignore
        if hdr.type == frames.ERROR:
            fut.set_exception(WorkerError(bytes(chunk).decode("utf-8", "replace")))
            return
        try:
            tensor = self._reasm.feed_arrival(hdr, chunk, owned=self.zero_copy)
        except WireError as exc:
            fut.set_exception(WireError(f"worker {self.me!r}: bad tensor from {self.peer!r}: {exc}"))
            return
        if tensor is not None:
            fut.set_result(tensor)

    def _shut(self) -> None:
        """The stream ended: stop serving, fail our pulls and the inbox's waits on this peer."""
        if self.closed is None:
            self.closed = self.protocol_error or ConnectionError("stream ended")
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        for task in self._tasks:
            task.cancel()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(self._lost())
        self.peers.forget(self)
        scope = self.session()
        if scope is not None:
            scope.inbox.peer_lost(self.peer)

    def _pushed(self, hdr: frames.FrameHeader, chunk: memoryview) -> None:
        """A PUSH chunk of a shipped epoch: reassemble, then hand to the inbox (which checks the sender)."""
        if hdr.kind in ("weights", "psi"):  # weights and PSI messages are only ever pulled, never pushed
            self._count("recv", "refused", 0)
            return
        scope = self.session()
        if scope is None:
            self._push_reasm.drop(hdr.id)
            self._refused(hdr, "this worker has no session for the stream (it ended, or the stream names none)")
            return
        if scope.inbox.has(self.peer, hdr.kind, hdr.id):
            # sent again after a broken link, but it arrived before: acknowledged again once whole, used once (and
            # not decoded again)
            self._push_reasm.drop(hdr.id)
            if hdr.more:
                return
        else:
            # checked before the push is decoded, so that a small payload declaring a huge tensor is refused before
            # anything is allocated for it: a run active here takes only what its plan expects from whom, and a
            # push for a run not started here (early) is held within the session's bound
            room, active = scope.inbox.room(self.peer, hdr.kind, hdr.id), scope.inbox.active(hdr.id)
            why = scope.inbox.refusal(hdr.id, self.peer, hdr.kind) if room == 0 else None
            if why is not None and not (active and why == HELD_RULE):
                self._push_reasm.drop(hdr.id)
                self._refused(hdr, why)
                return
            try:
                if why is not None:  # expected by a running epoch, over the session's bound: the run fails, saying so
                    raise WireError(why)
                tensor = self._push_reasm.feed_arrival(hdr, chunk, owned=self.zero_copy, max_bytes=room)
            except WireError as exc:
                self._push_reasm.drop(hdr.id)
                if not active:  # an early push that does not decode within the bound: not held
                    self._refused(hdr, f"{exc}; {EARLY_RULE}")
                    return
                tensor = WireError(f"worker {self.me!r}: bad tensor pushed by {self.peer!r}: {exc}")
            if tensor is None:
                return
            if not scope.inbox.deliver(self.peer, hdr.kind, hdr.id, tensor):
                self._refused(hdr, scope.inbox.refusal(hdr.id, self.peer, hdr.kind))
                return
        self._acks.append((hdr.kind, hdr.id))  # the sender may forget it: say so soon, with others
        if len(self._acks) >= frames.MAX_ACKS:
            self.flush_acks()
        elif self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY, self.flush_acks)

    def _refused(self, hdr: frames.FrameHeader, why: str) -> None:
        self._count("recv", "refused", 0)
        log.warning("worker %s: refused a %s pushed by %s (#%d): %s", self.me, hdr.kind, self.peer, hdr.id, why)

    def flush_acks(self) -> None:
        """Send the gathered acknowledgements now (one ACK frame)."""
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        if self._acks and self.closed is None:
            self._spawn_write([(frames.ack(self._acks), "control")])
        self._acks = []

    async def _serve(self, hdr: frames.FrameHeader) -> None:
        """Answer one pull: the tensor's DATA frames, or an ERROR frame saying why not."""
        try:
            scope = self.session()
            if scope is None:
                raise PolicyError(
                    f"worker {self.me!r} has no session for this stream (it ended, or the stream names none); "
                    f"it hands tensors only within a session that names {self.peer!r} as a peer"
                )
            tensor, again = await scope.serve(self.peer, hdr.id, hdr.kind)
            # frames made one at a time as they are written (a big tensor is never copied whole); a tensor
            # pulled again after a broken link counts as re-sent, not as another transfer of its kind
            count_as = "resent" if again else hdr.kind
            answer = ((f, count_as) for f in self._frames(hdr.kind, hdr.id, tensor, frames.DATA))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # tell the puller why, then keep serving
            answer = [(frames.error(hdr.kind, hdr.id, f"{type(exc).__name__}: {exc}"), "control")]
        await asyncio.shield(self._spawn_write(answer))

    def _spawn_write(self, answer: Iterable[tuple[bytes, str]]) -> asyncio.Future:
        write = asyncio.ensure_future(self._write(answer))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)
        return write

    async def _write(self, answer: Iterable[tuple[bytes, str]]) -> None:
        try:
            for frame, kind in answer:
                await self.send(frame, kind)
        except Exception:  # the stream broke: the puller learns from that
            pass


class Peers:
    """A worker's peer links, of all its sessions; see the module docstring.

    Args:
        name: this worker's party name.
        token: the federation token presented when dialling.
        tls: this party's TLS material, or None.
        limits: message and tensor size limits.
        counters: where frames no session owns are counted.
        timeout: seconds a pull waits for the peer's tensor.
        resolve: the local session a session tag names (None if there is none).
    """

    def __init__(
        self,
        name: str,
        token: str,
        *,
        tls: TLSConfig | None,
        limits: Limits,
        counters: ByteCounters,
        timeout: float,
        resolve: Callable[[str | None], PeerScope | None],
    ) -> None:
        self.name, self._token, self._tls = name, token, tls
        self.limits, self.counters, self.timeout = limits, counters, timeout
        self.resolve = resolve
        self._dialled: dict[tuple[str, str, str], PeerLink] = {}  # (local tag, peer, remote tag) -> link
        self._accepted: set[PeerLink] = set()
        self._dialing: dict[tuple[str, str, str], asyncio.Lock] = {}
        self._channels: dict[tuple[str, str], list] = {}  # (peer, address) -> [channel, links using it]
        self._closing: set[asyncio.Task] = set()
        #: where this worker's TCP data plane listens, as it tells researchers (None: it has none)
        self.data_address: str | None = None

    def connected(self, scope: PeerScope, peer: str, where: PeerAddress) -> bool:
        """Whether ``scope``'s link to ``peer`` is up."""
        link = self._dialled.get((scope.tag, peer, where.tag))
        return link is not None and link.closed is None

    async def link(self, scope: PeerScope, peer: str, where: PeerAddress) -> PeerLink:
        """Session ``scope``'s open link to ``peer`` (serving the peer's session ``where.tag``), dialled if need be."""
        key = (scope.tag, peer, where.tag)
        link = self._dialled.get(key)
        if link is not None and link.closed is None:
            return link
        async with self._dialing.setdefault(key, asyncio.Lock()):
            link = self._dialled.get(key)
            if link is not None and link.closed is None:
                return link
            if where.data is not None:
                stream = await self._dial_tcp(peer, where)
                link = PeerLink(
                    self, peer, where.tag, stream.send, stream.read, scope=scope, call=stream, zero_copy=True
                )
            else:
                channel = self._channel(peer, where.address)
                call = channel.stream_stream(PEER, request_serializer=None, response_deserializer=None)(
                    metadata=call_metadata(self._token, self.name, peer_session=where.tag)
                )
                link = PeerLink(self, peer, where.tag, call.write, call.read, scope=scope, call=call)
                link.channel_key = (peer, where.address)
                link.counted = True
            self._dialled[key] = link
            link._task = asyncio.get_running_loop().create_task(link.run())
            return link

    async def _dial_tcp(self, peer: str, where: PeerAddress) -> tcp.FrameStream:
        """A connection to ``peer``'s TCP data plane, past its hello (see :mod:`splitnn.server.tcp_plane`)."""
        host, port = split_host_port(where.data, f"peer {peer!r}'s data-plane address", error=WireError)
        ctx = tcp.client_context(self._tls) if self._tls is not None else None
        stream = tcp.FrameStream.for_peer_frames(self.limits.frame_bytes)
        whom = f"worker {self.name!r}: peer {peer!r}'s data plane at {where.data}"
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().create_connection(
                    lambda: stream, host, port, ssl=ctx, server_hostname=peer if ctx else None
                ),
                self.timeout,
            )
            await stream.send(tcp.hello(self._token, self.name, where.tag))
            answer = await asyncio.wait_for(stream.read(), self.timeout)
        except ssl.SSLCertVerificationError as exc:
            stream.cancel()
            raise WorkerError(f"{whom} failed the TLS check: {exc.verify_message}") from None
        except (OSError, asyncio.TimeoutError) as exc:
            stream.cancel()
            raise LinkLost(
                f"worker {self.name!r}: lost the connection to peer {peer!r} (its data plane at {where.data} cannot "
                f"be reached: {exc or 'timed out'})"
            ) from None
        if answer == tcp.OK:
            stream.admit()
        else:
            stream.cancel()
            if answer is not None and answer[:2] == tcp.NO:
                raise PolicyError(f"{whom} refused the connection: {bytes(answer[2:]).decode('utf-8', 'replace')}")
            raise LinkLost(f"{whom} closed the connection before answering its hello")
        return stream

    def _channel(self, peer: str, address: str) -> grpc.aio.Channel:
        entry = self._channels.get((peer, address))
        if entry is None:
            channel = open_channel(address, limits=self.limits, tls=self._tls, target_name=peer, aio=True)
            entry = self._channels[(peer, address)] = [channel, 0]
        entry[1] += 1
        return entry[0]

    async def accept(
        self,
        peer: str,
        tag: str | None,
        send: Callable[[frames.Frame], Awaitable[None]],
        read: Callable[[], Awaitable[Any]],
        *,
        zero_copy: bool = False,
    ) -> PeerLink:
        """Serve a stream ``peer`` opened to us for session ``tag`` until it ends; return its link (``zero_copy``:
        see :class:`PeerLink`)."""
        link = PeerLink(self, peer, tag, send, read, zero_copy=zero_copy)
        link._task = asyncio.current_task()
        self._accepted.add(link)
        await link.run()
        return link

    def forget(self, link: PeerLink) -> None:
        self._accepted.discard(link)
        key = (link.scope.tag, link.peer, link.tag) if link.scope is not None else None
        if key is not None and self._dialled.get(key) is link:
            del self._dialled[key]
        if link.counted:
            link.counted = False
            entry = self._channels.get(link.channel_key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:  # the last link over this channel: close it
                    del self._channels[link.channel_key]
                    task = asyncio.get_running_loop().create_task(entry[0].close())
                    self._closing.add(task)
                    task.add_done_callback(self._closing.discard)

    def close_scope(self, tag: str) -> None:
        """Session ``tag`` ended: end the links it dialled and the streams peers opened to it."""
        for (local, _, _), link in list(self._dialled.items()):
            if local == tag:
                link.close()
        for link in list(self._accepted):
            if link.tag == tag:
                link.close()
        for key in [k for k in self._dialing if k[0] == tag]:
            del self._dialing[key]

    def abort(self, scope: PeerScope, peers: dict[str, PeerAddress], run_id: int, text: str) -> None:
        """Best effort, without waiting: tell ``peers`` that ``scope``'s part of epoch ``run_id`` failed."""
        frame = frames.abort(run_id, text)

        async def send(link: PeerLink) -> None:
            try:
                await link.send(frame, "control")
            except Exception:
                pass

        for peer, where in peers.items():
            link = self._dialled.get((scope.tag, peer, where.tag))
            if link is not None and link.closed is None:
                asyncio.get_running_loop().create_task(send(link))

    async def close(self) -> None:
        """Close the links and channels this worker dialled."""
        for link in list(self._dialled.values()):
            link.close()
        channels = [entry[0] for entry in self._channels.values()]
        self._channels.clear()
        for ch in channels:
            await ch.close()


class SessionPeers:
    """One session's view of the worker's :class:`Peers`: the peers its researcher announced, and its links.

    ``addresses`` maps each peer of the session's model to where it listens and the tag of the
    researcher's session there.
    """

    def __init__(self, peers: Peers, scope: PeerScope) -> None:
        self.peers, self.scope = peers, scope
        self.addresses: dict[str, PeerAddress] = {}
        self.pulls_repeated = 0  # pulls asked again after their link broke
        self.pushes_repeated = 0  # pushes sent again after their link broke
        self.outboxes: dict[str, Outbox] = {}  # receiver -> this session's pushes awaiting its acknowledgement

    def _where(self, peer: str) -> PeerAddress:
        where = self.addresses.get(peer)
        if where is None:
            raise WorkerError(
                f"worker {self.peers.name!r} does not know how to reach {peer!r}; the researcher "
                f"must connect the model's workers first"
            )
        return where

    def connected(self, peer: str) -> bool:
        """Whether this session's link to ``peer`` is up."""
        where = self.addresses.get(peer)
        return where is not None and self.peers.connected(self.scope, peer, where)

    async def link(self, peer: str) -> PeerLink:
        """This session's open link to ``peer``, dialling it if there is none."""
        return await self.peers.link(self.scope, peer, self._where(peer))

    async def pull(self, owner: str, tensor_id: int, kind: str) -> Arrived:
        """Pull ``owner``'s tensor ``tensor_id`` (of the researcher's session there) over this session's link;
        on a new link, up to :data:`PULL_RETRIES` times, when the link breaks."""

        async def attempt() -> Arrived:
            return await (await self.link(owner)).pull(tensor_id, kind)

        def again(exc: Exception) -> None:
            log.info("worker %s: pulling %s #%d from %s again: %s", self.peers.name, kind, tensor_id, owner, exc)
            self.pulls_repeated += 1
            self.scope.counters.record(owner, "sent", "repull", 0)  # (a message of no bytes: the count shows)

        return await on_new_links(attempt, what=f"pull {kind} #{tensor_id}", on_retry=again)

    # -- pushes (shipped epochs) --------------------------------------------------------------
    def outbox(self, peer: str) -> Outbox:
        """The pushes to ``peer`` awaiting its acknowledgement."""
        box = self.outboxes.get(peer)
        if box is None:
            box = self.outboxes[peer] = Outbox(peer)
        return box

    def acked(self, peer: str, kind: str, frame_id: int) -> None:
        """``peer`` acknowledged our push: forget it."""
        box = self.outboxes.get(peer)
        if box is not None:
            box.acked(kind, frame_id)

    async def _send_kept(self, peer: str, box: Outbox) -> PeerLink:
        """Send on the open link to ``peer`` (dialled if need be) every kept push not yet sent on it, in order."""
        async with box.lock:  # the link is taken under the lock: one that broke meanwhile was replaced
            link = await self.link(peer)
            for item in box.unsent(link):
                again = item.sends > 0
                item.sent_on, item.sends = link, item.sends + 1
                if again:  # counted as re-sent, never as another transfer of its kind
                    self.pushes_repeated += 1
                    self.scope.counters.record(peer, "sent", "repush", 0)  # (a message of no bytes: the count shows)
                    log.info("worker %s: pushing %s #%d to %s again", self.peers.name, item.kind, item.frame_id, peer)
                await link.push(item.kind, item.frame_id, item.value, count_as="resent" if again else None)
        return link

    async def relink(self, peer: str) -> None:
        """Dial a new link to ``peer`` if this session's is broken, and send the unacknowledged pushes again on it
        (up to :data:`PULL_RETRIES` times, waiting as a repeated pull does); LinkLost when none gets through."""
        box = self.outbox(peer)
        await on_new_links(lambda: self._send_kept(peer, box), what="push")

    async def push(self, peer: str, kind: str, frame_id: int, value: torch.Tensor | tuple | Encoded) -> None:
        """Push ``value`` to ``peer`` (shipped epochs); it is kept until ``peer`` acknowledges it, and sent again on
        a new link if the link breaks first."""
        self.outbox(peer).keep(kind, frame_id, value, held_bytes(value))
        await self.relink(peer)

    async def settle(
        self, peers: Iterable[str], run_id: int, stop: Callable[[], BaseException | None] = lambda: None
    ) -> None:
        """Wait until ``peers`` acknowledged every push of run ``run_id``, sending again what a broken link lost
        (up to the peer timeout); a shipped epoch ends only then. ``stop()`` returns an error that ends the
        wait (a peer aborted the run)."""
        deadline = asyncio.get_running_loop().time() + self.peers.timeout
        for peer in peers:
            box = self.outboxes.get(peer)
            asked = None
            while box is not None and box.pending(run_id):
                if (error := stop()) is not None:
                    raise error
                link = box.link
                if link is None or link.closed is not None:
                    await self.relink(peer)
                    continue
                if asked is not link:  # the peer gathers its acknowledgements (ACK_DELAY): ask for them now
                    asked = link
                    try:
                        await link.send(frames.ack(()), "control")
                    except LinkLost:
                        continue
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    raise WorkerUnreachableError(
                        f"worker {self.peers.name!r}: peer {peer!r} did not acknowledge the epoch's last pushes "
                        f"within {self.peers.timeout:g} s (is it alive?)"
                    )
                box.changed.clear()
                try:  # woken by an acknowledgement; a link that broke meanwhile is seen within the poll
                    await asyncio.wait_for(box.changed.wait(), min(left, 0.05))
                except asyncio.TimeoutError:
                    pass

    def forget_run(self, run_id: int) -> None:
        """Run ``run_id`` ended: drop its kept pushes."""
        for box in self.outboxes.values():
            box.forget_run(run_id)

    def abort(self, peers: set[str], run_id: int, text: str) -> None:
        """Best effort: tell ``peers`` that this session's part of epoch ``run_id`` failed."""
        self.peers.abort(self.scope, {p: self.addresses[p] for p in peers if p in self.addresses}, run_id, text)
