"""WorkerServer: one party of split learning as a gRPC server (``splitnn worker``).

What it hosts. A worker serves several researchers (or jobs) at once, each in a
*session* of its own (:mod:`splitnn.server.sessions`), named by a secret id the
researcher's client sends with its calls. Each session's segments, optimizers, placed
datasets and intermediate tensors live in an in-process
:class:`~splitnn.workers.VirtualWorker` of its own (its *engine*, ``fuse=False``), so a
networked party runs exactly the kernels, in exactly the order, of an in-process one:
the same seed gives the same weights, bit for bit, and no session sees another's state.
The datasets the party loaded itself (``--data``) are shared, read-only. The server only
adds the network around the engines. This module holds the gRPC service and the
process's lifecycle; the rest of a worker lives beside it:

* :mod:`splitnn.server.sessions` -- who owns what, and when it is freed;
* :mod:`splitnn.server.commands` -- the operations a command may run on a session's engine;
* :mod:`splitnn.server.executor` -- running commands in order, batches, shipped epochs;
* :mod:`splitnn.server.exports` -- the tensors a session produced, by the researcher's id;
* :mod:`splitnn.server.peers` -- the peer streams (pull, push, abort) to other workers, per session;
* :mod:`splitnn.server.tcp_plane` -- the optional TCP listener for peer links (``--data-listen``);
* :mod:`splitnn.common.messages` -- message conventions shared with the researcher's client.

Three RPCs (see ``wire/proto/splitnn.proto``):

* ``Session`` -- one ordered bidirectional stream from the researcher. Each message
  is a protobuf :class:`Command` (the small control envelope; tensors ride inside it
  as validated :mod:`~splitnn.wire.tensor_codec` frames, weights as safetensors);
  each gets a :class:`Reply` carrying the result and the ledger records made since
  the previous reply. Commands run strictly in order, so the researcher may send a
  whole training step without waiting (see :mod:`splitnn.client.remote`). A
  ``run_epoch`` command ships this worker's part of a whole training epoch and is
  answered with progress replies and one final reply. The commands and replies of a
  stream outlive the call that carries them (:mod:`splitnn.server.replay`): when the
  connection breaks, the researcher's client resumes the stream on a new call, and no
  command is lost or run twice.
* ``Peer`` -- a persistent bidirectional stream between two workers, for one session,
  carrying raw frames (:mod:`splitnn.transport.frames`): the data plane. When the
  researcher tells bob to run a segment on alice's activation #7, bob pulls #7 from
  alice over that stream; the researcher never sees the tensor.
* ``Call`` -- a unary version of one command (hello, stats), for tools and probes.

Why asyncio. A worker waits on several things at once: its researcher's commands,
peers pulling the tensors it produced, and its own pulls from peers that may not
have produced them yet. With ``grpc.aio`` these are coroutines on one event loop:
no thread per stream, no locks around the engine (an engine operation never awaits,
so nothing interleaves inside one), and a pull that arrives before its tensor exists
simply awaits a future. The compute itself runs inline on the loop: operations are
milliseconds long, strictly ordered by the training schedule, and a thread hop per
operation would cost more than it saves.

Security. Every RPC must carry the federation token (``UNAUTHENTICATED`` otherwise);
with mutual TLS the caller's certificate must name the party it claims to be.
Malformed, truncated or oversized messages get ``INVALID_ARGUMENT`` (or an error
reply) and the server keeps serving. The engine's policy refuses to hand out raw
features, labels and -- by default on a server -- activations; losses, metrics and
weights (at ``collect()``) are what leaves a worker towards the researcher. Sessions
cannot touch each other's state (``PolicyError``). Connections are bounded by gRPC
server options (:meth:`~splitnn.transport.Limits.server_options`: handshake timeout,
idle and keepalive limits, streams per connection), the number of concurrent RPCs and
the number of sessions, and ``serve`` raises the open-files limit to its hard limit,
so a flood of idle or half-open connections cannot lock researchers out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch
from google.protobuf.message import DecodeError

from splitnn.accounting import RESEARCHER
from splitnn.common.messages import (
    COMMAND_KIND,
    END_STREAM,
    MAX_NAME,
    PROTOCOL_VERSION,
    REPLY_KIND,
    check_party_name,
    check_session_id,
    check_session_tag,
    split_reply,
)
from splitnn.errors import ConfigurationError, PolicyError, WireError, WorkerError
from splitnn.server.commands import MAX_MERGE_SOURCES, Commands
from splitnn.server.executor import Executor
from splitnn.server.exports import StreamState
from splitnn.server.health import Health
from splitnn.server.peers import Peers
from splitnn.server.replay import Replay, ResumeRefused
from splitnn.server.sessions import (
    DEFAULT_GRACE,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_MAX_SESSIONS_PER_RESEARCHER,
    Session,
    Sessions,
    TooManySessions,
    UnknownSession,
)
from splitnn.server.tcp_plane import TcpPlane, check_data_plane
from splitnn.transport.addresses import join_host_port, split_host_port
from splitnn.transport.counters import ByteCounters
from splitnn.transport.limits import Limits, raise_open_files_limit
from splitnn.transport.security import (
    NEW_SESSION_KEY,
    PARTY_KEY,
    PEER_SESSION_KEY,
    REPLACES_KEY,
    SESSION_KEY,
    STREAM_KEY,
    TOKEN_KEY,
    TLSConfig,
    certificate_fingerprint,
    check_token_text,
    peer_identities,
    token_matches,
)
from splitnn.wire.budget import DEFAULT_MAX_SESSION_MEMORY
from splitnn.wire.proto import SERVICE, Command, Reply
from splitnn.wire.trust import Trust
from splitnn.workers.audit import AuditLog
from splitnn.workers.devices import resolve_device
from splitnn.workers.virtual import WorkerPolicy

__all__ = [
    "WorkerServer",
    "ServeConfig",
    "serve",
    "register_known_layers",
    "check_party_name",
    "MAX_NAME",
    "PROTOCOL_VERSION",
    "MAX_MERGE_SOURCES",
]

log = logging.getLogger("splitnn.worker")


#: Seconds :meth:`WorkerServer.stop` gives the open calls when no command runs (they wait for a next command).
IDLE_GRACE = 0.05


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    """gRPC server credentials from a party's TLS material; with a CA, callers must present a certificate."""
    cert, key, ca = tls.read_files()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def register_known_layers() -> None:
    """Teach this process's spec codec every layer type splitnn ships beyond the basic ones.

    The defense layers of :mod:`splitnn.privacy` (``NoPeek``, ``CutNoise``,
    ``LabelProtection``) register their specs when that package is imported; a worker
    imports it at start so that a defended segment can be hosted remotely. Imported
    here, lazily, because ``privacy`` sits beside ``workers`` (it imports them), not below.
    """
    import splitnn.privacy.defenses  # noqa: F401  (registers the defense layer specs)


