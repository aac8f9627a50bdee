"""Raw frames of the peer-to-peer data plane.

Adjacent workers keep one long-lived bidirectional gRPC stream between them and put
*raw frames* on it (custom identity serializers: no protobuf, no copy into a message
object). A frame is a fixed 24-byte header followed by a chunk of payload::

    offset  size  field
    0       4     magic b"SNP1"
    4       1     type: 1 REQUEST (pull tensor #id), 2 DATA (a chunk of it), 3 ERROR (utf-8 text),
                  4 PUSH (a chunk of a tensor sent unasked, shipped epochs), 5 ABORT (utf-8 text:
                  the sender's shipped epoch #id failed)
    5       1     kind: 1 activation, 2 gradient, 3 weights (a segment's state handed holder to holder)
    6       1     flags: bit 0 = more chunks of this payload follow
    7       1     reserved, 0
    8       8     id (u64): the tensor's id at its owner (pull key and reply key)
    16      8     total (u64): length of the whole payload across chunks

A DATA payload is one :mod:`splitnn.wire.tensor_codec` frame (dtype + shape header +
raw bytes); for ``weights`` that tensor is 1-D uint8 and holds a safetensors state dict
(:mod:`splitnn.wire.state_codec`), decoded by the receiver with the validating codec.
Payloads above the chunk size are cut into several DATA frames, so no gRPC message
exceeds the limits set in :class:`~splitnn.transport.Limits`. PUSH payloads are cut
the same way. The receiver checks every header and the declared total against its limits *before*
buffering, and decodes the reassembled tensor with the validating codec.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from splitnn.errors import WireError
from splitnn.wire.tensor_codec import decode_tensor, encode_tensor_parts, header_size

PEER_MAGIC = b"SNP1"
HEADER = struct.Struct("<4sBBBBQQ")
HEADER_SIZE = HEADER.size  # 24

REQUEST, DATA, ERROR, PUSH, ABORT = 1, 2, 3, 4, 5
TEXT_TYPES = (ERROR, ABORT)
PAYLOAD_TYPES = (DATA, PUSH)
FLAG_MORE = 1
KIND_CODES = {"activation": 1, "gradient": 2, "weights": 3}
CODE_KINDS = {v: k for k, v in KIND_CODES.items()}
MAX_ERROR_BYTES = 4096


class FrameHeader(NamedTuple):
    type: int
    kind: str
    more: bool
    id: int
    total: int


def pack(
    type_: int, kind: str, tensor_id: int, total: int, chunk: bytes | memoryview = b"", more: bool = False
) -> bytes:
    """One frame: header followed by ``chunk``."""
    head = HEADER.pack(PEER_MAGIC, type_, KIND_CODES[kind], FLAG_MORE if more else 0, 0, tensor_id, total)
    return head + chunk if chunk else head


def request(kind: str, tensor_id: int) -> bytes:
    """Ask the peer for its tensor ``tensor_id``."""
    return pack(REQUEST, kind, tensor_id, 0)


def error(kind: str, tensor_id: int, message: str) -> bytes:
    """Tell the peer its request for ``tensor_id`` failed."""
    text = message.encode("utf-8", "replace")[:MAX_ERROR_BYTES]
    return pack(ERROR, kind, tensor_id, len(text), text)


def abort(run_id: int, message: str) -> bytes:
    """Tell an adjacent peer that this worker's part of shipped epoch ``run_id`` failed."""
    text = message.encode("utf-8", "replace")[:MAX_ERROR_BYTES]
    return pack(ABORT, "activation", run_id, len(text), text)


def data_frames(
    kind: str, tensor_id: int, tensor: torch.Tensor, chunk_bytes: int, *, type_: int = DATA
) -> Iterator[bytes]:
    """The DATA (or PUSH) frames carrying ``tensor`` (one unless it exceeds ``chunk_bytes``)."""
    if type_ not in PAYLOAD_TYPES:
        raise ValueError(f"frame type {type_} carries no tensor")
    head, payload = encode_tensor_parts(tensor)
    total = len(head) + len(payload)
    if total <= chunk_bytes:
        yield pack(type_, kind, tensor_id, total, head + payload)  # one copy: header + bytes
        return
    whole = memoryview(head + payload)
    for start in range(0, total, chunk_bytes):
        end = min(start + chunk_bytes, total)
        yield pack(type_, kind, tensor_id, total, whole[start:end], more=end < total)


