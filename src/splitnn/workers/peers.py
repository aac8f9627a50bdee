"""The data plane between workers: one persistent stream of raw frames per pair of peers.

When the researcher tells bob to run a segment on alice's activation #7, bob *pulls* #7
from alice over their peer stream (a REQUEST frame, answered by DATA frames or an ERROR);
the researcher never sees the tensor. During a shipped epoch a worker *pushes* its
activations to its next party and its gradients to its previous one (PUSH frames), and
an ABORT frame tells an adjacent party that this worker's part of the epoch failed.
Frame layout and reassembly: :mod:`splitnn.transport.frames`.

:class:`PeerLink` is one such stream. It is symmetric: whichever side dialled, both
sides may pull over it. :class:`Peers` is a worker's set of links: it knows the
addresses the researcher announced (``peers`` command), dials on first use (one dial
at a time per peer), adopts the streams peers open to it, and answers pulls only for
the peers of this worker's model. Pushed tensors go to the worker's
:class:`~splitnn.workers.shipped.Inbox`, which checks who may push what.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import torch

from splitnn.errors import PolicyError, WireError, WorkerError
from splitnn.transport import frames
from splitnn.transport.channels import open_channel
from splitnn.transport.counters import ByteCounters
from splitnn.transport.limits import Limits
from splitnn.transport.security import TLSConfig, call_metadata
from splitnn.wire.proto import PEER
from splitnn.workers.messages import rpc_text
from splitnn.workers.shipped import Inbox

log = logging.getLogger("splitnn.worker")

#: Hands out this worker's tensor ``id`` of ``kind`` (waiting for it if need be): ``serve(id, kind)``.
Serve = Callable[[int, str], Awaitable[torch.Tensor]]


class PeerLink:
    """One persistent bidirectional stream to another worker, carrying raw frames.

    Symmetric: whichever side dialled, both sides may pull tensors over it.
    """

    def __init__(
        self, peers: Peers, peer: str, send: Callable[[bytes], Awaitable[None]], read: Callable[[], Awaitable[Any]]
    ) -> None:
        self.peers, self.peer = peers, peer
        self.me = peers.name
        self._send, self._read = send, read
        self._lock = asyncio.Lock()
        self._pending: dict[int, asyncio.Future] = {}
        self._reasm = frames.Reassembler(peers.limits.max_tensor_bytes)
        self._push_reasm = frames.Reassembler(peers.limits.max_tensor_bytes)
        self._tasks: set[asyncio.Task] = set()
        self.closed: BaseException | None = None
        self.protocol_error: WireError | None = None

    def _lost(self) -> WorkerError:
        return WorkerError(f"worker {self.me!r}: lost the connection to peer {self.peer!r}")

    async def send(self, frame: bytes, kind: str) -> None:
        """Put one frame on the stream; a broken stream raises WorkerError naming the peer."""
        if self.closed is not None:
            raise self._lost()
        try:
            async with self._lock:
                await self._send(frame)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # grpc raises assorted types for a write on a dead stream
            raise WorkerError(
                f"worker {self.me!r}: lost the connection to peer {self.peer!r} ({rpc_text(exc) or type(exc).__name__})"
            ) from None
        self.peers.counters.record(self.peer, "sent", kind, len(frame))

    async def pull(self, tensor_id: int, kind: str) -> torch.Tensor:
        """Ask the peer for its tensor ``tensor_id`` and wait (up to the peer timeout) for it."""
        timeout = self.peers.timeout
        if self.closed is not None:
            raise WorkerError(f"worker {self.me!r}: the connection to peer {self.peer!r} is closed ({self.closed})")
        fut = asyncio.get_running_loop().create_future()
        self._pending[tensor_id] = fut
        try:
            await self.send(frames.request(kind, tensor_id), "control")
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise WorkerError(
                f"worker {self.me!r}: peer {self.peer!r} did not send {kind} #{tensor_id} within "
                f"{timeout:g} s (is it alive?)"
            ) from None
        except grpc.RpcError as exc:
            raise WorkerError(f"worker {self.me!r}: cannot reach peer {self.peer!r}: {rpc_text(exc)}") from None
        finally:
            self._pending.pop(tensor_id, None)

    async def push(self, kind: str, frame_id: int, tensor: torch.Tensor) -> None:
        """Send ``tensor`` unasked as PUSH frames (shipped epochs)."""
        try:
            for frame in frames.data_frames(kind, frame_id, tensor, self.peers.limits.frame_bytes, type_=frames.PUSH):
                await self.send(frame, kind)
        except WorkerError:
            raise
        except Exception as exc:
            raise WorkerError(
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
                    self.peers.counters.record(self.peer, "recv", "invalid", len(raw))
                    self.protocol_error = exc
                    break
                self.peers.counters.record(
                    self.peer, "recv", hdr.kind if hdr.type in frames.PAYLOAD_TYPES else "control", len(raw)
                )
                self._on_frame(hdr, chunk)
        except (grpc.RpcError, asyncio.CancelledError) as exc:
            self.closed = exc
        finally:
            self._shut()

    def _on_frame(self, hdr: frames.FrameHeader, chunk: memoryview) -> None:
        if hdr.type == frames.PUSH:
            self._pushed(hdr, chunk)
        elif hdr.type == frames.ABORT:
            self.peers.inbox.peer_aborted(self.peer, hdr.id, bytes(chunk).decode("utf-8", "replace"))
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
            tensor = self._reasm.feed(hdr, chunk)
        except WireError as exc:
            fut.set_exception(WireError(f"worker {self.me!r}: bad tensor from {self.peer!r}: {exc}"))
            return
        if tensor is not None:
            fut.set_result(tensor)

    def _shut(self) -> None:
        """The stream ended: stop serving, fail our pulls and the inbox's waits on this peer."""
        if self.closed is None:
            self.closed = self.protocol_error or ConnectionError("stream ended")
        for task in self._tasks:
            task.cancel()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(self._lost())
        self.peers.forget(self)
        self.peers.inbox.peer_lost(self.peer)

    def _pushed(self, hdr: frames.FrameHeader, chunk: memoryview) -> None:
        """A PUSH chunk of a shipped epoch: reassemble, then hand to the inbox (which checks the sender)."""
        if hdr.kind == "weights":  # weights are only ever pulled (load_state), never pushed
            self.peers.counters.record(self.peer, "recv", "refused", 0)
            return
        try:
            tensor = self._push_reasm.feed(hdr, chunk)
        except WireError as exc:
            tensor = WireError(f"worker {self.me!r}: bad tensor pushed by {self.peer!r}: {exc}")
        if tensor is not None and not self.peers.inbox.deliver(self.peer, hdr.kind, hdr.id, tensor):
            self.peers.counters.record(self.peer, "recv", "refused", 0)
            log.warning("worker %s: refused a %s pushed by %s (not expected from it)", self.me, hdr.kind, self.peer)

    async def _serve(self, hdr: frames.FrameHeader) -> None:
        try:
            tensor = await self.peers.serve(self.peer, hdr.id, hdr.kind)
            for frame in frames.data_frames(hdr.kind, hdr.id, tensor, self.peers.limits.frame_bytes):
                await self.send(frame, hdr.kind)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # tell the puller why, then keep serving
            try:
                await self.send(frames.error(hdr.kind, hdr.id, f"{type(exc).__name__}: {exc}"), "control")
            except Exception:
                pass