class _TokenGate(grpc.aio.ServerInterceptor):
    """Refuses a call without a token the worker accepts before gRPC reads its request message.

    A unary call's handler runs only once its whole request message has arrived (up to the
    message limit, 4 MiB), so a token checked there comes after the bytes are buffered: 100
    unauthenticated 4 MiB calls took a worker up by 425 MB, which it kept. The gate looks at the
    call's metadata first and answers a call whose token is wrong with a handler that reads nothing.
    The full checks (party name, certificate) stay in the handlers.
    """

    def __init__(self, server: WorkerServer) -> None:
        self._server = server
        self._refuse = grpc.stream_stream_rpc_method_handler(self._refused)

    def _admits(self, metadata) -> bool:
        md = dict(metadata or ())
        token, party = md.get(TOKEN_KEY), md.get(PARTY_KEY)
        if isinstance(token, str) and token_matches(token, self._server.token):
            return True
        return party == RESEARCHER and self._server._researcher_token(token) is not None

    async def intercept_service(self, continuation, details):
        if self._admits(details.invocation_metadata):
            return await continuation(details)
        return self._refuse  # (request streaming: its messages are never read)

    async def _refused(self, request_iterator, context) -> None:
        party = dict(context.invocation_metadata() or ()).get(PARTY_KEY)
        try:
            check_party_name(party)
        except WireError:
            party = "?"
        self._server.counters.record(party, "recv", "rejected", 0)
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED, f"worker {self._server.name!r}: missing or wrong federation token"
        )


