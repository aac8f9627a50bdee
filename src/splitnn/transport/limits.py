"""Size limits of the networked transport, set explicitly on both ends.

gRPC refuses messages above 4 MiB by default, which one large activation easily
exceeds. We set the limits ourselves and cut anything bigger into chunks of at most
``chunk_bytes`` (control blobs: the ``stage`` command of
:mod:`splitnn.client.command_stream`) or ``peer_chunk_bytes`` (peer frames of the data
plane: :mod:`splitnn.transport.frames`).

Why the data plane's chunks are smaller. A gRPC message is handed over only once all of
it has arrived, so one 4 MiB message serialises the sender's copy, the transfer and the
receiver's copy; 1 MiB frames let them overlap, and keep each copy's buffers small.
Measured on loopback (``benchmarks/bench_dataplane.py``, docs/performance.md), 1 MiB
frames cost about 0.9 ns per byte end to end against about 1.3-2 ns for 4 MiB ones; much
smaller frames (128 KiB) pay gRPC's per-message overhead too often.
"""

from __future__ import annotations

from dataclasses import dataclass

try:
    import resource
except ImportError:  # not on POSIX: no limit to raise
    resource = None

from splitnn.checks import check_counts

MiB = 1 << 20

#: gRPC server options that bound what a connection may hold before (and after) it authenticates.
#: Tokens are checked per RPC, so everything below the RPC -- TCP, TLS, HTTP/2 -- is open to anyone
#: who can reach the port; these options keep idle and half-open connections from piling up.
SERVER_CONNECTION_OPTIONS: tuple[tuple[str, int], ...] = (
    # a connection must finish its TLS/HTTP/2 handshake within 10 s (gRPC's default: 120 s)
    ("grpc.server_handshake_timeout_ms", 10_000),
    # a connection with no RPC for 2 minutes is closed (clients reconnect transparently)
    ("grpc.max_connection_idle_ms", 120_000),
    # ping a silent client every minute; no answer within 20 s: the connection is dead, close it
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    # clients may ping at most every 5 s (ours ping every 10 s, CLIENT_KEEPALIVE_OPTIONS); two strikes
    # and the connection is closed
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 2),
    # concurrent streams (RPCs) per connection
    ("grpc.max_concurrent_streams", 256),
)


#: gRPC channel options of every connection a researcher or a worker dials: an HTTP/2 ping every 10 s,
#: even while no call is running, and a connection whose ping is not answered within 5 s is dead. So a
#: peer that vanished without closing its connection (a machine lost, a network cut) is noticed within
#: about 15 s, and the calls on it fail (``WorkerUnreachableError``) instead of waiting for their timeout.
CLIENT_KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),  # (recent gRPC times a ping's ack with this one: default 1 min)
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)


@dataclass(frozen=True)
class Limits:
    """Message and tensor size limits.

    Attributes:
        chunk_bytes: largest payload put in one gRPC message; bigger tensors and blobs
            are cut into chunks of this size.
        max_tensor_bytes: largest tensor (payload) a worker accepts from anyone.
        max_blob_bytes: largest control blob (state dict, dataset, staged upload).
        peer_chunk_bytes: largest payload put in one peer frame of the data plane (capped by
            ``chunk_bytes``; see :attr:`frame_bytes`).
    """

    chunk_bytes: int = 4 * MiB - 64 * 1024
    max_tensor_bytes: int = 512 * MiB
    max_blob_bytes: int = 1024 * MiB
    peer_chunk_bytes: int = 1 * MiB

    def __post_init__(self) -> None:
        check_counts(self, ("chunk_bytes", "max_tensor_bytes", "max_blob_bytes", "peer_chunk_bytes"), minimum=1024)

    @property
    def frame_bytes(self) -> int:
        """Largest payload in one peer frame: ``peer_chunk_bytes``, or ``chunk_bytes`` if smaller."""
        return min(self.peer_chunk_bytes, self.chunk_bytes)

    @property
    def max_message_bytes(self) -> int:
        """The gRPC send/receive limit: one chunk plus room for the envelope."""
        return self.chunk_bytes + 64 * 1024

    def grpc_options(self) -> list[tuple[str, int]]:
        """Channel/server options that set gRPC's message limits explicitly."""
        n = self.max_message_bytes
        return [("grpc.max_send_message_length", n), ("grpc.max_receive_message_length", n)]

    def client_options(self) -> list[tuple[str, int]]:
        """A dialling side's channel options: the message limits and :data:`CLIENT_KEEPALIVE_OPTIONS`."""
        return self.grpc_options() + list(CLIENT_KEEPALIVE_OPTIONS)

    def server_options(self) -> list[tuple[str, int]]:
        """A worker's server options: the message limits and :data:`SERVER_CONNECTION_OPTIONS`."""
        return self.grpc_options() + list(SERVER_CONNECTION_OPTIONS)


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft limit of open files to its hard limit; return (before, after).

    Every connection holds a file descriptor. At a soft limit of 1024 (a common default),
    about a thousand idle connections exhaust it and the server can accept no one else.
    An unlimited hard limit is capped at 1,048,576 (Linux refuses more); a failure leaves
    the limit as it was.
    """
    if resource is None:
        return 0, 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft
