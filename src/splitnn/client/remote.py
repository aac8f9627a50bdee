"""RemoteWorker: the researcher's handle on a party that runs ``splitnn worker``.

``splitnn.connect("grpc://10.0.0.5:7001", token=...)`` returns a :class:`RemoteWorker`,
which implements the :class:`~splitnn.workers.Worker` protocol, so ``SplitNN``,
``fit``, ``evaluate`` and ``collect`` work unchanged across machines.

Control plane only. The researcher sends *commands* (protobuf envelopes) and gets
back losses, metrics, ledger records and -- at ``collect()`` -- weights. Activations
and gradients never pass through this process: a worker that must run on another
party's tensor pulls it from that party over their peer stream
(:mod:`splitnn.server.peers`).

Pipelined commands (the per-op path). All commands to one worker travel on one
ordered gRPC stream and the worker runs them in order. Operations whose result the
researcher does not need right away (``zero_grad``, ``forward``, ``backward``,
``step``, ``put``, ``release``) are *sent without waiting*: their output refs are
chosen here (ids allocated by the client), so the whole chain of a training step is
on the wire to all workers at once, and the workers hand activations and gradients
along peer to peer as soon as each exists. Only calls that return a value (``loss``,
``dataset_stats``, ``probe``, ``get_state``, ...) wait -- and they first wait for
every outstanding command of every worker of the model, so errors surface at a
well-defined point and the ledger is complete there. The per-batch cost is then the
peer hops plus one round trip for the loss, with the same operations, in the same
order, as the eager in-process schedule: the numbers are identical.

Shipped epochs (the faster path). :meth:`RemoteWorker.run_epoch` sends the worker its part
of a whole epoch in one command (:class:`~splitnn.workers.epoch.EpochPlan`); the workers
then train among themselves and this client only collects the label holder's per-batch
losses (progress replies) and each worker's final reply with its ledger records. The
per-batch cost is then the peer hops alone. :mod:`splitnn.split.shipping` drives it.

Optional capabilities. :class:`RemoteWorker` also implements ``send_state`` (weights hand-off
holder to holder over the peer stream), ``average_states`` (SplitFed's aggregation, at the
worker), ``forward_merged``/``backward_merged`` (vertical split
learning), ``get_grads`` (large-batch SGD) and the ``psi_*`` methods (private set intersection:
each message is pulled by the other party over the peer stream; this client relays handles and
gets sizes), with the semantics of ``VirtualWorker``, so the topologies, baselines and the PSI
alignment of :mod:`splitnn.training` run across processes unchanged.

Sessions. Everything this client creates at the worker (segments, placed datasets,
intermediate tensors) belongs to its *session* there, named by a secret random id the worker
issues when the client connects (:attr:`RemoteWorker.session`) and sent with every call: no other
session can read, replace or remove it, and when the connection ends the worker frees
the tensors at once and the rest after its grace period, within which a client connecting
with that id (``session=``) resumes it (see :mod:`splitnn.server.sessions`). An id the worker did
not issue, or whose session ended, is refused (:class:`SessionNotFound`).

Threads. One :class:`RemoteWorker` may be called from several threads (SplitFed drives each
data holder from a thread of its own): every public method runs holding the worker's lock, so
concurrent callers take turns, each call whole; the command stream underneath locks its send
buffer too, because a synchronous call on one worker flushes and drains its peers' streams,
which their own threads may be writing to at that moment. A call's position in the worker's
command order is the order in which callers got the lock: callers whose order matters (v2's
one top segment) must agree on it themselves (:mod:`splitnn.training.topologies.lanes`).

Why a synchronous client. ``SplitNN`` and the training loops are synchronous, so the
client uses grpcio's blocking API with one reader thread per worker that collects
replies; no event loop has to be hosted inside the user's program. That plumbing (the
ordered stream, coalescing, the reply reader) is :mod:`splitnn.client.command_stream`;
this module holds the Worker-protocol methods on top of it.
"""

from __future__ import annotations

import functools
import itertools
import json
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
import torch
from torch import nn

