"""The researcher's connection to one worker: the channel, the hello, the session, the command stream, reconnecting."""

from __future__ import annotations

import grpc

from splitnn import errors as _errors
from splitnn.accounting import RESEARCHER
from splitnn.client.calls import serialized as _serialized
from splitnn.client.channels import open_channel
from splitnn.client.command_stream import CommandStream
from splitnn.common import serde
from splitnn.common.messages import (
    check_session_id,
    error_from_reply,
    session_tag,
)
from splitnn.errors import ConfigurationError, WorkerError
from splitnn.transport.addresses import join_host_port, split_host_port
from splitnn.transport.security import SESSION_KEY, call_metadata


class SessionNotFound(WorkerError):
    """The worker holds no session with the id given: it ended, expired or the worker restarted, or the worker never
    issued it (session ids are issued by the worker)."""


class Connection:
    """Connecting to a worker and resuming its session (a component of :class:`~splitnn.client.RemoteWorker`)."""

    def _data_address(self, hello: serde.Hello) -> str | None:
        """Where the worker's peers reach its TCP data plane: as it says, on the host we reached it at if it
        names none; None: over gRPC."""
        if hello.data is None or not hello.data.startswith(":"):
            return hello.data
        return join_host_port(split_host_port(self.address, "a worker address")[0], int(hello.data[1:]))

    def _connect(self, *, renew: bool = False) -> serde.Hello:
        """Open the channel and say hello: the worker resumes our session, or issues a new one when we hold none
        (or, with ``renew``, when it no longer holds ours: it restarted, or the session expired)."""
        self._channel = open_channel(self.address, limits=self.limits, tls=self._tls, target_name=self._target_name)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=self._connect_timeout or min(self.timeout, 10.0))
        except grpc.FutureTimeoutError:
            self._channel.close()
            raise _errors.WorkerUnreachableError(
                f"cannot connect to worker {self.name if self.name != '?' else ''} at {self.address}: connection "
                f"refused or timed out; is `splitnn worker` running there?".replace("worker  at", "worker at")
            ) from None
        if self.session is not None:
            try:
                return serde.hello_from_result(self._unary("hello", {}))
            except SessionNotFound:
                if not renew:
                    raise
                self._channel = open_channel(
                    self.address, limits=self.limits, tls=self._tls, target_name=self._target_name
                )
        metadata = call_metadata(self._token, RESEARCHER, new_session=True)
        result, trailing = self._unary("hello", {}, metadata=metadata)
        issued = dict(trailing).get(SESSION_KEY)
        try:
            self.session = check_session_id(issued)
        except _errors.WireError:
            self._channel.close()
            raise WorkerError(f"worker at {self.address} issued no valid session id (an older splitnn?)") from None
        self.session_tag = session_tag(self.session)
        self._metadata = call_metadata(self._token, RESEARCHER, session=self.session)
        return serde.hello_from_result(result)

    def _open_stream(self, replaces: str | None = None) -> None:
        self._stream = CommandStream(
            self._channel,
            self._metadata,
            worker=self.name,
            address=self.address,
            timeout=self.timeout,
            limits=self.limits,
            counters=self.counters,
            merge_records=lambda records: self.ledger.merge(records),
            ids=self._ids,
            retries=self._retries,
            replaces=replaces,
        )

    @property
    def timeout(self) -> float:
        """Seconds to wait for any answer before failing with a WorkerError naming the worker (settable)."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0):
            raise ConfigurationError(f"timeout must be a positive number of seconds, got {value!r}")
        self._timeout = float(value)
        if self._stream is not None:
            self._stream.timeout = self._timeout

    @property
    def retries(self) -> int:
        """Attempts to resume the command stream after its connection broke (settable; 0: fail at once)."""
        return self._retries

    @retries.setter
    def retries(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigurationError(f"retries must be a non-negative integer, got {value!r}")
        self._retries = value
        if self._stream is not None:
            self._stream.retries = value

    @property
    def resumed(self) -> int:
        """How many times this connection's command stream broke and was resumed without losing a command."""
        return self._resumed + (self._stream.resumed if self._stream is not None else 0)

    @_serialized
    def reconnect(self) -> bool:
        """Make sure the connection is up after a fault (:class:`~splitnn.workers.ReconnectingWorker`).

        A connection that is still up is kept (an error it holds from the fault is dropped). A broken one
        is made again with the same session id: within the worker's grace period the session is as it
        was (True); when the worker restarted or the session expired, it is a new one, and everything
        this connection installed there -- segments (with their initial weights), placed datasets, peers,
        neighbours -- is installed again, in order (False). Raises
        :class:`~splitnn.errors.WorkerUnreachableError` while the worker cannot be reached.
        """
        if self._closed:
            raise WorkerError(f"worker {self.name!r}: this connection was closed; connect again")
        stream = self._stream
        if stream is not None and stream.broken is None:
            try:
                stream.drain()
                return True
            except _errors.WorkerUnreachableError:
                pass  # it broke meanwhile: connect again
            except WorkerError:
                return True  # the fault's error at this worker (a failed step): dropped
        if stream is not None and not stream.closed:
            stream.close()
            self._resumed += stream.resumed
        self._channel.close()
        before = self.session_tag
        hello = self._connect(renew=True)  # the worker restarted, or the session expired: a new one
        if hello.name != self.name:
            self._channel.close()
            raise ConfigurationError(f"the worker at {self.address} is now {hello.name!r}, not {self.name!r}")
        moved, self.data_address = self.data_address, self._data_address(hello)
        # restarted on another data-plane port, or a new session (its tag is new): the other workers must learn it
        moved = moved != self.data_address or self.session_tag != before
        # the broken stream's commands still queued at the worker must not run after the new stream's
        self._open_stream(replaces=stream.id if stream is not None else None)
        self._input_is_data.clear()
        self._merged.clear()
        self._feature_ids.clear()
        if moved:
            self._tell_peers_where_we_are()
        if hello.session_segments or not any(op == "add_segment" for op, _ in self._installed):
            return True
        # codecs after the segments they belong to (a segment replaced later moved to the end)
        for (op, _), (args, blobs) in sorted(self._installed.items(), key=lambda item: item[0][0] == "set_codecs"):
            reply = self._stream.wait(self._stream.send(op, args, blobs))
            if not reply.ok:
                raise error_from_reply(reply, self.name, self.address)
        return False

    def _tell_peers_where_we_are(self) -> None:
        """Send every peer of our model its ``peers`` again (with our new data-plane address). Best effort: a peer
        that cannot be reached now gets the new address in what its own reconnection installs again."""
        for peer in self._remote_peers():
            if ("peers", "") in peer._installed:
                try:
                    peer.connect_peers(dict(peer._peers))
                except WorkerError:
                    peer._installed[("peers", "")] = (serde.peers_to_args(peer._peer_addresses(peer._peers)), [])
