#!/usr/bin/env bash
# Regenerate src/splitnn/wire/proto/splitnn_pb2.py from splitnn.proto.
# Usage: tools/gen_proto.sh   (needs grpcio-tools; run from anywhere)
# Only the message classes are generated: the service is registered with generic
# handlers in splitnn/server/server.py because its Peer method carries raw frames.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/src"
python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. splitnn/wire/proto/splitnn.proto
echo "generated $root/src/splitnn/wire/proto/splitnn_pb2.py"