class WorkerServer:
    """A party serving its segments, optimizers and datasets over gRPC.

    Args:
        name: the party's name (as in the ledger and, with TLS, in its certificate).
        token: the federation token every caller must present.
        tls: this party's certificate/key and the federation CA (mutual TLS), or None.
        limits: message and tensor size limits.
        peer_timeout: seconds to wait for a peer's tensor before failing the step.
        policy: the party's policy (:mod:`splitnn.workers.policy`), enforced by each session's engine;
            by default no activations are handed to the researcher.
        trust: module prefixes whose classes segment specs may import (``--trust``); the spec
            registry and :data:`splitnn.wire.trust.DEFAULT_LAYERS` are always allowed.
        session_grace: seconds a closed session's segments and datasets are kept for the
            researcher to resume (its tensors are freed at once); see :mod:`splitnn.server.sessions`.
        max_sessions: sessions kept at once (open, or closed within their grace period).
        max_sessions_per_researcher: sessions of one researcher identity kept at once (its certificate under
            mutual TLS, else its token; see :mod:`splitnn.server.sessions`).
        researcher_tokens: researcher name -> a token of that researcher's own (``--researcher-tokens``): accepted
            for a researcher's calls beside the federation token (never for a peer's), and the identity its
            sessions are counted under. Without certificates, this is how a worker tells researchers apart.
        max_rpcs: concurrent RPCs (streams and calls) the server accepts; more get RESOURCE_EXHAUSTED.
        max_session_memory: bytes one forward of a researcher's segment may allocate (``--max-session-memory``),
            checked on meta tensors before it runs at each new input shape (:mod:`splitnn.wire.budget`).
        device: where the party's segments, optimizer state and data live and compute
            (``--device``; checked here). Tensors cross the wire as bytes from the CPU and
            move onto this device when they arrive (:mod:`splitnn.workers.devices`).
        state_dir: where every session writes its checkpoints (``--state-dir``; the job id, a secret
            of the researcher's, names each job's part of it); without one a worker keeps none.
        audit: where the party's audit log goes (:class:`~splitnn.workers.audit.AuditLog`), or None.
        data_listen: ``HOST:PORT`` of a TCP data plane beside the gRPC port (``--data-listen``; port 0: any
            free port): peers that learn of it open their links there instead of over gRPC
            (:mod:`splitnn.server.tcp_plane`). None: peer links over gRPC only.
        data_advertise: the ``HOST:PORT`` peers should dial for it when that is not where it listens (behind
            NAT or a proxy; ``--data-advertise``). By default the listening address, or for a wildcard host
            (``0.0.0.0``) the port on whichever host the researcher reached this worker at.
    """

    def __init__(
        self,
        name: str,
        token: str,
        *,
        tls: TLSConfig | None = None,
        limits: Limits | None = None,
        peer_timeout: float = 60.0,
        policy: WorkerPolicy | None = None,
        trust: Trust | None = None,
        session_grace: float = DEFAULT_GRACE,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        max_sessions_per_researcher: int = DEFAULT_MAX_SESSIONS_PER_RESEARCHER,
        researcher_tokens: dict[str, str] | None = None,
        max_rpcs: int = 4096,
        max_session_memory: int = DEFAULT_MAX_SESSION_MEMORY,
        device: str = "cpu",
        state_dir: str | os.PathLike | None = None,
        audit: AuditLog | None = None,
        data_listen: str | None = None,
        data_advertise: str | None = None,
    ) -> None:
        self.name = check_party_name(name)
        if name == RESEARCHER:
            raise ConfigurationError(f"a worker cannot be called {RESEARCHER!r}")
        self.token = check_token_text(token)
        self.tls = tls
        self.limits = limits or Limits()
        if not (isinstance(peer_timeout, (int, float)) and 0 < peer_timeout < math.inf):
            raise ConfigurationError(f"peer_timeout must be a positive number of seconds, got {peer_timeout!r}")
        self.peer_timeout = float(peer_timeout)
        if not (isinstance(session_grace, (int, float)) and 0 <= session_grace < math.inf):
            raise ConfigurationError(f"session_grace must be a number of seconds >= 0, got {session_grace!r}")
        self.researcher_tokens = dict(researcher_tokens or {})
        for who, text in self.researcher_tokens.items():
            check_token_text(text, f"the token of researcher {who!r}")
            if token_matches(text, self.token):
                raise ConfigurationError(f"researcher {who!r}'s token is the federation token; give it one of its own")
        for what, value in (
            ("max_sessions", max_sessions),
            ("max_sessions_per_researcher", max_sessions_per_researcher),
            ("max_rpcs", max_rpcs),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(f"{what} must be a positive integer, got {value!r}")
        self.max_rpcs = max_rpcs
        if not isinstance(max_session_memory, int) or isinstance(max_session_memory, bool) or max_session_memory < 1:
            raise ConfigurationError(f"max_session_memory must be a number of bytes >= 1, got {max_session_memory!r}")
        self.max_session_memory = max_session_memory
        self.trust = trust
        register_known_layers()
        self.counters = ByteCounters()  # traffic no session owns (rejected calls, streams of ended sessions)
        self.address: str | None = None
        self.peers = Peers(
            self.name,
            self.token,
            tls=tls,
            limits=self.limits,
            counters=self.counters,
            timeout=self.peer_timeout,
            resolve=lambda tag: self.sessions.resolve(tag),
        )
        self.sessions = Sessions(
            self.name,
            peers=self.peers,
            timeout=self.peer_timeout,
            setup=self._setup_session,
            grace=float(session_grace),
            max_sessions=max_sessions,
            max_per_researcher=max_sessions_per_researcher,
            policy=policy or WorkerPolicy(release_outputs=False),
            device=resolve_device(device, self.name),  # checked once, before any session
            state_dir=state_dir,
            audit=audit,
        )
        self.health = Health(self.name, str(self.sessions.device), str(tls.cert) if tls is not None else None)
        self._server: grpc.aio.Server | None = None
        self._handlers: set[asyncio.Task] = set()  # running RPC handlers, awaited at stop
        self._replays: weakref.WeakSet[Replay] = weakref.WeakSet()  # the streams' command logs (busy at stop?)
        self._unary = 0  # single calls running
        check_data_plane(data_listen, data_advertise)
        self._data_listen, self._data_advertise = data_listen, data_advertise
        self.data_plane: TcpPlane | None = None

    def _setup_session(self, session: Session) -> None:
        session.commands = Commands(
            self.name,
            session,
            sessions=self.sessions,
            limits=self.limits,
            trust=self.trust,
            max_memory=self.max_session_memory,
        )
        session.executor = Executor(
            self.name, session.engine, session.commands, peers=session.peers, inbox=session.inbox, limits=self.limits
        )
        session.commands.health = self.health

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self, listen: str) -> str:
        """Listen on ``host:port`` (port 0: any free port); return the bound ``host:port``."""
        host, _ = split_host_port(listen, "--listen", any_port=True, host_optional=True)
        server = grpc.aio.server(
            options=self.limits.server_options() + [("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=self.max_rpcs,
            interceptors=[_TokenGate(self)],
        )
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        "Call": grpc.unary_unary_rpc_method_handler(self._call),
                        "Session": grpc.stream_stream_rpc_method_handler(self._session),
                        "Peer": grpc.stream_stream_rpc_method_handler(self._peer),
                    },
                ),
            )
        )
        try:
            if self.tls is not None:
                bound = server.add_secure_port(listen, server_credentials(self.tls))
            else:
                bound = server.add_insecure_port(listen)
        except RuntimeError as exc:
            raise WorkerError(f"worker {self.name!r} cannot listen on {listen}: {exc}") from None
        if not bound:
            raise WorkerError(f"worker {self.name!r} cannot listen on {listen} (address in use or not local?)")
        await server.start()
        self._server = server
        self.address = join_host_port(host, bound)
        if self._data_listen is not None:
            await self._start_data_plane(self._data_listen)
        return self.address

    async def _start_data_plane(self, listen: str) -> None:
        plane = TcpPlane(
            self.name, self.token, tls=self.tls, peers=self.peers, counters=self.counters, max_connections=self.max_rpcs
        )
        try:
            await plane.start(listen)
        except Exception:  # nothing half-started: the gRPC port closes too
            await self._server.stop(None)
            self._server = None
            raise
        self.data_plane = plane
        wildcard = plane.host in ("", "0.0.0.0", "::")
        self.peers.data_address = self._data_advertise or (f":{plane.port}" if wildcard else plane.address)

    def busy(self) -> bool:
        """Whether a command is running or queued (a researcher's open stream waiting for its next one is not)."""
        return self._unary > 0 or any(r.accepted > r.completed for r in self._replays)

    async def stop(self, grace: float = 2.0) -> None:
        """Stop accepting calls, let running commands finish for ``grace`` seconds, close peer links.

        Without a command running, the open calls (researchers' streams waiting for their next command, which
        would never end by themselves) get :data:`IDLE_GRACE` seconds instead: an idle worker stops at once."""
        if self._server is not None:
            # idle: a short grace still ends the calls with a graceful GOAWAY (no error logged at the peers)
            await self._server.stop(grace if self.busy() else min(grace, IDLE_GRACE))
        # gRPC cancels the calls still running; wait until their handlers (and gRPC's tasks around them)
        # have finished, so nothing is left for the event loop's shutdown to cancel: gRPC prints a
        # traceback for each RPC task cancelled that way.
        running = [t for t in self._handlers if not t.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=max(grace, 1.0))
        if self.data_plane is not None:
            await self.data_plane.stop()
        for _ in range(3):
            await asyncio.sleep(0)
        self.sessions.drop_all()
        await self.peers.close()
        self.health.close()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    # -- authentication -------------------------------------------------------------------
    def _researcher_token(self, token: object) -> str | None:
        """The name of the researcher whose own token ``token`` is (constant time per token), or None."""
        found = None
        for who, text in self.researcher_tokens.items():
            if isinstance(token, str) and token_matches(token, text):
                found = who
        return found

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> str:
        md = {k: v for k, v in (context.invocation_metadata() or ())}
        token = md.get(TOKEN_KEY)
        party = md.get(PARTY_KEY)
        federation = isinstance(token, str) and token_matches(token, self.token)
        # a researcher's own token (--researcher-tokens) admits researchers' calls only, never a peer's
        if not federation and not (party == RESEARCHER and self._researcher_token(token) is not None):
            self.counters.record(party if isinstance(party, str) else "?", "recv", "rejected", 0)
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, f"worker {self.name!r}: missing or wrong federation token"
            )
        try:
            check_party_name(party)
        except WireError as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"worker {self.name!r}: {exc}")
        if self.tls is not None and self.tls.ca is not None:
            ids = peer_identities(context.auth_context())
            if party not in ids:
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"worker {self.name!r}: caller claims to be {party!r} but its certificate is "
                    f"for {sorted(ids) or 'nobody'}",
                )
        return party

    def _identity(self, context: grpc.aio.ServicerContext) -> str:
        """The researcher identity of an authenticated call: its certificate under mutual TLS, else its token."""
        if self.tls is not None and self.tls.ca is not None:
            fingerprint = certificate_fingerprint(context.auth_context())
            if fingerprint is not None:
                return f"certificate {fingerprint}"
        who = self._researcher_token(dict(context.invocation_metadata() or ()).get(TOKEN_KEY))
        return f"researcher {who}" if who is not None else "the federation token"

    # -- sessions ------------------------------------------------------------------------------
    async def _open_session(self, context: grpc.aio.ServicerContext, *, may_issue: bool = False) -> Session:
        """The session a researcher's call names (``x-splitnn-session``), resumed; a new one the worker issues (a
        ``hello`` call asking for one, ``x-splitnn-new-session``: its id goes back in the trailing metadata); or an
        anonymous one."""
        md = dict(context.invocation_metadata() or ())
        sid, new = md.get(SESSION_KEY), md.get(NEW_SESSION_KEY) == "1"
        if new and (sid is not None or not may_issue):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"worker {self.name!r}: a new session is asked for by a hello call that names none",
            )
        try:
            session = self.sessions.open(
                check_session_id(sid) if sid is not None else None, self._identity(context), issue=new
            )
        except WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"worker {self.name!r}: {exc}")
        except UnknownSession as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except PolicyError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except TooManySessions as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        if new:
            context.set_trailing_metadata(((SESSION_KEY, session.id),))
        return session

    def _track(self) -> asyncio.Task | None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        return task

    # -- RPC handlers ----------------------------------------------------------------------
    async def _call(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        task = self._track()
        try:
            caller = await self._authenticate(context)
            session = await self._open_session(context, may_issue=True)
            state = StreamState()
            self._unary += 1
            try:
                cmd = await self._parse(raw, caller, context, session)
                if session.fresh and cmd.op != "hello":
                    self.sessions.end(session)  # (nothing in it yet)
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"worker {self.name!r}: a new session is asked for by a hello call, not {cmd.op!r}",
                    )
                reply = await session.executor.execute(cmd, caller, state)
                return self._send_reply(reply, caller, cmd.op, session)
            finally:
                self._unary -= 1
                session.exports.drop_stream(state)
                self.sessions.close(session)
        finally:
            self._handlers.discard(task)

    async def _session(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        """A researcher's ordered stream: its commands run in a :class:`~splitnn.server.replay.Replay` that
        outlives a broken call (a ``resume`` command as the first message attaches a new call to it)."""
        task = self._track()
        try:
            caller = await self._authenticate(context)
            session = await self._open_session(context)
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
                cmd = await self._parse(raw, caller, context, session)
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
            self._handlers.discard(task)

    def _new_replay(self, session: Session, stream_id: str | None, caller: str) -> Replay:
        if stream_id is not None and stream_id in session.replays:  # a client reusing an id: the old one ends
            self._finish(session, session.replays[stream_id])
        replay = Replay(stream_id)
        self._replays.add(replay)
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
            await context.write(self._send_reply(reply, RESEARCHER, "resume", session))
            return None
        log.info("worker %s: session %s resumed a broken stream at #%d", self.name, session.tag[:8], replay.received)
        reply = Reply(seq=0, ok=True, result_json=json.dumps({"received": replay.received}))
        await context.write(self._send_reply(reply, RESEARCHER, "resume", session))
        return replay

    async def _converse(self, session: Session, replay: Replay, caller: str, context) -> None:
        """Read commands into ``replay`` and write its replies, until the client is done and all are written."""
        resending = replay.rewrites  # replies written before a break and again now: counted as re-sent
        writes: set[asyncio.Future] = set()

        async def write() -> None:
            nonlocal resending
            while (data := await replay.next_reply()) is not None:
                # shielded: a write cut off half-way leaves it pending in gRPC, and the call could never end
                done = asyncio.ensure_future(context.write(data))
                writes.add(done)
                done.add_done_callback(writes.discard)
                await asyncio.shield(done)
                if resending > 0:
                    resending -= 1
                    session.counters.record(caller, "sent", "resent", len(data))

        async def stop_writing() -> None:
            writer.cancel()
            if writes:
                await asyncio.wait(set(writes), timeout=self.peer_timeout)

        writer = asyncio.get_running_loop().create_task(write())
        try:
            while True:
                raw = await context.read()
                if raw is grpc.aio.EOF:  # (a broken connection may look like this too: see _session)
                    await replay.half_closed()
                    break
                try:
                    cmd = Command.FromString(raw)
                except (DecodeError, TypeError, ValueError):
                    await stop_writing()  # before the call is aborted: no write may be in flight then
                    await self._parse(raw, caller, context, session)  # aborts (INVALID_ARGUMENT)
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
                    await replay.emit(cmd.seq, self._send_reply(reply, caller, cmd.op, session))
            else:
                reply = await (
                    session.executor.execute_batch(cmd, caller, replay.state)
                    if cmd.op == "batch"
                    else session.executor.execute(cmd, caller, replay.state)
                )
                for part in split_reply(reply, self.limits.chunk_bytes):
                    await replay.emit(cmd.seq, self._send_reply(part, caller, cmd.op, session))
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

    async def _peer(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        task = self._track()
        try:
            caller = await self._authenticate(context)
            if caller == RESEARCHER or caller == self.name:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED, f"worker {self.name!r}: {caller!r} is not a peer"
                )
            tag = dict(context.invocation_metadata() or ()).get(PEER_SESSION_KEY)
            if tag is not None:
                try:
                    check_session_tag(tag)
                except WireError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"worker {self.name!r}: {exc}")
            link = await self.peers.accept(caller, tag, context.write, context.read)
            if link.protocol_error is not None:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"worker {self.name!r}: malformed peer frame: {link.protocol_error}",
                )
        finally:
            self._handlers.discard(task)

    async def _parse(
        self, raw: bytes, caller: str, context: grpc.aio.ServicerContext, session: Session, *, count: bool = True
    ) -> Command:
        try:
            cmd = Command.FromString(raw)
        except (DecodeError, TypeError, ValueError) as exc:
            session.counters.record(caller, "recv", "invalid", len(raw) if isinstance(raw, bytes) else 0)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"worker {self.name!r}: malformed command: {exc}")
        if count:
            session.counters.record(caller, "recv", COMMAND_KIND.get(cmd.op, "control"), len(raw))
        return cmd

    def _send_reply(self, reply: Reply, caller: str, op: str, session: Session) -> bytes:
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


