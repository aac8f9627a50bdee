"""A peer link: one persistent stream of raw frames (:mod:`splitnn.transport.frames`) to another worker, for one
session -- a gRPC ``Peer`` stream or a TCP connection (:mod:`splitnn.server.tcp_plane`), read and written alike.

Over it a worker pulls a peer's tensor (REQUEST, answered by DATA or ERROR frames), pushes its activations and
gradients during a shipped epoch (PUSH, acknowledged by ACK frames: :mod:`splitnn.server.pushes`), and tells an
adjacent party that its part of an epoch failed (ABORT). Every pushed byte is checked against the session's inbox
(:mod:`splitnn.server.shipped`) before it is decoded. :func:`on_new_links` repeats an attempt on a new link.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc
import torch

from splitnn.errors import PolicyError, WireError, WorkerError, WorkerUnreachableError
from splitnn.server.pushes import ACK_DELAY, Acks
from splitnn.server.shipped import EARLY_RULE, HELD_RULE, Inbox
from splitnn.transport import frames
from splitnn.transport.counters import ByteCounters
from splitnn.wire.cut_codec import Arrived, Encoded

if TYPE_CHECKING:
    from splitnn.server.peers import Peers, SessionPeers

log = logging.getLogger("splitnn.worker")

#: Times a pull is asked again on a new link after its link broke.
PULL_RETRIES = 3
#: Seconds before the first repeated pull; doubled per attempt.
PULL_RETRY_WAIT = 0.25


def _time_out(fut: asyncio.Future) -> None:
    """A pull's timer ran out: fail its wait (unless its answer came first)."""
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError())


class LinkLost(WorkerUnreachableError):
    """The peer link broke (the peer may be fine: a new link may get through)."""


T = TypeVar("T")


