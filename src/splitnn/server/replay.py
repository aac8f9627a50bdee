"""One researcher stream's commands and replies, kept so that a broken connection costs nothing.

:class:`Replay` holds one stream's conversation apart from the gRPC call carrying it; its docstring
gives the rules (run once, replies kept until acknowledged, resume). :class:`ResumeRefused` is a resume
the log cannot honour.
"""

from __future__ import annotations

import asyncio
from collections import deque

from splitnn.errors import WorkerError
from splitnn.server.exports import StreamState
from splitnn.wire.proto import Command

#: Bytes of replies one stream keeps for re-sending (beyond it, the oldest already written are dropped).
KEEP_BYTES = 64 * 1024 * 1024
#: Replies (parts and progress replies count one each) one stream keeps for re-sending.
KEEP_REPLIES = 4096


class ResumeRefused(WorkerError):
    """A broken stream cannot be resumed here: the worker knows no such stream, or dropped replies it needs."""


class Replay:
    """One stream's conversation: what it received, the replies it made, and who is writing them; see the module.

    A researcher's ``Session`` stream (:mod:`splitnn.server.server`) is a conversation: commands
    numbered ``seq`` 1, 2, 3, ... go in, and every command gets exactly one final reply (after
    progress replies or parts, for some). A :class:`Replay` holds that conversation apart from the
    gRPC call that carries it, so the call can break -- a connection reset, a proxy restarted, a
    keepalive that gave up -- without losing or repeating a step:

    * commands run in a task of their own (the server's runner drains :attr:`Replay.commands`),
      not in the call's handler, so a command that was received is run to its end even when the
      connection breaks mid-way (a ``forward`` waiting for a peer's activation, a shipped epoch);
    * every reply is appended to a log (:meth:`emit`) and written from there, and kept until the
      client acknowledges it (``Command.ack``: the highest seq whose final reply it received),
      within a bound (:data:`KEEP_BYTES`, :data:`KEEP_REPLIES`);
    * a command whose seq is at most the highest received is a re-sent copy and is not run again
      (:meth:`accept`).

    A client that ends its stream on purpose says so first
    (:data:`~splitnn.common.messages.END_STREAM`): a connection that breaks can look like a
    half-close, so a stream that ends without that word is treated as broken. When the call
    breaks, the worker keeps the replay -- and with it the session's tensors -- for the session's
    grace period. The client opens a new call naming the same stream (``x-splitnn-stream``) and
    sends a ``resume`` command carrying its ``ack`` first; the worker answers with the highest seq
    it received (:attr:`received`), re-sends every kept reply after the ``ack``, and the client
    re-sends the commands after ``received``. A resume the log cannot honour -- replies it had to
    drop unacknowledged, or a worker that restarted and knows no such stream -- is refused, and the
    client falls back to the checkpoint route (:mod:`splitnn.split.manifest`).

    Args:
        stream_id: the client's id of the stream, or None for a stream that cannot be resumed (an old
            client's, a tool's): its commands are not deduplicated and nothing is kept after it breaks.
    """

    def __init__(self, stream_id: str | None, *, keep_bytes: int = KEEP_BYTES, keep_replies: int = KEEP_REPLIES):
        self.id = stream_id
        self.state = StreamState()  # staged uploads and announced tensor ids: they outlive a broken call
        self.received = 0  # the highest seq accepted
        self.acked = 0  # the highest seq whose final reply the client acknowledged
        self.lost_upto = 0  # replies of seqs up to this one were dropped unacknowledged: a resume needs ack >= it
        self.commands: asyncio.Queue[Command] = asyncio.Queue()
        self.runner: asyncio.Task | None = None  # runs the commands in order (the server's)
        self.handler: asyncio.Task | None = None  # the call writing the replies now (None: detached)
        self.expiry: asyncio.TimerHandle | None = None  # when a detached replay is given up
        self.accepted = 0  # commands queued to run
        self.completed = 0  # commands that ran (their final replies are in the log)
        self.eof = False  # the attached call's client half-closed it (or it broke that way)
        self.closing = False  # the client said it ends the stream (END_STREAM): it will not resume it
        self.ending = False  # the stream ended cleanly: every reply written after the client's END_STREAM
        self.keep_bytes, self.keep_replies = keep_bytes, keep_replies
        self._log: deque[tuple[int, bytes]] = deque()
        self._base = 0  # absolute index of _log[0]
        self._bytes = 0
        self._written = 0  # absolute index of the next reply to write on the attached call
        self._high = 0  # absolute index past the last reply ever written
        self.rewrites = 0  # replies written before a break that the attached call writes again
        self._changed = asyncio.Condition()

    @property
    def resumable(self) -> bool:
        return self.id is not None

    @property
    def kept(self) -> tuple[int, int]:
        """(replies, bytes) kept now."""
        return len(self._log), self._bytes

    # -- commands in ----------------------------------------------------------------------------
    def accept(self, cmd: Command) -> bool:
        """Queue ``cmd`` to run unless it is a re-sent copy of one received before (then False)."""
        if self.resumable:
            if cmd.seq <= self.received:
                return False
            self.received = cmd.seq
        self.accepted += 1
        self.commands.put_nowait(cmd)
        return True

    async def ack(self, seq: int) -> None:
        """The client received every final reply up to ``seq``: forget those replies."""
        if seq <= self.acked:
            return
        self.acked = seq
        async with self._changed:
            while self._log and self._log[0][0] <= seq:
                self._drop_oldest()
            self._changed.notify_all()

    # -- replies out ----------------------------------------------------------------------------
    def _drop_oldest(self) -> None:
        seq, data = self._log.popleft()
        self._base += 1
        self._bytes -= len(data)
        self._written = max(self._written, self._base)
        if seq > self.acked:
            self.lost_upto = max(self.lost_upto, seq)

    def _over(self) -> bool:
        return len(self._log) > self.keep_replies or self._bytes > self.keep_bytes

    async def emit(self, seq: int, data: bytes) -> None:
        """Keep one serialized reply of command ``seq`` and have it written (waits while the writer lags far)."""
        async with self._changed:
            self._log.append((seq, data))
            self._bytes += len(data)
            self._changed.notify_all()
            while self._over():
                # drop what went out already; unacknowledged, it is lost to a resume (lost_upto). With no call
                # attached nothing goes out: drop the oldest anyway (a long shipped epoch's progress).
                if self._written > self._base or self.handler is None:
                    self._drop_oldest()
                elif len(self._log) <= 1:
                    break  # one reply over the bound on its own: keep it until it is written
                else:
                    await self._changed.wait()  # the writer lags: wait for it, as a direct write would

    async def completed_one(self) -> None:
        """The runner finished a command (its final reply is in the log)."""
        async with self._changed:
            self.completed += 1
            self._changed.notify_all()

    async def half_closed(self) -> None:
        """The attached call's client will send nothing more: the writer ends once every reply is written."""
        async with self._changed:
            self.eof = True
            self._changed.notify_all()

    def _done(self) -> bool:
        return self.eof and self.completed == self.accepted and self._written == self._base + len(self._log)

    async def next_reply(self) -> bytes | None:
        """The next reply to write on the attached call (waits for one); None once the client half-closed the
        call and every command it sent ran and was answered."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._written < self._base + len(self._log) or self._done())
            if self._written < self._base + len(self._log):
                data = self._log[self._written - self._base][1]
                self._written += 1
                self._high = max(self._high, self._written)
                self._changed.notify_all()
                return data
            return None

    # -- calls ----------------------------------------------------------------------------------
    async def attach(self, handler: asyncio.Task, ack: int) -> None:
        """Let call ``handler`` carry the stream from now on, re-sending every kept reply after ``ack``.

        Raises :class:`ResumeRefused` when a reply after ``ack`` was dropped (the log's bound).
        """
        if ack < self.lost_upto:
            raise ResumeRefused(
                f"the replies up to #{self.lost_upto} were dropped before the client acknowledged them "
                f"(at most {self.keep_replies} replies and {self.keep_bytes} bytes are kept per stream)"
            )
        await self.ack(ack)
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        previous, self.handler = self.handler, handler
        if previous is not None and previous is not handler and not previous.done():
            previous.cancel()  # a call the worker had not yet seen break: it writes no more
        async with self._changed:
            self._written = self._base
            self.rewrites = max(0, self._high - self._base)
            self.eof = False
            self._changed.notify_all()

    def detach(self, handler: asyncio.Task) -> bool:
        """Call ``handler`` broke; True if it carried the stream (which now waits to be resumed or given up)."""
        if self.handler is not handler:
            return False
        self.handler = None
        return True