# --------------------------------------------------------------------------------- running
@dataclass
class ServeConfig:
    """How ``splitnn worker`` runs a :class:`WorkerServer`."""

    name: str
    listen: str
    token: str
    tls: TLSConfig | None = None
    limits: Limits = field(default_factory=Limits)
    peer_timeout: float = 60.0
    release_outputs: bool = False
    address_file: str | None = None
    max_lifetime: float | None = None
    datasets: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    trust: tuple[str, ...] = ()  # module prefixes segment specs may import classes from
    session_grace: float = DEFAULT_GRACE
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_session_memory: int = DEFAULT_MAX_SESSION_MEMORY  # bytes one segment forward may allocate
    max_sessions_per_researcher: int = DEFAULT_MAX_SESSIONS_PER_RESEARCHER
    researcher_tokens: dict[str, str] = field(default_factory=dict)  # researcher name -> its own token
    device: str = "cpu"  # where the party's segments, optimizer state and data live (--device)
    policy: WorkerPolicy | None = None  # the party's policy (--policy); release_outputs from it when given
    state_dir: str | None = None  # where each session writes its checkpoints (--state-dir)
    audit_log: str | None = None  # the audit log, JSON lines (--audit-log; default STATE_DIR/audit.jsonl)
    data_listen: str | None = None  # a TCP data plane for peer links (--data-listen)
    data_advertise: str | None = None  # where peers dial it, if not where it listens (--data-advertise)
    metrics_listen: str | None = None  # serve Prometheus metrics on HOST:PORT (--metrics-listen; off by default)


