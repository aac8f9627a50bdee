"""Size limits of the networked transport, set explicitly on both ends.

gRPC refuses messages above 4 MiB by default, which one large activation easily
exceeds. We set the limits ourselves and cut anything bigger into chunks of at most
``chunk_bytes`` (control blobs: the ``stage`` command of
:mod:`splitnn.workers.command_stream`) or ``peer_chunk_bytes`` (peer frames of the data
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

from splitnn.errors import ConfigurationError

MiB = 1 << 20


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
        for name in ("chunk_bytes", "max_tensor_bytes", "max_blob_bytes", "peer_chunk_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1024:
                raise ConfigurationError(f"Limits.{name} must be an integer >= 1024, got {value!r}")

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
