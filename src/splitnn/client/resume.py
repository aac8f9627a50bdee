"""Resuming a broken command stream: the part of :class:`~splitnn.client.command_stream.CommandStream` that
reconnects, names the stream again, and re-sends what the worker did not receive (protocol:
:mod:`splitnn.server.replay`)."""

from __future__ import annotations

import logging
import queue
import threading

import grpc
from google.protobuf.message import DecodeError

from splitnn.common.messages import reply_result
from splitnn.errors import WorkerError, WorkerUnreachableError
from splitnn.wire.proto import Command, Reply

log = logging.getLogger("splitnn.client")

#: Seconds the first attempt to resume a broken stream waits for the connection; doubled per attempt.
RESUME_WAIT = 1.0
RESUME_MAX_WAIT = 30.0


class Resumption:
    """Resumes :class:`~splitnn.client.command_stream.CommandStream`'s broken call. Uses the stream's state:
    ``_channel``, ``_metadata``, ``_lock``, ``_queue``, ``_stream``, ``_pending``, ``_acked``, ``_resuming``,
    ``retries``, ``timeout``, ``counters``, ``resumed``, ``closed``, ``broken``, and its ``_open``/``_fail``.

    A broken stream is resumed (:mod:`splitnn.server.replay`): the client keeps every message until
    its final reply arrives, opens a new call naming the same stream (``x-splitnn-stream``), sends a
    ``resume`` command carrying the highest seq whose final reply it received, learns the highest seq
    the worker received, and re-sends exactly the messages after it, in order; the worker re-sends the
    replies the client missed and runs nothing twice. Commands and training steps go on as if nothing
    happened. Only when ``retries`` attempts fail -- the worker is gone, or restarted and knows no
    such stream -- does the stream fail everything pending at once
    (:class:`~splitnn.errors.WorkerUnreachableError`), for :func:`splitnn.split.fit.fit` to fall back
    to the last checkpoint.
    """

    def _wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the channel to (re)connect; whether it did."""
        ready = threading.Event()

        def watch(state: grpc.ChannelConnectivity) -> None:
            if state is grpc.ChannelConnectivity.READY:
                ready.set()

        self._channel.subscribe(watch, try_to_connect=True)
        try:
            return ready.wait(timeout)
        finally:
            self._channel.unsubscribe(watch)

    def _resume(self, cause: Exception) -> grpc.Call | None:
        """Resume the broken stream on a new call (see :class:`Resumption`); None when it cannot be."""
        with self._lock:
            self._resuming = True
            broken, self._queue = self._queue, queue.SimpleQueue()
        broken.put(None)  # the broken call's request iterator ends
        self._stream.cancel()
        refusal = None
        for attempt in range(self.retries):
            if self.closed:
                break
            log.info("worker %s: resuming the broken stream (attempt %d): %s", self.worker, attempt + 1, cause)
            try:
                outcome = self._resume_once(cause, min(RESUME_WAIT * 2**attempt, RESUME_MAX_WAIT))
            except ValueError as exc:  # the channel was closed meanwhile (RemoteWorker.close or reconnect)
                refusal = str(exc)
                break
            if isinstance(outcome, str):
                refusal = outcome
                continue
            return outcome
        if self.closed:
            self._fail(WorkerError(f"worker {self.worker!r} at {self.address}: connection closed"))
        elif self.broken is None and not self.retries:
            self._fail(cause)
        elif self.broken is None:
            self._fail(
                WorkerUnreachableError(
                    f"{cause}; {self.retries} attempt(s) to resume the stream failed"
                    + (f" ({refusal})" if refusal else "")
                )
            )
        return None

    def _resume_once(self, cause: Exception, wait: float) -> grpc.Call | str | None:
        """One attempt to resume: the new call; a reason to try again; None when the worker refused (failed)."""
        if not self._wait_ready(wait):
            return "cannot reconnect"
        requests: queue.SimpleQueue = queue.SimpleQueue()
        call = self._open(requests, self._metadata)
        hello = Command(seq=0, op="resume", ack=self._acked).SerializeToString()
        self.counters.record(self.worker, "sent", "control", len(hello))
        requests.put(hello)
        timer = threading.Timer(min(self.timeout, 10.0), call.cancel)  # a worker that hangs is not resumed
        timer.start()
        try:
            raw = next(call)
            reply = Reply.FromString(raw)
        except (grpc.RpcError, StopIteration, DecodeError) as exc:
            requests.put(None)
            call.cancel()
            if isinstance(exc, grpc.RpcError) and getattr(exc, "code", lambda: None)() == grpc.StatusCode.NOT_FOUND:
                self._fail(WorkerUnreachableError(f"{cause}; {exc.details()}"))  # the session is gone: no retry
                return None
            return exc.details() if isinstance(exc, grpc.RpcError) else "no answer to resume"
        finally:
            timer.cancel()
        self.counters.record(self.worker, "recv", "control", len(raw))
        if not reply.ok:  # the worker holds no such stream any more: it restarted, or its grace ended
            requests.put(None)
            call.cancel()
            self._fail(WorkerUnreachableError(f"{cause}; {reply.error}"))
            return None
        received = int(reply_result(reply).get("received", 0))
        with self._lock:
            self._queue = requests
            for seq in sorted(self._pending):
                pending = self._pending[seq]
                # the worker re-sends a reply in parts from its first part, a shipped epoch's progress
                # from its first batch: skip what came before the break
                pending.skip_parts = len(pending.parts)
                pending.skip = pending.progress
                if seq > received:
                    requests.put(pending.data)
                    self.counters.record(self.worker, "sent", "resent", len(pending.data))
            self._resuming = False
        self._stream = call
        self.resumed += 1
        log.info("worker %s: stream resumed after #%d", self.worker, received)
        return call