class Peers:
    """A worker's peer links: addresses, dialling, adopting incoming streams; see the module docstring.

    Args:
        name: this worker's party name.
        token: the federation token presented when dialling.
        tls: this party's TLS material, or None.
        limits: message and tensor size limits.
        counters: where every frame's bytes are counted.
        inbox: where pushed tensors, aborts and lost connections are reported.
        timeout: seconds a pull waits for the peer's tensor.
        serve: hands out this worker's tensors to a pulling peer.
    """

    def __init__(
        self,
        name: str,
        token: str,
        *,
        tls: TLSConfig | None,
        limits: Limits,
        counters: ByteCounters,
        inbox: Inbox,
        timeout: float,
        serve: Serve,
    ) -> None:
        self.name, self._token, self._tls = name, token, tls
        self.limits, self.counters, self.inbox, self.timeout = limits, counters, inbox, timeout
        self._serve = serve
        self.addresses: dict[str, str] = {}  # the peers of this worker's model, as the researcher announced them
        self._links: dict[str, PeerLink] = {}
        self._dialing: dict[str, asyncio.Lock] = {}
        self._channels: list[grpc.aio.Channel] = []

    async def serve(self, peer: str, tensor_id: int, kind: str) -> torch.Tensor:
        """A pull from ``peer``: only the peers of this worker's model get tensors."""
        if peer not in self.addresses:
            raise PolicyError(
                f"worker {self.name!r} hands tensors only to the peers of its model "
                f"({sorted(self.addresses)}), not to {peer!r}"
            )
        return await self._serve(tensor_id, kind)

    def connected(self, peer: str) -> bool:
        """Whether a link to ``peer`` is up (or being read)."""
        return peer in self._links

    async def link(self, peer: str) -> PeerLink:
        """The open link to ``peer``, dialling it if there is none."""
        link = self._links.get(peer)
        if link is not None and link.closed is None:
            return link
        async with self._dialing.setdefault(peer, asyncio.Lock()):
            link = self._links.get(peer)
            if link is not None and link.closed is None:
                return link
            address = self.addresses.get(peer)
            if address is None:
                raise WorkerError(
                    f"worker {self.name!r} does not know how to reach {peer!r}; the researcher "
                    f"must connect the model's workers first"
                )
            channel = open_channel(address, limits=self.limits, tls=self._tls, target_name=peer, aio=True)
            self._channels.append(channel)
            call = channel.stream_stream(PEER, request_serializer=None, response_deserializer=None)(
                metadata=call_metadata(self._token, self.name)
            )
            link = PeerLink(self, peer, call.write, call.read)
            self._links[peer] = link
            asyncio.get_running_loop().create_task(link.run())
            return link

    async def accept(
        self, peer: str, send: Callable[[bytes], Awaitable[None]], read: Callable[[], Awaitable[Any]]
    ) -> PeerLink:
        """Serve a stream ``peer`` opened to us until it ends; return its link (see ``protocol_error``)."""
        link = PeerLink(self, peer, send, read)
        self._links.setdefault(peer, link)
        await link.run()
        return link

    def forget(self, link: PeerLink) -> None:
        if self._links.get(link.peer) is link:
            del self._links[link.peer]

    async def pull(self, owner: str, tensor_id: int, kind: str) -> torch.Tensor:
        """Pull ``owner``'s tensor ``tensor_id`` over the link to it."""
        return await (await self.link(owner)).pull(tensor_id, kind)

    async def push(self, peer: str, kind: str, frame_id: int, tensor: torch.Tensor) -> None:
        """Push ``tensor`` to ``peer`` (shipped epochs)."""
        await (await self.link(peer)).push(kind, frame_id, tensor)

    def abort(self, peers: set[str], run_id: int, text: str) -> None:
        """Best effort, without waiting: tell ``peers`` that this worker's part of epoch ``run_id`` failed."""
        frame = frames.abort(run_id, text)

        async def send(link: PeerLink) -> None:
            try:
                await link.send(frame, "control")
            except Exception:
                pass

        for peer in peers:
            link = self._links.get(peer)
            if link is not None and link.closed is None:
                asyncio.get_running_loop().create_task(send(link))

    async def close(self) -> None:
        """Close the channels this worker dialled."""
        for ch in self._channels:
            await ch.close()
        self._channels.clear()
