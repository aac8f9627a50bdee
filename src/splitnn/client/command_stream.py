"""The researcher's ordered command stream to one worker, and the thread that reads its replies.

:class:`CommandStream` is the plumbing under :class:`~splitnn.client.remote.RemoteWorker`: one gRPC ``Session``
stream on which commands go out in order and replies come back in order. Commands whose answer nobody waits for are
*coalesced* into one ``batch`` message (at most :data:`~splitnn.common.messages.MAX_BATCH` commands and about one
chunk of bytes each), so a training step reaches a worker as one or two messages; blobs larger than a chunk are sent
ahead as ``stage`` commands. Each message sent is a :class:`Pending` answer, which a daemon thread fills as replies
arrive: it joins replies that came in parts, merges their ledger records, remembers the first error of a command
nobody waits for (raised at the next :meth:`~CommandStream.check`), and feeds shipped epochs' handles their progress
and result.

A broken stream is resumed (:class:`~splitnn.client.resume.Resumption`). The client uses grpcio's blocking API
with one reader thread per worker, since ``SplitNN`` and the training loops are synchronous.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator

import grpc

from splitnn import errors as _errors
from splitnn.accounting.ledger import LinkTotal
from splitnn.client.resume import Resumption
from splitnn.common.messages import (
    COMMAND_KIND,
    END_STREAM,
    MAX_BATCH,
    REPLY_KIND,
    error_from_reply,
    join_parts,
    new_session_id,
    reply_result,
)
from splitnn.common.operations import OPERATIONS
from splitnn.common.serde import epoch_report_from_result, losses_from_result
from splitnn.errors import WorkerError, WorkerUnreachableError
from splitnn.transport.counters import ByteCounters
from splitnn.transport.limits import Limits
from splitnn.transport.security import REPLACES_KEY, STREAM_KEY
from splitnn.wire.proto import SESSION, Command, Reply
from splitnn.workers.epoch import EpochHandle

#: Commands whose failure surfaces at the next synchronous call (nobody waits for their reply): the pipelined
#: operations of the table (:mod:`splitnn.common.operations`, ``wait=False``).
ASYNC_OPS = frozenset(name for name, op in OPERATIONS.items() if not op.wait)


log = logging.getLogger("splitnn.client")


class Pending:
    """The answer to one message on the stream: set once its reply (or the stream's failure) arrives."""

    __slots__ = ("event", "reply", "op", "parts", "handle", "data", "progress", "skip", "skip_parts")

    def __init__(self, op: str, data: bytes, handle: EpochHandle | None = None) -> None:
        self.event = threading.Event()
        self.reply: Reply | None = None
        self.op = op
        self.data = data  # the message as sent: re-sent when a broken stream is resumed before its reply came
        self.parts: list[bytes] = []
        self.handle = handle  # a shipped epoch's handle: gets progress, the result or the failure
        self.progress = 0  # progress replies received
        self.skip = 0  # progress replies the worker re-sends after a resume that were received before
        self.skip_parts = 0  # and parts of a reply in parts


class CommandStream(Resumption):
    """One ordered ``Session`` stream to worker ``worker`` at ``address``; see the module docstring.

    Args:
        channel: an open channel to the worker.
        metadata: the call metadata (token, party).
        ids: the id counter shared with the worker's tensor refs (staged uploads take ids from it).
        counters: where wire bytes are counted.
        merge_records: takes the ledger records each reply carries (the worker's ``ledger``, looked
            up at each reply: a model may bind its workers to its own ledger after connecting).
        retries: attempts to resume the stream after it broke (0: fail at once); settable.
        replaces: the id of a broken stream this one replaces (the worker stops what that one queued).
    """

    def __init__(
        self,
        channel: grpc.Channel,
        metadata,
        *,
        worker: str,
        address: str,
        timeout: float,
        limits: Limits,
        counters: ByteCounters,
        merge_records: Callable[[Iterable[LinkTotal]], None],
        ids: Iterator[int],
        retries: int = 3,
        replaces: str | None = None,
    ) -> None:
        self.worker, self.address, self.timeout = worker, address, timeout
        self.retries = retries
        self.id = new_session_id()  # this stream's id at the worker (a secret like the session id)
        self.limits, self.counters, self._merge_records = limits, counters, merge_records
        self._ids = ids
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: dict[int, Pending] = {}
        self._outstanding = 0
        self._idle = threading.Condition(self._lock)
        self.async_error: Exception | None = None
        self.broken: Exception | None = None
        self.closed = False
        self.resumed = 0  # times a broken stream was resumed
        self._acked = 0  # the highest seq whose final reply arrived (replies come in seq order)
        self._resuming = False  # while True, new messages wait in _pending for the resumed call
        self._channel = channel
        self._metadata = (*tuple(metadata), (STREAM_KEY, self.id))
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # Guards the send buffer, the sequence numbers and the queue order: another thread's synchronous
        # call may flush this stream while its own thread is queueing a command.
        self._send_lock = threading.RLock()
        self._buffer: list[tuple[str, str, list[bytes]]] = []
        self._buffer_bytes = 0
        first = self._metadata + (((REPLACES_KEY, replaces),) if replaces is not None else ())
        self._stream = self._open(self._queue, first)
        self._reader = threading.Thread(target=self._read_replies, name=f"splitnn-{worker}-replies", daemon=True)
        self._reader.start()

    # -- sending ------------------------------------------------------------------------------
    def _open(self, requests: queue.SimpleQueue, metadata) -> grpc.Call:
        call = self._channel.stream_stream(SESSION, request_serializer=None, response_deserializer=None)
        return call(self._requests(requests), metadata=metadata)

    @staticmethod
    def _requests(requests: queue.SimpleQueue):
        while True:
            item = requests.get()
            if item is None:
                return
            yield item

    def send(
        self, op: str, args: dict, blobs: list[bytes] = (), *, flush: bool = True, handle: EpochHandle | None = None
    ) -> Pending | None:
        """Queue a command; with ``flush``, put everything queued on the wire as one message."""
        with self._send_lock:
            return self._send(op, args, blobs, flush=flush, handle=handle)

    def _send(
        self, op: str, args: dict, blobs: list[bytes], *, flush: bool, handle: EpochHandle | None
    ) -> Pending | None:
        self.check()
        blobs = list(blobs)
        staged = {}
        for i, blob in enumerate(blobs):
            if len(blob) > self.limits.chunk_bytes:  # cut big uploads into staged chunks
                sid = next(self._ids)
                view = memoryview(blob)
                for start in range(0, len(blob), self.limits.chunk_bytes):
                    self._send(
                        "stage",
                        {"sid": sid},
                        [bytes(view[start : start + self.limits.chunk_bytes])],
                        flush=False,
                        handle=None,
                    )
                staged[str(i)] = sid
                blobs[i] = b""
        if staged:
            args = {**args, "_staged": staged}
        args_json = json.dumps(args)
        size = len(args_json) + sum(map(len, blobs)) + 64
        if self._buffer and (self._buffer_bytes + size > self.limits.chunk_bytes or len(self._buffer) >= MAX_BATCH):
            self._flush(None)
        self._buffer.append((op, args_json, blobs))
        self._buffer_bytes += size
        return self._flush(handle) if flush else None

    def flush(self, handle: EpochHandle | None = None) -> Pending | None:
        """Put the queued commands on the wire as one message (a ``batch`` when there are several)."""
        with self._send_lock:
            return self._flush(handle)

    def _flush(self, handle: EpochHandle | None) -> Pending | None:
        if not self._buffer:
            return None
        items, self._buffer, self._buffer_bytes = self._buffer, [], 0
        seq = next(self._seq)
        if len(items) == 1:
            op, args_json, blobs = items[0]
            data = Command(seq=seq, op=op, args_json=args_json, blobs=blobs, ack=self._acked).SerializeToString()
            self.counters.record(self.worker, "sent", COMMAND_KIND.get(op, "control"), len(data))
        else:
            parts = [Command(op=op, args_json=a, blobs=b).SerializeToString() for op, a, b in items]
            data = Command(seq=seq, op="batch", blobs=parts, ack=self._acked).SerializeToString()
            for (op, _, _), part in zip(items, parts):
                self.counters.record(self.worker, "sent", COMMAND_KIND.get(op, "control"), len(part))
            self.counters.record(self.worker, "sent", "control", len(data) - sum(map(len, parts)))
        pending = Pending(items[-1][0], data, handle)
        with self._lock:
            if self.broken is not None:
                raise self.broken
            self._pending[seq] = pending
            self._outstanding += 1
            if not self._resuming:  # (while resuming, the resumed call gets it after the messages before it)
                self._queue.put(data)
        return pending

    # -- waiting ------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise the stream's failure, or the first error of a command nobody waited for."""
        if self.broken is not None:
            raise self.broken
        if self.closed:
            raise WorkerError(f"worker {self.worker!r} at {self.address}: connection closed")
        if self.async_error is not None:
            exc, self.async_error = self.async_error, None
            raise exc

    def wait(self, pending: Pending) -> Reply:
        """The reply ``pending`` stands for (WorkerError after the timeout)."""
        if not pending.event.wait(self.timeout):
            raise WorkerUnreachableError(
                f"worker {self.worker!r} at {self.address} did not answer {pending.op!r} within "
                f"{self.timeout:g} s (dead or hung?)"
            )
        if pending.reply is None:
            self.check()
            raise WorkerUnreachableError(f"worker {self.worker!r} at {self.address}: no answer to {pending.op!r}")
        return pending.reply

    def _wait_idle(self, timeout: float) -> bool:
        with self._lock:
            return self._idle.wait_for(lambda: self._outstanding <= 0 or self.broken is not None, timeout)

    def drain(self) -> None:
        """Send what is queued, wait until every command is answered; raise the first error."""
        if self.broken is None and not self.closed:
            self.flush()
        if not self._wait_idle(self.timeout):
            raise WorkerUnreachableError(
                f"worker {self.worker!r} at {self.address} did not finish its commands within "
                f"{self.timeout:g} s (dead or hung?)"
            )
        self.check()

    def close(self) -> None:
        """Let queued commands finish, briefly (closing must not hang), then end the stream."""
        try:
            if self.broken is None and self.async_error is None:
                self.flush()
                self._wait_idle(min(self.timeout, 5.0))
        except Exception:
            pass
        self.closed = True
        with self._lock:
            if self.broken is None and not self._resuming:
                # the stream ends here, on purpose: without this the worker cannot tell a half-close from a
                # connection that broke, and keeps the stream for a resume (splitnn.server.replay)
                self._queue.put(Command(seq=0, op=END_STREAM).SerializeToString())
                ending = True
            else:
                ending = False
            self._queue.put(None)
        if ending and self._reader is not threading.current_thread():
            # the worker ends the call once it has read END_STREAM: wait for that (briefly), so that closing the
            # channel right after cannot cancel the call first, which the worker would take for a broken connection
            # and keep the stream (and the session's place) for a resume
            self._reader.join(min(self.timeout, 5.0))

    # -- the reply reader (its own thread) ----------------------------------------------------
    def _read_replies(self) -> None:
        call = self._stream
        while call is not None:
            try:
                for raw in call:
                    reply = Reply.FromString(raw)
                    if reply.progress:  # interim news of a shipped epoch
                        self._on_progress(reply, len(raw))
                    elif reply.more:
                        self._on_part(reply, len(raw))
                    else:
                        self._on_reply(reply, len(raw))
            except grpc.RpcError as exc:
                if self.closed:
                    return
                detail = exc.details() if hasattr(exc, "details") else str(exc)
                code = exc.code().name if hasattr(exc, "code") else "error"
                if code == "UNAUTHENTICATED":
                    self._fail(_errors.PolicyError(f"worker {self.worker!r} at {self.address}: {detail}"))
                    return
                cause = WorkerUnreachableError(
                    f"worker {self.worker!r} at {self.address}: connection lost ({code}: {detail})"
                )
            except Exception as exc:  # a malformed reply: the worker is not speaking our protocol
                self._fail(WorkerError(f"worker {self.worker!r} at {self.address}: bad reply: {exc}"))
                return
            else:
                if self.closed:
                    return
                cause = WorkerUnreachableError(f"worker {self.worker!r} at {self.address} closed the session")
            call = self._resume(cause)

    def _on_progress(self, reply: Reply, nbytes: int) -> None:
        with self._lock:
            pending = self._pending.get(reply.seq)
        if pending is not None and pending.skip > 0:  # re-sent after a resume: had it already
            pending.skip -= 1
            self.counters.record(self.worker, "recv", "resent", nbytes)
            return
        self.counters.record(self.worker, "recv", "control", nbytes)
        if pending is not None:
            pending.progress += 1
        if pending is not None and pending.handle is not None:
            pending.handle.add_losses(losses_from_result(reply_result(reply)))

    def _on_part(self, reply: Reply, nbytes: int) -> None:
        with self._lock:
            pending = self._pending.get(reply.seq)
        if pending is not None and pending.skip_parts > 0:
            pending.skip_parts -= 1
            self.counters.record(self.worker, "recv", "resent", nbytes)
            return
        if pending is not None:
            if sum(map(len, pending.parts)) + sum(map(len, reply.blobs)) > self.limits.max_blob_bytes:
                raise WorkerError(f"reply to {pending.op!r} exceeds {self.limits.max_blob_bytes} bytes")
            pending.parts.extend(reply.blobs)
        self.counters.record(
            self.worker, "recv", REPLY_KIND.get(pending.op, "control") if pending else "control", nbytes
        )

    def _on_reply(self, reply: Reply, nbytes: int) -> None:
        with self._lock:
            pending = self._pending.pop(reply.seq, None)
            if pending is not None:
                self._acked = max(self._acked, reply.seq)
        if pending is None:  # a reply had already (re-sent after a resume): nothing more to do
            self.counters.record(self.worker, "recv", "resent", nbytes)
            return
        if pending.parts:
            reply = join_parts(reply, pending.parts)
        op = pending.op
        self.counters.record(self.worker, "recv", REPLY_KIND.get(op, "control") if reply.ok else "control", nbytes)
        if reply.transfers:
            self._merge_records(
                LinkTotal(t.src, t.dst, t.kind, t.count, t.nbytes, t.raw_nbytes if t.HasField("raw_nbytes") else None)
                for t in reply.transfers
            )
        with self._lock:
            pending.reply = reply
            if op in ASYNC_OPS and not reply.ok and self.async_error is None:
                self.async_error = error_from_reply(reply, self.worker, self.address)
            pending.event.set()
            self._outstanding -= 1
            self._idle.notify_all()
        if pending.handle is not None:  # after the ledger merge above
            if reply.ok:
                pending.handle.finish(epoch_report_from_result(reply_result(reply), self.worker))
            else:
                pending.handle.fail(error_from_reply(reply, self.worker, self.address))

    def _fail(self, exc: Exception) -> None:
        with self._lock:
            self.broken = exc
            handles = [p.handle for p in self._pending.values() if p.handle is not None]
            for p in self._pending.values():
                p.event.set()
            self._pending.clear()
            self._outstanding = 0
            self._idle.notify_all()
        for handle in handles:
            handle.fail(exc)