from splitnn import errors as _errors
from splitnn.accounting import RESEARCHER, Ledger
from splitnn.client.channels import open_channel, parse_address
from splitnn.client.command_stream import CommandStream
from splitnn.common import serde
from splitnn.common.messages import (
    check_session_id,
    error_from_reply,
    reply_result,
    session_tag,
)
from splitnn.data.sources import check_ids
from splitnn.errors import ConfigurationError, WireError, WorkerError
from splitnn.transport.addresses import join_host_port, split_host_port
from splitnn.transport.counters import ByteCounters
from splitnn.transport.limits import Limits
from splitnn.transport.security import SESSION_KEY, TLSConfig, call_metadata, check_token_text
from splitnn.wire.compress import get_codec
from splitnn.wire.optim_spec import OptimizerSpec
from splitnn.wire.proto import CALL, Command, Reply
from splitnn.wire.spec import module_to_spec, spec_to_module
from splitnn.wire.trust import Trust, imported_modules
from splitnn.workers.base import OptimizerLike, Worker
from splitnn.workers.checks import (
    check_averaging,
    check_dataset_parts,
    check_segment,
    check_sources,
    no_training_forward,
    unreachable,
)
from splitnn.workers.epoch import EpochHandle, EpochPlan
from splitnn.workers.held import check_finite_features
from splitnn.workers.losses import LOSS_NAMES
from splitnn.workers.merge import check_merge
from splitnn.workers.refs import BatchRef, DatasetStats, LossStats, TensorRef
from splitnn.workers.values import ProbeShape, Value, check_values

__all__ = ["RemoteWorker", "connect", "parse_address"]


