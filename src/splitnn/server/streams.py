"""A researcher's calls to a worker: the ``Session`` stream (commands in order, replies kept for a resume) and
the unary ``Call``.

:class:`Streams` serves them for a :class:`~splitnn.server.server.WorkerServer`: it reads commands into a
:class:`~splitnn.server.replay.Replay` that outlives a broken call, runs them on the session's executor, and
writes (or, after a resume, writes again) their replies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError

from splitnn.accounting import RESEARCHER
from splitnn.common.messages import COMMAND_KIND, END_STREAM, REPLY_KIND, check_session_id, split_reply
from splitnn.errors import WireError
from splitnn.server.exports import StreamState
from splitnn.server.replay import Replay, ResumeRefused
from splitnn.server.sessions import Session
from splitnn.transport.security import REPLACES_KEY, STREAM_KEY
from splitnn.wire.proto import Command, Reply

if TYPE_CHECKING:
    from splitnn.server.server import WorkerServer

log = logging.getLogger("splitnn.worker")


class Streams:
    """The researchers' ``Session`` streams and ``Call``s of one worker; see the module docstring."""

    def __init__(self, server: WorkerServer) -> None:
        self.server = server
        self.name, self.limits, self.sessions = server.name, server.limits, server.sessions
        self.replays: weakref.WeakSet[Replay] = weakref.WeakSet()  # the streams' command logs (busy at stop?)
        self.unary = 0  # single calls running

    def busy(self) -> bool:
        """Whether a command is running or queued (a researcher's open stream waiting for its next one is not)."""
        return self.unary > 0 or any(r.accepted > r.completed for r in self.replays)

    # -- RPC handlers ----------------------------------------------------------------------
    async def call(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """One command in a unary call (hello, stats)."""
        task = self.server.track()
        try:
            caller = await self.server.gate.authenticate(context)
            session = await self.server.open_session(context, may_issue=True)
            state = StreamState()
            self.unary += 1
            try:
                cmd = await self.parse(raw, caller, context, session)
                if session.fresh and cmd.op != "hello":
                    self.sessions.end(session)  # (nothing in it yet)
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"worker {self.name!r}: a new session is asked for by a hello call, not {cmd.op!r}",
                    )
                reply = await session.executor.execute(cmd, caller, state)
                return self.send_reply(reply, caller, cmd.op, session)
            finally:
                self.unary -= 1
                session.exports.drop_stream(state)
                self.sessions.close(session)
        finally:
            self.server.untrack(task)

    async def session(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        """A researcher's ordered stream: its commands run in a :class:`~splitnn.server.replay.Replay` that
        outlives a broken call (a ``resume`` command as the first message attaches a new call to it)."""
        task = self.server.track()
        try:
            caller = await self.server.gate.authenticate(context)
            session = await self.server.open_session(context)
            replay = None
            try:
                md = dict(context.invocation_metadata() or ())
                stream_id, replaces = md.get(STREAM_KEY), md.get(REPLACES_KEY)
                try:
                    for value in (stream_id, replaces):
                        if value is not None:
                            check_session_id(value)
                except WireError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"worker {self.name!r}: stream id: {exc}")
                if replaces is not None and replaces != stream_id:
                    old = session.replays.get(replaces)
                    if old is not None:  # the client gave that stream up: its commands must not run on
                        self._finish(session, old)
                raw = await context.read()
                if raw is grpc.aio.EOF:
                    return
                cmd = await self.parse(raw, caller, context, session)
                if cmd.op == END_STREAM:
                    return
                if cmd.op == "resume":
                    replay = await self._resume(session, stream_id, cmd, task, context)
                    if replay is None:
                        return
                    self.sessions.close(session)  # the replay holds the stream's place in the session already
                else:
                    replay = self._new_replay(session, stream_id, caller)
                    replay.handler = task
                    await replay.ack(cmd.ack)
                    replay.accept(cmd)
                await self._converse(session, replay, caller, context)
                # every reply written after the client said it ends the stream: a clean end. (A broken
                # connection can look like a half-close too; without that word the stream is kept.)
                replay.ending = replay.closing and not context.cancelled()
            finally:
                if replay is None:
                    self.sessions.close(session)
                elif replay.detach(task):
                    self._detached(session, replay)
        finally:
            self.server.untrack(task)

    # -- a stream's life -------------------------------------------------------------------------
    def _new_replay(self, session: Session, stream_id: str | None, caller: str) -> Replay:
        if stream_id is not None and stream_id in session.replays:  # a client reusing an id: the old one ends
            self._finish(session, session.replays[stream_id])
        replay = Replay(stream_id)
        self.replays.add(replay)
        if stream_id is not None:
            session.replays[stream_id] = replay
        replay.runner = asyncio.get_running_loop().create_task(self._run_commands(session, replay, caller))
        return replay

    async def _resume(
        self, session: Session, stream_id: str | None, cmd: Command, task: asyncio.Task, context
    ) -> Replay | None:
        """Attach this call to the stream it resumes and answer with the highest seq received (or refuse)."""
        replay = session.replays.get(stream_id) if stream_id is not None else None
        try:
            if replay is None or replay.ending:
                raise ResumeRefused(
                    "it holds no such stream (it restarted, or the session's grace period ended)"
                    if stream_id is not None
                    else "the stream has no id (x-splitnn-stream)"
                )
            await replay.attach(task, int(cmd.ack))
        except ResumeRefused as exc:
            reply = Reply(seq=0, ok=False, error_type="WorkerUnreachableError")
            reply.error = f"worker {self.name!r} cannot resume the stream: {exc}"
            await context.write(self.send_reply(reply, RESEARCHER, "resume", session))
            return None
        log.info("worker %s: session %s resumed a broken stream at #%d", self.name, session.tag[:8], replay.received)
        reply = Reply(seq=0, ok=True, result_json=json.dumps({"received": replay.received}))
        await context.write(self.send_reply(reply, RESEARCHER, "resume", session))
        return replay

    async def _converse(self, session: Session, replay: Replay, caller: str, context) -> None:
        """Read commands into ``replay`` and write its replies, until the client is done and all are written."""
        resending = replay.rewrites  # replies written before a break and again now: counted as re-sent
        writing = stopping = False

        async def write() -> None:
            nonlocal resending, writing
            while not stopping and (data := await replay.next_reply()) is not None:
                writing = True  # never cancelled now: a write cut off half-way leaves it pending in gRPC, and the
                try:  # call could never end
                    await context.write(data)
                finally:
                    writing = False
                if resending > 0:
                    resending -= 1
                    session.counters.record(caller, "sent", "resent", len(data))

        async def stop_writing() -> None:
            nonlocal stopping
            stopping = True  # a write under way ends, and the writer with it
            if not writing:
                writer.cancel()
            if not writer.done():
                await asyncio.wait({writer}, timeout=self.server.peer_timeout)

        writer = asyncio.get_running_loop().create_task(write())
        try:
            while True:
                raw = await context.read()
                if raw is grpc.aio.EOF:  # (a broken connection may look like this too: see session())
                    await replay.half_closed()
                    break
                try:
                    cmd = Command.FromString(raw)
                except (DecodeError, TypeError, ValueError):
                    await stop_writing()  # before the call is aborted: no write may be in flight then
                    await self.parse(raw, caller, context, session)  # aborts (INVALID_ARGUMENT)
                if cmd.op == END_STREAM:  # the client ends the stream on purpose: no resume will come
                    session.counters.record(caller, "recv", "control", len(raw))
                    replay.closing = True
                    continue
                await replay.ack(cmd.ack)
                if replay.accept(cmd):
                    session.counters.record(caller, "recv", COMMAND_KIND.get(cmd.op, "control"), len(raw))
                else:  # a copy re-sent after a broken connection: its reply is kept (or on its way)
                    session.counters.record(caller, "recv", "resent", len(raw))
            await writer
        finally:
            await stop_writing()

    async def _run_commands(self, session: Session, replay: Replay, caller: str) -> None:
        """Run ``replay``'s commands in order, keeping every reply (a broken call does not stop them)."""
        while True:
            cmd = await replay.commands.get()
            if cmd.op == "run_epoch":
                async for reply in session.executor.run_epoch(cmd):
                    await replay.emit(cmd.seq, self.send_reply(reply, caller, cmd.op, session))
            else:
                reply = await (
                    session.executor.execute_batch(cmd, caller, replay.state)
                    if cmd.op == "batch"
                    else session.executor.execute(cmd, caller, replay.state)
                )
                for part in split_reply(reply, self.limits.chunk_bytes):
                    await replay.emit(cmd.seq, self.send_reply(part, caller, cmd.op, session))
            await replay.completed_one()

    def _detached(self, session: Session, replay: Replay) -> None:
        """The call carrying ``replay`` broke: keep it (and the session's tensors) for the grace period."""
        if replay.ending or not replay.resumable or session.anonymous or session.ended or self.sessions.grace <= 0:
            self._finish(session, replay)
            return
        log.info("worker %s: session %s lost its researcher's stream; kept for a resume", self.name, session.tag[:8])
        replay.expiry = asyncio.get_running_loop().call_later(self.sessions.grace, self._finish, session, replay)

    def _finish(self, session: Session, replay: Replay) -> None:
        """Give ``replay`` up: stop its commands and its call, forget its state, end its place in the session."""
        if replay.expiry is not None:
            replay.expiry.cancel()
            replay.expiry = None
        if replay.runner is not None and not replay.runner.done():
            replay.runner.cancel()
        handler, replay.handler = replay.handler, None
        if handler is not None and handler is not asyncio.current_task() and not handler.done():
            handler.cancel()
        if replay.id is not None and session.replays.get(replay.id) is replay:
            del session.replays[replay.id]
        elif replay.id is not None:
            return  # given up already
        session.exports.drop_stream(replay.state)
        self.sessions.close(session)

    # -- messages ----------------------------------------------------------------------------------
    async def parse(
        self, raw: bytes, caller: str, context: grpc.aio.ServicerContext, session: Session, *, count: bool = True
    ) -> Command:
        """Decode a command (a malformed one aborts the call: INVALID_ARGUMENT); count it to the session."""
        try:
            cmd = Command.FromString(raw)
        except (DecodeError, TypeError, ValueError) as exc:
            session.counters.record(caller, "recv", "invalid", len(raw) if isinstance(raw, bytes) else 0)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"worker {self.name!r}: malformed command: {exc}")
        if count:
            session.counters.record(caller, "recv", COMMAND_KIND.get(cmd.op, "control"), len(raw))
        return cmd

    def send_reply(self, reply: Reply, caller: str, op: str, session: Session) -> bytes:
        """A reply's bytes (an error reply in its place if it is over the message limit), counted to the session."""
        data = reply.SerializeToString()
        if len(data) > self.limits.max_message_bytes:
            data = Reply(
                seq=reply.seq,
                ok=False,
                error_type="WireError",
                error=f"worker {self.name!r}: the reply to {op!r} is {len(data)} bytes, over the "
                f"{self.limits.max_message_bytes}-byte message limit",
            ).SerializeToString()
        session.counters.record(caller, "sent", REPLY_KIND.get(op, "control") if reply.ok else "control", len(data))
        return data
