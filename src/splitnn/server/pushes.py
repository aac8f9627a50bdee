"""A session's pushes of shipped epochs, kept until the receiver acknowledges them.

:class:`Outbox` keeps one receiver's pushes within a bound and re-sends them on a new link (its
docstring gives the rules); :class:`Acks` gathers acknowledgements; :class:`PushesLost` is a re-send
the bound made impossible.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from splitnn.errors import WorkerUnreachableError
from splitnn.transport.frames import MAX_ACKS
from splitnn.workers.epoch import previous_batch, run_of

#: Seconds a receiver gathers acknowledgements of pushes before it sends them, in one ACK frame (one message per
#: push would cost a shipped epoch a fifth of its time on a busy machine); its sender keeps the pushes meanwhile.
#: (Only pushes no push of the receiver answers take ACK entries: :func:`answered`.) An epoch's end does not wait
#: for it: the sender asks for the acknowledgements then, after :data:`ACK_GRACE` (``SessionPeers.settle``).
ACK_DELAY = 0.25
#: Acknowledgements a receiver gathers at most before it sends them without waiting for :data:`ACK_DELAY` (so a
#: fast pipelined run's sender keeps about this many gradients, far below :data:`KEEP_PUSHES`). A kept push is a
#: live tensor: with 64 of them each batch's activations and gradients took fresh memory (cold in the cache, page
#: faults); 16 let the allocator reuse warm blocks for one ACK frame per 16 pushes. Measured with
#: ``benchmarks/bench_ab.py``, 60 interleaved epoch pairs: 2% more samples/s than 64; 4 cost 2.5% (the frames) and
#: 8 or 32 gained less.
ACK_EVERY = min(16, MAX_ACKS)
#: Seconds the end of a shipped epoch waits for the acknowledgement of its last pushes before it asks for them: the
#: receiver sends it at once, unasked, when the last push a run expects arrives (the question cost both sides a frame).
ACK_GRACE = 0.02
#: Unacknowledged pushes one session keeps per receiver (acknowledgements come a round trip after the push).
KEEP_PUSHES = 256
#: Bytes of unacknowledged pushes one session keeps per receiver.
KEEP_BYTES = 64 * 1024 * 1024


class PushesLost(WorkerUnreachableError):
    """A push that must be sent again was dropped (the keep bound): the epoch cannot survive the broken link."""


@dataclass(slots=True)
class Kept:
    """One pushed value awaiting its acknowledgement."""

    kind: str
    frame_id: int
    value: Any
    nbytes: int
    sent_on: Any = None  # the link it was last (being) sent on
    sends: int = 0  # times it was sent (more than one: re-sent after a broken link)


class Outbox:
    """The unacknowledged pushes of one session to one receiver, in the order they were pushed.

    During a shipped epoch a worker pushes its activations to its next party and its gradients to
    its previous one over their peer link (:mod:`splitnn.server.peers`). A link can break with a
    push written but not yet received -- a connection reset, a proxy restarted. So the sender keeps
    each pushed value in the :class:`Outbox` of its receiver until the receiver acknowledges it (an
    ACK frame, sent when the push is complete at the receiver, :mod:`splitnn.transport.frames`).
    When the link breaks, the sender dials a new one and sends again, in order, every kept push not
    yet sent on it (:meth:`Outbox.unsent`); the receiver ignores a push it already has
    (:meth:`splitnn.server.shipped.Inbox.has`) and acknowledges it again. A push is identified by
    the session (the link serves one), the sender, its kind and its frame id, which carries the
    run, the batch and the cut (:func:`splitnn.workers.epoch.push_id`).

    Memory is bounded per receiver: at most :data:`KEEP_PUSHES` pushes and :data:`KEEP_BYTES`
    bytes (one bigger push alone is kept). Beyond the bound the oldest unacknowledged push is
    dropped, and a re-send that needs it fails the epoch
    (:class:`PushesLost`; ``fit`` then takes the checkpoint route).
    """

    def __init__(self, peer: str, *, keep_pushes: int = KEEP_PUSHES, keep_bytes: int = KEEP_BYTES) -> None:
        self.peer = peer
        self.keep_pushes, self.keep_bytes = keep_pushes, keep_bytes
        self.lock = asyncio.Lock()  # one sender at a time: pushes (and re-sends) go out in order
        self._kept: OrderedDict[tuple[str, int], Kept] = OrderedDict()
        self._bytes = 0
        self.dropped: set[tuple[str, int]] = set()  # pushes dropped unacknowledged (the bound)
        self.link: Any = None  # the link the latest pushes went on
        self._queue: deque[Kept] = deque()  # kept pushes, oldest first, from the first one not yet sent on ``link``
        self.changed = asyncio.Event()  # set on every acknowledgement

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def keep(self, kind: str, frame_id: int, value: Any, nbytes: int) -> Kept:
        """Keep a value about to be pushed; drop the oldest kept beyond the bound."""
        item = self._kept[(kind, frame_id)] = Kept(kind, frame_id, value, nbytes)
        self._queue.append(item)
        self._bytes += nbytes
        while len(self._kept) > 1 and (len(self._kept) > self.keep_pushes or self._bytes > self.keep_bytes):
            key, old = self._kept.popitem(last=False)
            self._bytes -= old.nbytes
            self.dropped.add(key)
        return item

    def acked(self, kind: str, frame_id: int) -> None:
        """The receiver has this push: forget it. (Once per push when a push answers it: no loop, no tuple.)"""
        key = (kind, frame_id)
        self.dropped.discard(key)  # (an acknowledgement may overtake the bound)
        item = self._kept.pop(key, None)
        if item is not None:
            self._bytes -= item.nbytes
            self.changed.set()

    def acked_all(self, entries: Iterable[tuple[str, int]]) -> None:
        """The receiver has these pushes ``(kind, frame_id)`` (an ACK frame's): forget them. (One call per ACK
        frame, not one per push.)"""
        kept, dropped, changed = self._kept, self.dropped, False
        for key in entries:
            dropped.discard(key)  # (an acknowledgement may overtake the bound)
            item = kept.pop(key, None)
            if item is not None:
                self._bytes -= item.nbytes
                changed = True
        if changed:
            self.changed.set()

    def unsent(self, link: Any) -> list[Kept]:
        """The kept pushes not (being) sent on ``link``, oldest first, and ``link`` is now the one pushes go on.

        Raises PushesLost when ``link`` replaces a broken one and a push dropped unacknowledged (the bound)
        may have been lost with it.
        """
        if link is not self.link:
            if self.link is not None and self.dropped:
                raise PushesLost(
                    f"{len(self.dropped)} pushes to {self.peer!r} that were not acknowledged had to be dropped "
                    f"(at most {self.keep_pushes} pushes and {self.keep_bytes} bytes are kept per receiver), "
                    "so they cannot be sent again after the broken link"
                )
            self.link = link
            self._queue = deque(self._kept.values())
        queue, kept = self._queue, self._kept
        # pushes go out in order, so those sent on ``link`` (or no longer kept) lead the queue: drop them, then
        # what is left is the answer, without a walk over every kept push
        while queue and (queue[0].sent_on is link or kept.get((queue[0].kind, queue[0].frame_id)) is not queue[0]):
            queue.popleft()
        out = []
        for item in queue:  # (a loop, not a comprehension: one call less per push)
            if item.sent_on is not link and kept.get((item.kind, item.frame_id)) is item:
                out.append(item)
        return out

    def pending(self, run_id: int) -> bool:
        """Whether pushes of run ``run_id`` await their acknowledgement."""
        return any(run_of(item.frame_id) == run_id for item in self._kept.values())

    def forget_run(self, run_id: int) -> None:
        """Run ``run_id`` ended here: drop its kept pushes."""
        for key in [k for k, item in self._kept.items() if run_of(item.frame_id) == run_id]:
            self._bytes -= self._kept.pop(key).nbytes
        self.dropped = {key for key in self.dropped if run_of(key[1]) != run_id}

    def clear(self) -> None:
        self._kept.clear()
        self._queue.clear()
        self._bytes = 0
        self.dropped.clear()


def answered(peers: Any, inbox: Any, peer: str, kind: str, frame_id: int) -> bool:
    """A push from ``peer`` arrived whole: forget the push of ours it answers (``peers``, a session's
    :class:`~splitnn.server.peers.SessionPeers`); whether this one will be answered by one of ours, which
    acknowledges it (then it needs no ACK entry; ``inbox``, the session's :class:`~splitnn.server.shipped.Inbox`).

    Every activation a shipped epoch pushes, under every schedule, comes back as the gradient of the same cut and
    batch (the same frame id, :func:`~splitnn.workers.epoch.push_id`), which its sender computed from that activation:
    so a gradient acknowledges that activation. In a lock-step run each party finishes a batch, its steps with the
    batch's gradients included, before it starts the next: so an activation also acknowledges the gradient of the
    batch before at its cut, and only a run's last gradient from a peer needs an ACK entry. (A party claiming
    another's name can forge this as it can forge an ACK frame: its victim forgets a push it might have had to send
    again after a broken link, and that run fails.)
    """
    if kind == "gradient":
        peers.acked(peer, "activation", frame_id)
        return inbox.lock_step(frame_id) and not inbox.ends_run(peer, kind, frame_id)
    if kind != "activation":
        return False
    if inbox.lock_step(frame_id) and (earlier := previous_batch(frame_id)) is not None:
        peers.acked(peer, "gradient", earlier)
    return True


class Acks:
    """The acknowledgements a receiver gathers (up to ``delay`` s, or :data:`ACK_EVERY` of them) before it sends
    them, through ``send``, in one ACK frame (of at most :data:`~splitnn.transport.frames.MAX_ACKS`)."""

    def __init__(self, send: Callable[[list[tuple[str, int]]], None], delay: float = ACK_DELAY) -> None:
        self._send, self.delay = send, delay
        self._entries: list[tuple[str, int]] = []
        self._timer: asyncio.TimerHandle | None = None

    def add(self, kind: str, frame_id: int, *, now: bool = False) -> None:
        """The push (kind, frame_id) arrived whole: acknowledge it soon, with others (``now``: at once, with those
        gathered)."""
        self._entries.append((kind, frame_id))
        if now or len(self._entries) >= ACK_EVERY:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.delay, self.flush)

    def arrived(self, peers: Any, inbox: Any, peer: str, kind: str, frame_id: int, *, again: bool, now: bool) -> None:
        """Push ``(kind, frame_id)`` from ``peer`` arrived whole: acknowledge it unless one of ours will
        (:func:`answered`); a copy that arrived before (``again``) all the same."""
        if not answered(peers, inbox, peer, kind, frame_id) or again:
            self.add(kind, frame_id, now=now)

    def flush(self) -> None:
        """Send the gathered acknowledgements now."""
        self.cancel()
        entries, self._entries = self._entries, []
        if entries:
            self._send(entries)

    def cancel(self) -> None:
        """Stop the timer (the link ended)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