def _serialized(method):
    """Run ``method`` holding the worker's lock: concurrent callers take turns (see "Threads")."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class SessionNotFound(WorkerError):
    """The worker holds no session with the id given: it ended, expired or the worker restarted, or the worker never
    issued it (session ids are issued by the worker)."""


class RemoteWorker:
    """A party reached over gRPC. Implements the :class:`~splitnn.workers.Worker` protocol.

    Use :func:`splitnn.connect`. Args:
        address: ``grpc://host:port``.
        token: the federation token.
        name: the party name you expect; checked against the worker's own (and, with
            TLS, against its certificate). Default: whatever the worker says.
        timeout: seconds to wait for any answer before failing with a
            :class:`WorkerError` naming the worker.
        tls: this researcher's certificate, key and the federation CA.
        limits: message size limits (must fit the worker's).
        session: the id of a session the worker issued to an earlier connection (its :attr:`session`; keep it
            secret: whoever presents it acts as the session), to resume that session within the worker's grace
            period (:class:`SessionNotFound` when the worker no longer holds it). Default: the worker issues
            a new session (:attr:`session`).
        retries: attempts to resume the command stream when its connection breaks (settable; 0: a broken
            connection fails at once). Within the worker's grace period a resumed stream loses and repeats
            no command: the worker runs what it received once and re-sends the replies that were lost.
    """

    def __init__(
        self,
        address: str,
        *,
        token: str,
        name: str | None = None,
        timeout: float = 60.0,
        tls: TLSConfig | None = None,
        limits: Limits | None = None,
        ledger: Ledger | None = None,
        connect_timeout: float | None = None,
        session: str | None = None,
        retries: int = 3,
    ) -> None:
        self.address = parse_address(address)
        self.url = f"grpc://{self.address}"
        self._lock = threading.RLock()  # one caller at a time (see "Threads" in the module docstring)
        self._token = check_token_text(token)
        self._stream: CommandStream | None = None
        self.timeout = timeout
        self.retries = retries
        self.limits = limits or Limits()
        self.ledger = ledger if ledger is not None else Ledger()
        self.counters = ByteCounters()
        try:
            #: the id of this client's session at the worker, as the worker issued it (a secret)
            self.session: str | None = check_session_id(session) if session is not None else None
        except _errors.WireError as exc:
            raise ConfigurationError(str(exc)) from None
        self.session_tag = session_tag(self.session) if self.session is not None else None
        self._metadata = call_metadata(self._token, RESEARCHER, session=self.session)
        self._tls, self._connect_timeout = tls, connect_timeout
        self._target_name = name or split_host_port(self.address, "a worker address")[0]
        self.name = "?"
        # Tensor ids are chosen here; start at a random point so that two sessions with one worker
        # (a reconnecting researcher, a second model) do not pick the same ids.
        self._ids = itertools.count(1 + secrets.randbits(40))
        self._peers: dict[str, Worker] = {}
        self._input_is_data: dict[str, bool] = {}
        self._merged: dict[str, int] = {}  # segment key -> sources of its last training forward_merged
        self._feature_ids: set[int] = set()
        self._imports: set[str] = set()  # modules of the classes our segment specs import (we trust our own)
        # What this session installed at the worker, in order (op, name) -> (args, blobs): what a
        # reconnection installs again when the worker restarted (reconnect).
        self._installed: dict[tuple[str, str], tuple[dict, list[bytes]]] = {}
        self._closed = False
        self._resumed = 0  # resumes of the streams before the current one
        hello = self._connect()
        if name is not None and hello.name != name:
            self._channel.close()
            raise ConfigurationError(f"the worker at {self.address} is {hello.name!r}, not {name!r}")
        self.name = hello.name
        #: where the party computes, as it reports it (``splitnn worker --device``); informational
        self.device = hello.device
        self.data_address = self._data_address(hello)
        self._open_stream()

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

    def __repr__(self) -> str:
        return f"RemoteWorker({self.name!r}, {self.url})"

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

    # -- plumbing -------------------------------------------------------------------------
    def _unary(self, op: str, args: dict, *, metadata: tuple | None = None):
        """One unary call: its result; with ``metadata`` (instead of the session's), its result and the trailing
        metadata."""
        data = Command(seq=0, op=op, args_json=json.dumps(args)).SerializeToString()
        self.counters.record(self.name, "sent", "control", len(data))
        try:
            raw, call = self._channel.unary_unary(CALL, request_serializer=None, response_deserializer=None).with_call(
                data, metadata=metadata or self._metadata, timeout=self.timeout
            )
        except grpc.RpcError as exc:
            self._channel.close()
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise _errors.PolicyError(f"worker at {self.address} rejected us: {exc.details()}") from None
            if code == grpc.StatusCode.NOT_FOUND:
                raise SessionNotFound(f"worker at {self.address}: {exc.details()}") from None
            if code == grpc.StatusCode.PERMISSION_DENIED:
                raise _errors.PolicyError(f"worker at {self.address}: {exc.details()}") from None
            cls = _errors.WorkerUnreachableError if code == grpc.StatusCode.UNAVAILABLE else WorkerError
            raise cls(f"worker at {self.address}: {op} failed: {exc.details() if code else exc}") from None
        self.counters.record(self.name, "recv", "control", len(raw))
        reply = Reply.FromString(raw)
        if not reply.ok:
            raise error_from_reply(reply, self.name, self.address)
        if metadata is not None:
            return reply_result(reply), tuple(call.trailing_metadata() or ())
        return reply_result(reply)

    def _send(
        self, op: str, args: dict, blobs: list[bytes] = (), *, flush: bool = True, handle: EpochHandle | None = None
    ) -> None:
        """Queue a command (see :meth:`CommandStream.send`); nobody waits for its answer here."""
        self._stream.send(op, args, blobs, flush=flush, handle=handle)

    @_serialized
    def drain(self) -> None:
        """Send what is queued, wait until every command is answered; raise the first error."""
        self._stream.drain()

    @_serialized
    def flush(self) -> None:
        """Put the commands queued for this worker on the wire now, without waiting for their answers.

        Pipelined commands (``forward``, ``zero_grad``, ...) otherwise wait in a buffer for the next
        flushing call; a caller that wants the worker busy while it does something else flushes.
        """
        self._stream.flush()

    def _request(self, op: str, args: dict, blobs: list[bytes] = ()) -> tuple[dict, list[bytes]]:
        """Send a command and wait for its answer (after every worker of the model is idle)."""
        for peer in self._remote_peers():  # (their streams, not their locks: another thread may be using them)
            peer._stream.flush()  # what this command waits on may still be queued at a peer
        reply = self._stream.wait(self._stream.send(op, args, blobs))
        for peer in self._remote_peers():
            peer._stream.drain()
        self.drain()
        if not reply.ok:
            raise error_from_reply(reply, self.name, self.address)
        return reply_result(reply), list(reply.blobs)

    def _remote_peers(self) -> list[RemoteWorker]:
        return [p for p in self._peers.values() if isinstance(p, RemoteWorker) and p is not self]

    def _new_ref(self) -> TensorRef:
        return TensorRef(self.name, next(self._ids))

    # -- Worker protocol -------------------------------------------------------------------------
    @_serialized
    def connect_peers(self, peers: Mapping[str, Worker]) -> None:
        self._peers.update({n: w for n, w in peers.items() if n != self.name})
        addresses = self._peer_addresses(peers)
        others = [n for n, w in peers.items() if not isinstance(w, RemoteWorker) and n != self.name]
        if others:
            raise ConfigurationError(
                f"remote worker {self.name!r} cannot exchange tensors with in-process "
                f"worker(s) {others}; make every worker of a model remote (splitnn.connect)"
            )
        args = serde.peers_to_args(addresses)
        self._request("peers", args)
        self._installed.pop(("peers", ""), None)
        self._installed[("peers", "")] = (args, [])

    def _peer_addresses(self, peers: Mapping[str, Worker]) -> dict[str, serde.PeerAddress]:
        # each peer's address and the tag of our session there: the worker pulls from (and pushes to)
        # that session only, and the peer hands its tensors only to the parties our session names
        return {
            n: serde.PeerAddress(w.address, w.session_tag, w.data_address)
            for n, w in peers.items()
            if isinstance(w, RemoteWorker) and n != self.name
        }

    @_serialized
    def add_segment(
        self, key: str, segment: nn.Module, optimizer: OptimizerLike | None, *, replace: bool = False
    ) -> None:
        check_segment(segment, key, self.name)
        if optimizer is not None and callable(optimizer) and not isinstance(optimizer, (str, OptimizerSpec)):
            raise ConfigurationError(
                f"remote worker {self.name!r} cannot take an optimizer factory (code does not cross the wire); "
                f"give a spec such as optimizer='sgd:lr=0.03' or splitnn.wire.OptimizerSpec('adam', lr=1e-3)"
            )
        opt = OptimizerSpec.coerce(optimizer) if optimizer is not None else None
        described = module_to_spec(segment)
        args, blobs = serde.add_segment_to_command(key, described, segment.state_dict(), opt, replace=replace)
        self._request("add_segment", args, blobs)
        self._imports |= imported_modules(described)
        self._installed.pop(("add_segment", key), None)
        self._installed[("add_segment", key)] = ({**args, "replace": True}, blobs)

    @_serialized
    def remove_segment(self, key: str) -> None:
        self._send("remove_segment", serde.key_to_args(key))
        self._installed.pop(("add_segment", key), None)
        self._installed.pop(("set_codecs", key), None)

    @_serialized
    def add_dataset(
        self,
        name: str,
        *,
        features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        ids: Sequence[str] | None = None,
        replace: bool = False,
        allow_nonfinite: bool = False,
    ) -> None:
        check_dataset_parts(name, self.name, features=features, labels=labels)
        parts = {p: t for p, t in (("features", features), ("labels", labels)) if t is not None}
        for part, value in parts.items():
            if not isinstance(value, torch.Tensor):
                raise ConfigurationError(
                    f"dataset {name!r}: the {part} for remote worker {self.name!r} are a {type(value).__name__}; "
                    f"only tensors travel (no code or pickles on the wire): let the party build its dataset "
                    f"itself with `splitnn worker --data {name}=MODULE:FUNCTION --trust MODULE`"
                )
        if ids is not None:  # the same check (and words) as in process, before anything is sent
            ids = check_ids(ids, len(next(iter(parts.values()))), f"dataset {name!r} at worker {self.name!r}")
        if not allow_nonfinite and isinstance(features, torch.Tensor):  # refused here too, before any byte is sent
            check_finite_features(features, f"dataset {name!r} for worker {self.name!r}")
        args, blobs = serde.add_dataset_to_command(
            name, parts, replace=replace, ids=ids, allow_nonfinite=allow_nonfinite
        )
        self._request("add_dataset", args, blobs)
        self._installed.pop(("add_dataset", name), None)
        self._installed[("add_dataset", name)] = ({**args, "replace": True}, blobs)

    @_serialized
    def dataset_stats(self, name: str) -> DatasetStats:
        r, _ = self._request("dataset_stats", serde.dataset_name_to_args(name))
        return serde.dataset_stats_from_result(r)

    @_serialized
    def probe(self, key: str, input_shape: ProbeShape) -> ProbeShape:
        r, _ = self._request("probe", serde.probe_to_args(key, input_shape))
        return serde.shape_from_result(r)

    @_serialized
    def set_codecs(self, key: str, *, output: str | None = None, input_grad: str | None = None) -> None:
        """Compress what segment ``key`` sends to the other parties (:class:`~splitnn.workers.CodecWorker`): the
        worker encodes its output activations with ``output`` and its input's gradient with ``input_grad``;
        the encoders' state (error feedback) lives there, at the sender."""
        output, input_grad = (get_codec(c).spec for c in (output, input_grad))  # ConfigurationError before sending
        args = serde.set_codecs_to_args(key, output, input_grad)
        self._request("set_codecs", args)
        self._installed[("set_codecs", key)] = (args, [])  # a restarted worker gets its codecs again

    @_serialized
    def put(self, tensor: Value, *, src: str, kind: str) -> TensorRef:
        if not isinstance(tensor, torch.Tensor):  # several values: a model that takes a tuple
            tensor = check_values(tensor, f"the {kind} put at {self.name!r}")
        if src != RESEARCHER or kind != "features":
            raise WorkerError(f"remote worker {self.name!r} only accepts features put by the researcher")
        ref = self._new_ref()
        self._send("put", *serde.put_to_command(ref.id, kind, tensor), flush=False)
        self._feature_ids.add(ref.id)
        return ref

    @_serialized
    def forward(self, key: str, source: TensorRef | BatchRef, *, train: bool = True) -> TensorRef:
        ref = self._new_ref()
        args, blobs = serde.forward_to_command(key, source, ref.id, train=train)
        if isinstance(source, BatchRef):
            is_data = True
        else:
            is_data = source.owner == self.name and source.id in self._feature_ids
            self._feature_ids.discard(source.id) if source.owner == self.name else None
        if train:
            self._input_is_data[key] = is_data
        self._send("forward", args, blobs, flush=False)
        return ref

    @_serialized
    def loss(
        self, output: TensorRef, target: BatchRef, loss: str, *, train: bool = True, keep: str | None = None
    ) -> LossStats:
        if not isinstance(loss, str):
            raise ConfigurationError(
                f"remote worker {self.name!r} takes losses by name only (code does not cross the wire); "
                f"give one of {LOSS_NAMES}"
            )
        r, _ = self._request("loss", *serde.loss_to_command(output, target, loss, train=train, keep=keep))
        return serde.loss_stats_from_result(r)

    @_serialized
    def loss_deferred(
        self, output: TensorRef, target: BatchRef, loss: str, *, train: bool = True, keep: str | None = None
    ) -> Callable[[], LossStats]:
        """:meth:`loss`, sent without waiting: call the function returned for the stats (it waits for them).

        The worker runs the loss in its command order, so the ``backward`` that uses it may be sent
        before the stats are back; a caller serving several data holders then lets the next one's
        commands queue at the worker instead of waiting a round trip per batch (SplitFed does).
        Unlike :meth:`loss`, it does not wait for the other workers' commands.
        """
        if not isinstance(loss, str):
            raise ConfigurationError(
                f"remote worker {self.name!r} takes losses by name only (code does not cross the wire); "
                f"give one of {LOSS_NAMES}"
            )
        args, blobs = serde.loss_to_command(output, target, loss, train=train, keep=keep)
        for peer in self._remote_peers():
            peer._stream.flush()  # the output may come from a peer's command still queued here
        pending = self._stream.send("loss", args, blobs)

        def stats() -> LossStats:
            reply = self._stream.wait(pending)
            if not reply.ok:
                raise error_from_reply(reply, self.name, self.address)
            return serde.loss_stats_from_result(reply_result(reply))

        return stats

    @_serialized
    def metrics(self, keep: str, names: Sequence[str]) -> dict[str, float]:
        """Metrics over the outputs the worker kept under ``keep`` (:class:`~splitnn.workers.MetricWorker`);
        only the values come back."""
        r, _ = self._request("metrics", serde.metrics_to_args(keep, names))
        return serde.metrics_from_result(r, names)

    @_serialized
    def backward(self, key: str, grad: TensorRef | None) -> TensorRef | None:
        if key not in self._input_is_data:
            raise no_training_forward(self.name, key)
        ref = None if self._input_is_data.pop(key) else self._new_ref()
        self._send("backward", serde.backward_to_args(key, grad, ref.id if ref is not None else None), flush=False)
        return ref

    @_serialized
    def zero_grad(self, key: str) -> None:
        self._send("zero_grad", serde.key_to_args(key), flush=False)

    @_serialized
    def step(self, key: str) -> None:
        self._send("step", serde.key_to_args(key))  # a step ends this worker's part of a training step: flush

    @_serialized
    def fetch(self, ref: TensorRef, *, kind: str = "output") -> Value:
        r, blobs = self._request("fetch", serde.fetch_to_args(ref, kind))
        return serde.fetch_from_result(r, blobs, max_bytes=self.limits.max_tensor_bytes)

    @_serialized
    def get_state(self, key: str) -> dict[str, torch.Tensor]:
        _, blobs = self._request("get_state", serde.key_to_args(key))
        # in the worker's key order
        return serde.state_from_blob(serde.blob_arg(blobs, 0, "state"), max_bytes=self.limits.max_blob_bytes)

    @_serialized
    def set_state(self, key: str, state: Mapping[str, torch.Tensor], *, src: str) -> None:
        if src != RESEARCHER:
            raise WorkerError(f"remote worker {self.name!r} only accepts weights sent by the researcher")
        self._request("set_state", *serde.set_state_to_command(key, state))

    @_serialized
    def fetch_segment(self, key: str) -> nn.Module:
        _, blobs = self._request("fetch_segment", serde.key_to_args(key))
        spec, state = serde.segment_from_blobs(blobs, max_bytes=self.limits.max_blob_bytes)
        # imports only from the modules of classes we sent ourselves
        module = spec_to_module(spec, trust=Trust(sorted(self._imports)))
        module.load_state_dict(state)
        return module

    @_serialized
    def release(self) -> None:
        self._input_is_data.clear()
        self._merged.clear()
        self._feature_ids.clear()
        self._send("release", {})

    # -- optional capabilities (the topologies and baselines of splitnn.training) -----------------
    @_serialized
    def send_state(self, key: str, dst: str, *, dst_key: str | None = None) -> None:
        """Hand segment ``key``'s weights straight to peer ``dst`` (:class:`~splitnn.workers.PeerStateWorker`).

        Two pipelined commands: this worker snapshots the weights (safetensors) in its command
        order, i.e. after everything sent to it before; ``dst`` pulls them over the two workers'
        peer stream, loads them into ``dst_key`` (default ``key``) in *its* command order and
        records them as ``weights`` on the link self -> ``dst``. The researcher never holds them.
        Errors surface at the next synchronous call, like those of ``forward``.
        """
        target = self if dst == self.name else self._peers.get(dst)
        if target is None:
            raise unreachable(self.name, dst)
        if not isinstance(target, RemoteWorker):
            raise WorkerError(f"remote worker {self.name!r} cannot send weights to in-process worker {dst!r}")
        ref = self._new_ref()
        self._send("export_state", serde.export_state_to_args(key, ref.id))  # flushed: the puller may be waiting for it
        target._send("load_state", serde.load_state_to_args(dst_key or key, ref), flush=False)

    @_serialized
    def average_states(self, keys: Sequence[str], weights: Sequence[float], *, into: Sequence[str]) -> None:
        """Load the weighted average of segments ``keys`` into every segment of ``into``, at the worker
        (:class:`~splitnn.workers.AveragingWorker`; SplitFed's aggregation).

        Only the keys and weights travel; the worker averages segments it hosts, so nothing is
        recorded. Waits for the answer (after the weights sent to it before, e.g. by
        :meth:`send_state`, are loaded), so a bad key, weight or shape is raised here.
        """
        keys, weights, into = check_averaging(keys, weights, into, self.name)
        self._request("average_states", serde.average_states_to_args(keys, weights, into))

    @_serialized
    def forward_merged(self, key: str, sources: Sequence[TensorRef], merge: str, *, train: bool = True) -> TensorRef:
        """Run segment ``key`` on the merge of several parties' activations (:class:`~splitnn.workers.MergingWorker`).

        The worker pulls every source from its owner over their peer stream (recorded on each link).
        """
        check_merge(merge)
        sources = check_sources(list(sources), key, self.name)
        ref = self._new_ref()
        for src in sources:
            if src.owner == self.name:
                self._feature_ids.discard(src.id)
        if train:
            self._merged[key] = len(sources)
            self._input_is_data.pop(key, None)
        args = serde.forward_merged_to_args(key, sources, merge, ref.id, train=train)
        self._send("forward_merged", args, flush=False)
        return ref

    @_serialized
    def backward_merged(self, key: str, grad: TensorRef | None) -> list[TensorRef]:
        """Back-propagate through segment ``key`` and its merge; one gradient ref per source, in order."""
        count = self._merged.pop(key, None)
        if count is None:
            raise no_training_forward(self.name, key, merged=True)
        refs = [self._new_ref() for _ in range(count)]
        self._send("backward_merged", serde.backward_merged_to_args(key, grad, [r.id for r in refs]), flush=False)
        return refs

    @_serialized
    def grad_norms(self, key: str) -> torch.Tensor:
        """The 2-norm of each gradient of segment ``key``'s trainable parameters, for clipping by the global norm
        across parties (:func:`splitnn.split.driver.clip_global_norm`): one number per tensor, never a gradient."""
        _, blobs = self._request("grad_norms", serde.key_to_args(key))
        norms = serde.tensor_from_blob(
            serde.blob_arg(blobs, 0, "gradient norms"), max_bytes=self.limits.max_tensor_bytes
        )
        if norms.dim() != 1 or not norms.is_floating_point():
            raise WireError(f"worker {self.name!r} sent gradient norms of shape {tuple(norms.shape)}, not a vector")
        return norms

    @_serialized
    def clip_grads(self, key: str, max_norm: float, total_norm: torch.Tensor) -> None:
        """Scale segment ``key``'s gradients for the global ``total_norm`` (``clip_grads_with_norm_``)."""
        args = {**serde.key_to_args(key), "max_norm": float(max_norm)}
        self._send("clip_grads", args, [serde.tensor_to_blob(total_norm.detach().cpu())], flush=False)

    @_serialized
    def get_grads(self, key: str) -> dict[str, torch.Tensor]:
        """Gradients of segment ``key``'s parameters (:class:`~splitnn.workers.GradientWorker`): safetensors,
        recorded as ``gradient`` bytes from this worker to the researcher."""
        _, blobs = self._request("get_grads", serde.key_to_args(key))
        # in the worker's key order
        return serde.state_from_blob(serde.blob_arg(blobs, 0, "gradients"), max_bytes=self.limits.max_blob_bytes)

    # -- private set intersection (PsiWorker; the protocol: splitnn.training.psi) ---------------
    # Messages stay between the two parties: the receiver pulls the sender's message over their peer
    # stream (kind "psi") and records it on that link. The researcher sends only handles and learns sizes.
    @_serialized
    def psi_request(self, session: str, dataset: str) -> TensorRef:
        """Open PSI ``session`` as the client over ``dataset``'s candidate ids; a ref to the request (pipelined)."""
        ref = self._new_ref()
        self._send("psi_request", serde.psi_request_to_args(session, dataset, ref.id))  # flushed: a peer pulls it
        return ref

    @_serialized
    def psi_reply(self, dataset: str, request: TensorRef) -> TensorRef:
        """Pull a client's request from its owner and answer it as the PSI server; a ref to the reply (pipelined)."""
        ref = self._new_ref()
        self._send("psi_reply", serde.psi_reply_to_args(dataset, request, ref.id))
        return ref

    @_serialized
    def psi_finish(self, session: str, reply: TensorRef) -> None:
        """Pull the server's reply and narrow the candidates of the session's dataset (pipelined)."""
        self._send("psi_finish", serde.psi_finish_to_args(session, reply))

    @_serialized
    def psi_size(self, dataset: str) -> int:
        """The number of candidate rows of ``dataset`` (waits for the intersections sent before)."""
        r, _ = self._request("psi_size", serde.dataset_name_to_args(dataset))
        return serde.psi_size_from_result(r)

    @_serialized
    def psi_apply(self, dataset: str, parts: Mapping[str, torch.Tensor] | None = None) -> None:
        """Keep exactly the candidate rows of ``dataset``, in ascending id order, and hold each of ``parts``
        (name -> positions in that order); at the worker this changes this session's datasets only."""
        self._request("psi_apply", *serde.psi_apply_to_command(dataset, dict(parts or {})))

    @_serialized
    def psi_cancel(self, dataset: str) -> None:
        """Abandon the intersection of ``dataset`` (the held rows stay as they were).

        Called when an intersection failed: the errors its pipelined commands left at this worker
        belong to that failure (the caller is already raising it), so they are dropped here, and a
        later intersection starts clean.
        """
        for worker in (self, *self._remote_peers()):  # _request below would raise the peers' echoes too
            try:
                worker._stream.drain()
            except Exception:  # that failure's echo at this worker (a pull that could not be served, ...)
                pass
        self._request("psi_cancel", serde.dataset_name_to_args(dataset))

    # -- shipped epochs (EpochWorker) -----------------------------------------------------------
    @_serialized
    def run_epoch(self, plan: EpochPlan, *, notify=None) -> EpochHandle:
        """Ship this worker's part of a training epoch; return a handle that fills as it runs.

        The worker trains every batch with its peers (see :mod:`splitnn.workers.epoch`); the
        label holder's handle receives per-batch losses; each handle gets the worker's final
        report after its ledger records are merged into :attr:`ledger`, or the error (a lost
        connection fails it at once).
        """
        handle = EpochHandle(self.name, notify)
        self._send("run_epoch", *serde.epoch_plan_to_command(plan), handle=handle)
        return handle

    # -- policy, checkpoints and faults --------------------------------------------------------
    @_serialized
    def declare_neighbours(self, names: Sequence[str]) -> None:
        """Tell the worker which parties are adjacent to it in the model: without a ``peers`` rule in its
        policy, only they may pull this session's tensors there."""
        args = serde.neighbours_to_args(names)
        self._request("neighbours", args)
        self._installed.pop(("neighbours", ""), None)
        self._installed[("neighbours", "")] = (args, [])

    @_serialized
    def checkpoint_steps(self, job: str) -> list[int]:
        """The steps of ``job`` the party holds checkpoints of, in its ``--state-dir`` (:class:`CheckpointWorker`)."""
        r, _ = self._request("checkpoint_steps", serde.checkpoint_steps_to_args(job))
        return serde.steps_from_result(r)

    @_serialized
    def save_checkpoint(
        self, job: str, step: int, segments: Mapping[str, str], *, note: Mapping[str, object] | None = None
    ) -> dict:
        """Have the party write its checkpoint of ``segments`` (label -> key) locally; only its digest comes back."""
        r, _ = self._request("save_checkpoint", serde.checkpoint_to_args(job, step, segments, note=note))
        return serde.party_checkpoint_from_result(r)

    @_serialized
    def load_checkpoint(self, job: str, step: int, segments: Mapping[str, str], *, digest: str | None = None) -> dict:
        """Have the party load its checkpoint of ``segments`` at ``step`` (refused when it does not match them,
        or -- given ``digest`` -- is not that file)."""
        r, _ = self._request("load_checkpoint", serde.checkpoint_to_args(job, step, segments, digest=digest))
        self._input_is_data.clear()
        self._merged.clear()
        self._feature_ids.clear()
        return serde.party_checkpoint_from_result(r)

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

    # -- extras ------------------------------------------------------------------------------
    @_serialized
    def stats(self) -> dict[str, Any]:
        """The worker's own wire byte counters and ledger (``{"counters": rows, "ledger": rows}``)."""
        return serde.stats_from_result(self._request("stats", {})[0])

    def close(self, *, end_session: bool = False) -> None:
        """Close the connection (the worker keeps running).

        The worker frees this session's intermediate tensors at once and keeps its segments and
        placed datasets for its grace period (``splitnn worker --session-grace``), for a
        connection with the same ``session`` id to resume. With ``end_session``, it frees
        everything now instead.
        """
        if self._closed:
            return
        if end_session:
            try:
                self._send("end_session", {})
            except Exception:  # a broken connection: the worker frees the session when its grace ends
                pass
        self._closed = True
        self._stream.close()
        self._channel.close()

    def __enter__(self) -> RemoteWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    url: str,
    *,
    token: str,
    name: str | None = None,
    timeout: float = 60.0,
    tls: TLSConfig | None = None,
    limits: Limits | None = None,
    session: str | None = None,
    retries: int = 3,
) -> RemoteWorker:
    """Connect to a party started with ``splitnn worker`` and return it as a Worker.

    What this connection creates at the worker belongs to its session there: a new one the worker
    issues (:attr:`RemoteWorker.session`), or, given an earlier connection's :attr:`RemoteWorker.session`
    as ``session``, that one, resumed within the worker's grace period. A connection that breaks is
    resumed by itself, up to ``retries`` attempts, with no command lost or run twice (``fit(retries=N)``
    sets it for a run).
    See :class:`RemoteWorker`.

    >>> bob = splitnn.connect("grpc://127.0.0.1:7002", token=open("TOKEN").read().strip())  # doctest: +SKIP

    Raises :class:`WorkerError` naming the address when nothing answers there,
    :class:`PolicyError` when the worker rejects the token or certificate (or ``session`` is another
    researcher's), :class:`SessionNotFound` when it holds no session ``session``, and
    :class:`ConfigurationError` when ``name`` is given and the worker is someone else.
    """
    return RemoteWorker(
        url, token=token, name=name, timeout=timeout, tls=tls, limits=limits, session=session, retries=retries
    )
