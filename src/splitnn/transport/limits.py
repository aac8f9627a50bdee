"""Size limits of the networked transport, set explicitly on both ends.

gRPC refuses messages above 4 MiB by default, which one large activation easily
exceeds. We set the limits ourselves and cut anything bigger into chunks of at most
``chunk_bytes`` (peer frames: :mod:`splitnn.transport.frames`; control blobs: the
``stage`` command of :mod:`splitnn.workers.command_stream`).
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
    """

    chunk_bytes: int = 4 * MiB - 64 * 1024
    max_tensor_bytes: int = 512 * MiB
    max_blob_bytes: int = 1024 * MiB

    def __post_init__(self) -> None:
        for name in ("chunk_bytes", "max_tensor_bytes", "max_blob_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1024:
                raise ConfigurationError(f"Limits.{name} must be an integer >= 1024, got {value!r}")

    @property
    def max_message_bytes(self) -> int:
        """The gRPC send/receive limit: one chunk plus room for the envelope."""
        return self.chunk_bytes + 64 * 1024

    def grpc_options(self) -> list[tuple[str, int]]:
        """Channel/server options that set gRPC's message limits explicitly."""
        n = self.max_message_bytes
        return [("grpc.max_send_message_length", n), ("grpc.max_receive_message_length", n)]
