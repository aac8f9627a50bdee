"""A worker's peer links, per session: dialling them, the streams peers open, and pushes kept until acknowledged.

Each researcher's session at a worker tells it, for each peer of its model, the peer's address and the *tag* of
the researcher's session there (``peers`` command); a worker dials a peer on behalf of one of its sessions, naming
that tag (``x-splitnn-peer-session``), so the stream serves that one session at the peer. A tag is public (a hash
of the secret session id): a peer can scope its streams without being able to act as the researcher.

:class:`Peers` is a worker's set of links (:class:`~splitnn.server.links.PeerLink`: one dial at a time per link, one
channel per peer address, shared by the sessions); :class:`SessionPeers` is one session's view of it. A pull
survives a broken link (:meth:`SessionPeers.pull` asks again on a new one; the owner hands the same tensor again),
and so does a push: the sender keeps it until the receiver acknowledges it, and :meth:`SessionPeers.relink` sends
the unacknowledged pushes again, in order, on a new link (:mod:`splitnn.server.pushes`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
import torch

from splitnn.client.channels import open_channel
from splitnn.common.serde import PeerAddress
from splitnn.errors import PolicyError, WireError, WorkerError, WorkerUnreachableError
from splitnn.server.exports import held_bytes
from splitnn.server.links import (
    ACK_DELAY,
    PULL_RETRIES,
    PULL_RETRY_WAIT,
    LinkLost,
    PeerLink,
    PeerScope,
    on_new_links,
    rpc_text,
)
from splitnn.server.pushes import ACK_GRACE, Outbox
from splitnn.transport import frames, tcp
from splitnn.transport.addresses import split_host_port
from splitnn.transport.counters import ByteCounters
from splitnn.transport.limits import Limits
from splitnn.transport.security import TLSConfig, call_metadata
from splitnn.wire.cut_codec import Arrived, Encoded
from splitnn.wire.proto import PEER

__all__ = [
    "ACK_DELAY",
    "PULL_RETRIES",
    "PULL_RETRY_WAIT",
    "LinkLost",
    "PeerLink",
    "PeerScope",
    "Peers",
    "SessionPeers",
    "on_new_links",
    "rpc_text",
]

log = logging.getLogger("splitnn.worker")


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
        self._background: set[asyncio.Task] = set()  # channels closing, ABORTs being sent
        #: where this worker's TCP data plane listens, as it tells researchers (None: it has none)
        self.data_address: str | None = None

    def connected(self, scope: PeerScope, peer: str, where: PeerAddress) -> bool:
        """Whether ``scope``'s link to ``peer`` is up."""
        return self.open_link(scope, peer, where) is not None

    def open_link(self, scope: PeerScope, peer: str, where: PeerAddress) -> PeerLink | None:
        """``scope``'s link to ``peer`` (serving the peer's session ``where.tag``) if it is up, without dialling."""
        link = self._dialled.get((scope.tag, peer, where.tag))
        return link if link is not None and link.closed is None else None

    async def link(self, scope: PeerScope, peer: str, where: PeerAddress) -> PeerLink:
        """Session ``scope``'s open link to ``peer`` (serving the peer's session ``where.tag``), dialled if need be."""
        key = (scope.tag, peer, where.tag)
        link = self._dialled.get(key)
        if link is not None and link.closed is None:
            return link
        again = key in self._dialing  # this session dialled this peer before: its link broke (or the dial failed)
        async with self._dialing.setdefault(key, asyncio.Lock()):
            link = self._dialled.get(key)
            if link is not None and link.closed is None:
                return link
            if again:  # one relink message of no bytes (the count shows)
                scope.counters.record(peer, "sent", "relink", 0)
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
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)

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
        """Best effort, without waiting: tell ``peers`` that ``scope``'s part of epoch ``run_id`` failed. A link
        that breaks under the ABORT (a push written on it was cancelled with the run) is dialled again for it while
        the session lives."""
        frame = frames.abort(run_id, text)

        async def send(link: PeerLink, peer: str, where: PeerAddress) -> None:
            try:
                await link.send(frame, "control")
            except LinkLost:
                if self.resolve(scope.tag) is scope:
                    await (await self.link(scope, peer, where)).send(frame, "control")

        async def best_effort(link: PeerLink, peer: str, where: PeerAddress) -> None:
            try:
                await send(link, peer, where)
            except Exception:
                pass

        for peer, where in peers.items():
            link = self._dialled.get((scope.tag, peer, where.tag))
            if link is not None and link.closed is None:
                task = asyncio.get_running_loop().create_task(best_effort(link, peer, where))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

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
        return where is not None and self.peers.open_link(self.scope, peer, where) is not None

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

        failed = None
        where = self.addresses.get(owner)
        link = self.peers.open_link(self.scope, owner, where) if where is not None else None
        if link is not None:  # the common case, the first attempt on the open link, inline
            try:
                return await link.pull(tensor_id, kind)
            except LinkLost as exc:
                failed = exc
        return await on_new_links(attempt, what=f"pull {kind} #{tensor_id}", on_retry=again, failed=failed)

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

    def acked_all(self, peer: str, entries: Iterable[tuple[str, int]]) -> None:
        """``peer`` acknowledged these pushes ``(kind, frame_id)`` (one ACK frame's): forget them."""
        box = self.outboxes.get(peer)
        if box is not None:
            box.acked_all(entries)

    async def _send_kept(self, peer: str, box: Outbox) -> PeerLink:
        """Send on the open link to ``peer`` (dialled if need be) every kept push not yet sent on it, in order."""
        lock = box.lock
        # the link is taken under the lock: one that broke meanwhile was replaced (acquired and released, not
        # ``async with``: two calls less per push)
        await lock.acquire()
        try:
            where = self.addresses.get(peer)
            link = self.peers.open_link(self.scope, peer, where) if where is not None else None
            if link is None:  # (the common case, an open link, takes no coroutine of its own)
                link = await self.link(peer)
            for item in box.unsent(link):
                again = item.sends > 0
                item.sent_on, item.sends = link, item.sends + 1
                if again:  # counted as re-sent, never as another transfer of its kind
                    self.pushes_repeated += 1
                    self.scope.counters.record(peer, "sent", "repush", 0)  # (a message of no bytes: the count shows)
                    log.info("worker %s: pushing %s #%d to %s again", self.peers.name, item.kind, item.frame_id, peer)
                await link.push(item.kind, item.frame_id, item.value, count_as="resent" if again else None)
        finally:
            lock.release()
        return link

    async def relink(self, peer: str) -> None:
        """Dial a new link to ``peer`` if this session's is broken, and send the unacknowledged pushes again on it
        (up to :data:`PULL_RETRIES` times, waiting as a repeated pull does); LinkLost when none gets through."""
        box = self.outbox(peer)
        await on_new_links(lambda: self._send_kept(peer, box), what="push")

    async def push(self, peer: str, kind: str, frame_id: int, value: torch.Tensor | tuple | Encoded) -> None:
        """Push ``value`` to ``peer`` (shipped epochs); it is kept until ``peer`` acknowledges it, and sent again on
        a new link if the link breaks first (as :meth:`relink` does: the first attempt is made here, inline)."""
        box = self.outboxes.get(peer)
        if box is None:
            box = self.outbox(peer)
        box.keep(kind, frame_id, value, held_bytes(value))
        try:
            await self._send_kept(peer, box)
        except LinkLost as exc:
            await on_new_links(lambda: self._send_kept(peer, box), what="push", failed=exc)

    async def settle(
        self, peers: Iterable[str], run_id: int, stop: Callable[[], BaseException | None] = lambda: None
    ) -> None:
        """Wait until ``peers`` acknowledged every push of run ``run_id``, sending again what a broken link lost
        (up to the peer timeout); a shipped epoch ends only then. ``stop()`` returns an error that ends the
        wait (a peer aborted the run)."""
        deadline = asyncio.get_running_loop().time() + self.peers.timeout
        for peer in peers:
            box = self.outboxes.get(peer)
            asked, waited = None, False
            while box is not None:
                # cleared before the check: an acknowledgement that arrives from here on (even while the question
                # below is written) wakes the wait; cleared after it, such an acknowledgement was missed and the
                # epoch's end waited out the whole poll
                box.changed.clear()
                if not box.pending(run_id):
                    break
                if (error := stop()) is not None:
                    raise error
                link = box.link
                if link is None or link.closed is not None:
                    await self.relink(peer)
                    continue
                if asked is not link and not waited:
                    # the receiver acknowledges the run's last push from us at once, with those it gathered: wait
                    # for that ACK frame a while before asking for it (a question would cost both sides a frame)
                    waited = True
                elif asked is not link:  # the peer gathers its acknowledgements (ACK_DELAY): ask for them now
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
                try:  # woken by an acknowledgement; a link that broke meanwhile is seen within the poll
                    await asyncio.wait_for(box.changed.wait(), min(left, ACK_GRACE if asked is None else 0.05))
                except asyncio.TimeoutError:
                    pass

    def forget_run(self, run_id: int) -> None:
        """Run ``run_id`` ended: drop its kept pushes."""
        for box in self.outboxes.values():
            box.forget_run(run_id)

    def abort(self, peers: set[str], run_id: int, text: str) -> None:
        """Best effort: tell ``peers`` that this session's part of epoch ``run_id`` failed."""
        self.peers.abort(self.scope, {p: self.addresses[p] for p in peers if p in self.addresses}, run_id, text)