async def on_new_links(
    attempt: Callable[[], Awaitable[T]],
    lost: type[Exception] = LinkLost,
    *,
    what: str | None = None,
    on_retry: Callable[[Exception], None] | None = None,
    failed: Exception | None = None,
) -> T:
    """``attempt()``, and again (on a new link: each attempt takes the open one) each time it raises ``lost``,
    up to :data:`PULL_RETRIES` times, waiting :data:`PULL_RETRY_WAIT` s, doubled per attempt. The last failure
    is raised as it is, or as a LinkLost saying how many attempts to do ``what``. ``failed``: the first attempt
    was made already (inline, by a caller's fast path) and raised this ``lost`` error; the retries go on from it."""
    for n in range(PULL_RETRIES + 1):
        if n == 0 and failed is not None:
            exc = failed
        else:
            try:
                return await attempt()
            except lost as error:
                exc = error
        if n == PULL_RETRIES:
            if what is None:
                raise exc
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
        self._acks = Acks(self._send_acks, ACK_DELAY)  # pushes received whole, not yet acknowledged
        self._chunk = peers.limits.frame_bytes  # (limits are frozen: read once, not per frame)

    def _lost(self) -> WorkerError:
        return LinkLost(f"worker {self.me!r}: lost the connection to peer {self.peer!r}")

    def session(self) -> PeerScope | None:
        """The local session this stream serves (None: none, or it has ended)."""
        return self.scope if self.scope is not None else self.peers.resolve(self.tag)

    def _count(self, direction: str, kind: str, nbytes: int) -> None:
        scope = self.scope if self.scope is not None else self.peers.resolve(self.tag)  # (session(), inlined)
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
        lock = self._lock  # one writer at a time: frames are never interleaved on the stream
        try:
            await lock.acquire()  # (acquired and released, not ``async with``: two calls less per frame)
            try:
                await self._send(frame)
            finally:
                lock.release()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # grpc raises assorted types for a write on a dead stream
            if self.closed is None:  # nothing more goes over it: the next pull dials a new link
                self.closed = ConnectionError("a write failed")
                self.close()
            raise LinkLost(
                f"worker {self.me!r}: lost the connection to peer {self.peer!r} ({rpc_text(exc) or type(exc).__name__})"
            ) from None
        scope = self.scope if self.scope is not None else self.peers.resolve(self.tag)  # (_count, inlined)
        (scope.counters if scope is not None else self.peers.counters).record(
            self.peer, "sent", kind, len(frame) if type(frame) is bytes else frames.frame_len(frame)
        )

    async def pull(self, tensor_id: int, kind: str) -> Arrived:
        """Ask the peer for its tensor ``tensor_id`` (or tuple of them) and wait (up to the peer timeout) for it;
        it comes with the bytes it took on the wire and its raw size, for the receiver's ledger."""
        timeout = self.peers.timeout
        if self.closed is not None:
            raise LinkLost(f"worker {self.me!r}: the connection to peer {self.peer!r} is closed ({self.closed})")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending[tensor_id] = fut
        timer = None
        try:
            await self.send(frames.request(kind, tensor_id), "control")
            # awaited directly under a timer (not wait_for: one event-loop pass less per pull)
            timer = loop.call_later(timeout, _time_out, fut)
            return await fut
        except asyncio.TimeoutError:
            raise WorkerUnreachableError(
                f"worker {self.me!r}: peer {self.peer!r} did not send {kind} #{tensor_id} within "
                f"{timeout:g} s (is it alive?)"
            ) from None
        except grpc.RpcError as exc:
            raise LinkLost(f"worker {self.me!r}: cannot reach peer {self.peer!r}: {rpc_text(exc)}") from None
        finally:
            if timer is not None:
                timer.cancel()
            self._pending.pop(tensor_id, None)

    async def push(
        self, kind: str, frame_id: int, value: torch.Tensor | tuple | Encoded, *, count_as: str | None = None
    ) -> None:
        """Send ``value`` (a tensor, several, or as its sender encoded it) unasked as PUSH frames (shipped epochs);
        its bytes are counted as ``count_as`` (default: ``kind``)."""
        try:
            for frame in frames.value_frames(  # (self._frames, inlined)
                kind, frame_id, value, self._chunk, type_=frames.PUSH, joined=not self.zero_copy
            ):
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
                # the session this frame is for, looked up once per frame (it may have ended meanwhile)
                scope = self.scope if self.scope is not None else self.peers.resolve(self.tag)
                (scope.counters if scope is not None else self.peers.counters).record(
                    self.peer, "recv", hdr.kind if hdr.type in frames.PAYLOAD_TYPES else "control", len(raw)
                )
                if hdr.type != frames.PUSH:  # (the common frame of a shipped epoch, a PUSH, is handled inline)
                    self._on_frame(hdr, chunk, scope)
                elif (answer := self._pushed(hdr, chunk, scope)) is not None:
                    # the epoch the push woke runs first, until it waits again; then the push is acknowledged, and
                    # the next frame read (a lock-step peer sends its next push only once this party answered)
                    await asyncio.sleep(0)
                    self._acks.arrived(scope.peers, scope.inbox, self.peer, *answer, again=False, now=False)
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

    def _on_frame(self, hdr: frames.FrameHeader, chunk: memoryview, scope: PeerScope | None) -> None:
        if hdr.type == frames.ABORT:
            if scope is not None:
                scope.inbox.peer_aborted(self.peer, hdr.id, bytes(chunk).decode("utf-8", "replace"))
        elif hdr.type == frames.ACK:
            try:
                entries = frames.acked(chunk)
            except WireError as exc:
                log.warning("worker %s: bad acknowledgement from %s: %s", self.me, self.peer, exc)
                return
            if not entries:  # the peer waits for them (the end of its epoch): acknowledge now
                self._acks.flush()
            elif scope is not None:
                scope.peers.acked_all(self.peer, entries)
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
        self._acks.cancel()
        for task in self._tasks:
            task.cancel()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(self._lost())
        self.peers.forget(self)
        scope = self.session()
        if scope is not None:
            scope.inbox.peer_lost(self.peer)

    def _pushed(self, hdr: frames.FrameHeader, chunk: memoryview, scope: PeerScope | None) -> tuple[str, int] | None:
        """A PUSH chunk of a shipped epoch for session ``scope``: reassemble, then hand to the inbox (which checks
        the sender). A push delivered whole and not yet acknowledged: ``(kind, frame_id)`` (else None)."""
        if hdr.kind in ("weights", "psi"):  # weights and PSI messages are only ever pulled, never pushed
            self._count("recv", "refused", 0)
            return None
        if scope is None:
            self._push_reasm.drop(hdr.id)
            self._refused(hdr, "this worker has no session for the stream (it ended, or the stream names none)")
            return None
        room, active = scope.inbox.admit(self.peer, hdr.kind, hdr.id)  # (Inbox.has, Inbox.room, Inbox.active)
        if room is None:
            # a copy sent again after a broken link, which arrived before: acknowledged again once whole, not decoded
            self._push_reasm.drop(hdr.id)
            if hdr.more:
                return
        else:
            # checked before the push is decoded, so that a small payload declaring a huge tensor is refused before
            # anything is allocated for it: a run active here takes only what its plan expects from whom, and a
            # push for a run not started here (early) is held within the session's bound
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
        # whole: the sender may forget it (Acks.arrived). The run's last push from the sender is acknowledged at once,
        # before it is handed on (its epoch ends waiting for it); any other once the epoch it woke waits again (run)
        kind = hdr.kind
        last = scope.inbox.ends_run(self.peer, kind, hdr.id)
        if room is None or last:
            self._acks.arrived(scope.peers, scope.inbox, self.peer, kind, hdr.id, again=room is None, now=last)
        if room is not None and not scope.inbox.deliver(self.peer, kind, hdr.id, tensor):
            self._refused(hdr, scope.inbox.refusal(hdr.id, self.peer, kind))
        return None if room is None or last else (kind, hdr.id)

    def _refused(self, hdr: frames.FrameHeader, why: str) -> None:
        self._count("recv", "refused", 0)
        log.warning("worker %s: refused a %s pushed by %s (#%d): %s", self.me, hdr.kind, self.peer, hdr.id, why)

    def _send_acks(self, entries: list[tuple[str, int]]) -> None:
        if self.closed is None:
            self._spawn_write([(frames.ack(entries), "control")])

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
            # frames made one at a time as they are written (a big tensor is never copied whole), cut at the peer
            # chunk size, in parts on a zero-copy stream; a tensor pulled again after a broken link counts as
            # re-sent, not as another transfer of its kind
            count_as = "resent" if again else hdr.kind
            parts = frames.value_frames(
                hdr.kind, hdr.id, tensor, self._chunk, type_=frames.DATA, joined=not self.zero_copy
            )
            answer = ((f, count_as) for f in parts)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # tell the puller why, then keep serving
            answer = [(frames.error(hdr.kind, hdr.id, f"{type(exc).__name__}: {exc}"), "control")]
        # from here on this task writes, and is never cancelled (a write cut off half-way leaves the call unable to
        # end): it moves from the pulls being served to the answers being written, without a task of its own
        task = asyncio.current_task()
        self._tasks.discard(task)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        await self._write(answer)

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
