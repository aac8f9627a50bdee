"""WorkerServer: one party of split learning as a gRPC server (``splitnn worker``), and :func:`serve`.

Each researcher's session runs on an in-process :class:`~splitnn.workers.VirtualWorker` of its own
(:mod:`splitnn.server.sessions`); the server adds the network around those engines. Three RPCs
(``wire/proto/splitnn.proto``): ``Session``, a researcher's ordered command stream, and ``Call``, one
command (:mod:`splitnn.server.streams`); ``Peer``, the data plane between workers (:mod:`splitnn.server.peers`).
Every call is checked by :mod:`splitnn.server.gate`. Limits on connections, RPCs and sessions keep a flood of
idle or half-open connections from locking researchers out; docs/networking.md describes the whole design.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch

from splitnn.accounting import RESEARCHER
from splitnn.common.messages import MAX_NAME, PROTOCOL_VERSION, check_party_name, check_session_id, check_session_tag
from splitnn.errors import ConfigurationError, PolicyError, WireError, WorkerError
from splitnn.server.commands import MAX_MERGE_SOURCES, Commands
from splitnn.server.executor import Executor
from splitnn.server.gate import Gate, TokenGate, server_credentials
from splitnn.server.health import Health
from splitnn.server.peers import Peers
from splitnn.server.sessions import (
    DEFAULT_GRACE,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_MAX_SESSIONS_PER_RESEARCHER,
    Session,
    Sessions,
    TooManySessions,
    UnknownSession,
)
from splitnn.server.streams import Streams
from splitnn.server.tcp_plane import TcpPlane, check_data_plane
from splitnn.transport.addresses import join_host_port, split_host_port
from splitnn.transport.counters import ByteCounters
from splitnn.transport.limits import Limits, raise_open_files_limit
from splitnn.transport.security import NEW_SESSION_KEY, PEER_SESSION_KEY, SESSION_KEY, TLSConfig
from splitnn.wire.budget import DEFAULT_MAX_SESSION_MEMORY
from splitnn.wire.proto import SERVICE
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
    "server_credentials",
]

log = logging.getLogger("splitnn.worker")


#: Seconds :meth:`WorkerServer.stop` gives the open calls when no command runs (they wait for a next command).
IDLE_GRACE = 0.05


def register_known_layers() -> None:
    """Teach this process's spec codec every layer type splitnn ships beyond the basic ones.

    The defense layers of :mod:`splitnn.privacy` (``NoPeek``, ``CutNoise``,
    ``LabelProtection``) register their specs when that package is imported; a worker
    imports it at start so that a defended segment can be hosted remotely. Imported
    here, lazily, because ``privacy`` sits beside ``workers`` (it imports them), not below.
    """
    import splitnn.privacy.defenses  # noqa: F401  (registers the defense layer specs)


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
        self.tls = tls
        self.limits = limits or Limits()
        if not (isinstance(peer_timeout, (int, float)) and 0 < peer_timeout < math.inf):
            raise ConfigurationError(f"peer_timeout must be a positive number of seconds, got {peer_timeout!r}")
        self.peer_timeout = float(peer_timeout)
        if not (isinstance(session_grace, (int, float)) and 0 <= session_grace < math.inf):
            raise ConfigurationError(f"session_grace must be a number of seconds >= 0, got {session_grace!r}")
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
        self.gate = Gate(self.name, token, tls=tls, researcher_tokens=researcher_tokens, counters=self.counters)
        self.token = self.gate.token
        self.address: str | None = None
        self.peers = Peers(
            self.name,
            self.token,
            tls=tls,
            limits=self.limits,
            counters=self.counters,
            timeout=self.peer_timeout,
            resolve=lambda tag: None,  # (the sessions' own lookup, once they exist: below)
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
        self.peers.resolve = self.sessions.resolve  # (bound as it is: a peer link looks it up for every frame)
        self.health = Health(self.name, str(self.sessions.device), str(tls.cert) if tls is not None else None)
        self._server: grpc.aio.Server | None = None
        self._handlers: set[asyncio.Task] = set()  # running RPC handlers, awaited at stop
        self.streams = Streams(self)
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
            interceptors=[TokenGate(self.gate)],
        )
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        "Call": grpc.unary_unary_rpc_method_handler(self.streams.call),
                        "Session": grpc.stream_stream_rpc_method_handler(self.streams.session),
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
        return self.streams.busy()

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

    # -- sessions ------------------------------------------------------------------------------
    async def open_session(self, context: grpc.aio.ServicerContext, *, may_issue: bool = False) -> Session:
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
                check_session_id(sid) if sid is not None else None, self.gate.identity(context), issue=new
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

    def track(self) -> asyncio.Task | None:
        """Count the running RPC handler (awaited at :meth:`stop`)."""
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        return task

    def untrack(self, task: asyncio.Task | None) -> None:
        self._handlers.discard(task)

    # -- the data plane -------------------------------------------------------------------
    async def _peer(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        task = self.track()
        try:
            caller = await self.gate.authenticate(context)
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
            self.untrack(task)


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


#: The fields of :class:`ServeConfig` that :func:`serve` passes to :class:`WorkerServer` as they are.
PASSED_AS_IS = (
    "tls",
    "limits",
    "peer_timeout",
    "session_grace",
    "max_sessions",
    "max_session_memory",
    "max_sessions_per_researcher",
    "researcher_tokens",
    "device",
    "state_dir",
    "data_listen",
    "data_advertise",
)


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
        # a party that holds data starts closed (the gate of splitnn.workers.policy); one without, as ever
        policy=config.policy
        or WorkerPolicy.from_dict({"release_outputs": config.release_outputs}, data_holder=bool(config.datasets)),
        trust=Trust(config.trust),
        audit=audit,
        **{key: getattr(config, key) for key in PASSED_AS_IS},
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