def parse(buf: bytes) -> tuple[FrameHeader, memoryview]:
    """Validate a frame's header; return it and a view of its chunk. Raises :class:`WireError`."""
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise WireError(f"peer frame must be bytes, got {type(buf).__name__}")
    if len(buf) < HEADER_SIZE:
        raise WireError(f"peer frame too short: {len(buf)} bytes, the header alone is {HEADER_SIZE}")
    magic, type_, kind_code, flags, reserved, tensor_id, total = HEADER.unpack_from(buf, 0)
    if magic != PEER_MAGIC:
        raise WireError(f"not a peer frame: bad magic {bytes(magic)!r}")
    if type_ not in (REQUEST, DATA, ERROR, PUSH, ABORT):
        raise WireError(f"peer frame has unknown type {type_}")
    kind = CODE_KINDS.get(kind_code)
    if kind is None:
        raise WireError(f"peer frame has unknown kind code {kind_code}")
    if flags & ~FLAG_MORE or reserved:
        raise WireError("peer frame has unknown flag bits set")
    chunk = memoryview(buf)[HEADER_SIZE:]
    if type_ == REQUEST and (len(chunk) or total or flags):
        raise WireError("a REQUEST peer frame carries no payload")
    if type_ in TEXT_TYPES and (len(chunk) != total or total > MAX_ERROR_BYTES or flags):
        raise WireError("malformed ERROR/ABORT peer frame")
    return FrameHeader(type_, kind, bool(flags & FLAG_MORE), tensor_id, total), chunk


@dataclass
class Reassembler:
    """Collects the DATA chunks of one tensor and decodes it once complete.

    The declared total is checked against ``max_tensor_bytes`` before anything is
    buffered; chunks must agree on the total and may not overrun it.
    """

    max_tensor_bytes: int
    _parts: dict[int, tuple[int, bytearray]] = field(default_factory=dict)

    def feed(self, hdr: FrameHeader, chunk: memoryview) -> torch.Tensor | None:
        """Add one DATA chunk; return the tensor when its last chunk arrived, else None."""
        limit = self.max_tensor_bytes + header_size(8)
        if hdr.total > limit:
            self._parts.pop(hdr.id, None)
            raise WireError(f"peer tensor #{hdr.id} declares {hdr.total} bytes; the limit is {limit}")
        entry = self._parts.get(hdr.id)
        total, buf = entry if entry is not None else (hdr.total, None)
        if total != hdr.total:
            self._parts.pop(hdr.id, None)
            raise WireError(f"peer tensor #{hdr.id}: chunks disagree on its total length")
        if buf is None:
            if not hdr.more:  # the common case: one frame, no reassembly buffer
                if len(chunk) != hdr.total:
                    raise WireError(f"peer tensor #{hdr.id}: frame holds {len(chunk)} bytes but declares {hdr.total}")
                return decode_tensor(chunk, max_bytes=self.max_tensor_bytes)
            buf = bytearray()
            self._parts[hdr.id] = (total, buf)
        if len(buf) + len(chunk) > total:
            self._parts.pop(hdr.id, None)
            raise WireError(f"peer tensor #{hdr.id}: chunks overrun the declared {total} bytes")
        buf += chunk
        if hdr.more:
            return None
        del self._parts[hdr.id]
        if len(buf) != total:
            raise WireError(f"peer tensor #{hdr.id} truncated: got {len(buf)} of {total} bytes")
        return decode_tensor(buf, max_bytes=self.max_tensor_bytes)

    def drop(self, tensor_id: int) -> None:
        self._parts.pop(tensor_id, None)