def write_address(path: str, address: str) -> None:
    """Write ``address`` to ``path`` atomically: a reader never sees half an address."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(address + "\n")
    os.replace(tmp, path)


async def serve(config: ServeConfig, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Run a worker until SIGINT/SIGTERM (or ``max_lifetime`` seconds); shut down gracefully.

    First raises this process's soft open-files limit to its hard limit: every connection
    is a file descriptor, and a common default of 1024 lets a flood of idle connections
    lock researchers out.
    """
    soft, raised = raise_open_files_limit()
    if raised != soft:
        log.info("worker %s: open-files limit raised from %s to %s", config.name, soft, raised)
    audit_path = config.audit_log or (os.path.join(config.state_dir, "audit.jsonl") if config.state_dir else None)
    if config.state_dir is not None:
        os.makedirs(config.state_dir, exist_ok=True)
    audit = AuditLog(audit_path, config.name) if audit_path else None
    server = WorkerServer(
        config.name,
        config.token,
        tls=config.tls,
        limits=config.limits,
        peer_timeout=config.peer_timeout,
        # a party that holds data starts closed (the gate of splitnn.workers.policy); one without, as ever
        policy=config.policy
        or WorkerPolicy.from_dict({"release_outputs": config.release_outputs}, data_holder=bool(config.datasets)),
        trust=Trust(config.trust),
        session_grace=config.session_grace,
        max_sessions=config.max_sessions,
        max_session_memory=config.max_session_memory,
        max_sessions_per_researcher=config.max_sessions_per_researcher,
        researcher_tokens=config.researcher_tokens,
        device=config.device,
        state_dir=config.state_dir,
        audit=audit,
        data_listen=config.data_listen,
        data_advertise=config.data_advertise,
    )
    for dname, parts in config.datasets.items():
        server.sessions.add_party_dataset(dname, **parts)
    if audit is not None:
        audit.write("start", policy=server.sessions.policy.to_dict(), datasets=sorted(config.datasets))
    metrics = None
    if config.metrics_listen is not None:  # splitnn.server.metrics: Prometheus, off by default
        from splitnn.server.metrics import start_metrics

        metrics = start_metrics(config.metrics_listen, server)
    address = await server.start(config.listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if config.address_file:
        write_address(config.address_file, address)
    if on_ready is not None:
        on_ready(address)
    try:
        await asyncio.wait_for(stop.wait(), config.max_lifetime)
    except asyncio.TimeoutError:
        log.warning("worker %s: max lifetime reached, shutting down", config.name)
    await server.stop(grace=1.0)
    if metrics is not None:
        metrics.stop()
    if audit is not None:
        audit.write("stop")
        audit.close()
