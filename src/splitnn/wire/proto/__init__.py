"""The control envelope of networked workers, generated from ``splitnn.proto``.

Regenerate with ``tools/gen_proto.sh`` after editing the ``.proto``; a test checks the
generated module describes the same messages as the ``.proto`` file.
"""

from splitnn.wire.proto.splitnn_pb2 import Command, RawFrame, Reply, Transfer

#: Full gRPC service name; method paths are ``/splitnn.v1.Worker/<Method>``.
SERVICE = "splitnn.v1.Worker"
CALL = f"/{SERVICE}/Call"
SESSION = f"/{SERVICE}/Session"
PEER = f"/{SERVICE}/Peer"

__all__ = ["Command", "Reply", "Transfer", "RawFrame", "SERVICE", "CALL", "SESSION", "PEER"]
