"""Raw frames of the peer-to-peer data plane: a 24-byte header and a chunk of payload.

:class:`FrameHeader` documents the layout, what a payload holds and how it is copied; :func:`pack`,
:func:`request`, :func:`ack` and the others build frames, and the receiver's parsers check every
header against its limits before buffering.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from splitnn.errors import WireError
from splitnn.wire import compress, cut_codec
from splitnn.wire.cut_codec import VALUES_HEADER_ROOM, Arrived, Encoded
from splitnn.wire.tensor_codec import (
    TENSOR_PREFIX_SIZE,
    TensorHeader,
    decode_tensor,
    encode_tensor_parts,
    header_size,
    payload_buffer,
    read_header,
    tensor_from_payload,
    tensor_nbytes,
)

PEER_MAGIC = b"SNP1"
HEADER = struct.Struct("<4sBBBBQQ")
HEADER_SIZE = HEADER.size  # 24

REQUEST, DATA, ERROR, PUSH, ABORT, ACK = 1, 2, 3, 4, 5, 6
TEXT_TYPES = (ERROR, ABORT)
PAYLOAD_TYPES = (DATA, PUSH)
FLAG_MORE, FLAG_VALUES = 1, 2
KIND_CODES = {"activation": 1, "gradient": 2, "weights": 3, "psi": 4}
CODE_KINDS = {v: k for k, v in KIND_CODES.items()}
MAX_ERROR_BYTES = 4096
#: One acknowledged push in an ACK frame: kind code, push id.
ACK_ENTRY = struct.Struct("<BQ")
#: Most pushes one ACK frame acknowledges.
MAX_ACKS = 256
NO_CODEC = compress.CODEC_IDS["none"]
CODEC_NAMES = {v: k for k, v in compress.CODEC_IDS.items()}
#: Room above ``max_tensor_bytes`` for a payload's own header (tensor or codec header and parameters).
PAYLOAD_HEADER_ROOM = 256


class FrameHeader(NamedTuple):
    """The header of one raw frame of the peer data plane.

    Adjacent workers keep one long-lived bidirectional gRPC stream between them and put
    *raw frames* on it (custom identity serializers: no protobuf, no copy into a message
    object). A frame is a fixed 24-byte header followed by a chunk of payload::

        offset  size  field
        0       4     magic b"SNP1"
        4       1     type: 1 REQUEST (pull tensor #id), 2 DATA (a chunk of it), 3 ERROR (utf-8 text),
                      4 PUSH (a chunk of a tensor sent unasked, shipped epochs), 5 ABORT (utf-8 text:
                      the sender's shipped epoch #id failed), 6 ACK (pushes that arrived whole, as entries
                      of a kind code (u8) and a push id (u64); none: "acknowledge what you have now";
                      :mod:`splitnn.server.pushes`)
        5       1     kind: 1 activation, 2 gradient, 3 weights (a segment's state handed holder to holder),
                      4 psi (a private set intersection message, :mod:`splitnn.data.psi_messages`)
        6       1     flags: bit 0 = more chunks of this payload follow; bit 1 = the payload carries
                      several values (a :mod:`splitnn.wire.cut_codec` values payload; DATA/PUSH only)
        7       1     codec: the :mod:`splitnn.wire.compress` codec id of a DATA/PUSH payload
                      (0 ``none``; always 0 in other frames)
        8       8     id (u64): the tensor's id at its owner (pull key and reply key)
        16      8     total (u64): length of the whole payload across chunks

    A DATA payload with codec 0 (``none``) is one :mod:`splitnn.wire.tensor_codec` frame (dtype + shape header + raw
    bytes); for ``weights`` that tensor is 1-D uint8 and holds a safetensors state dict
    (:mod:`splitnn.wire.state_codec`), decoded by the receiver with the validating codec; for ``psi`` it is 1-D
    uint8 and holds one PSI message (parsed by the receiver's :mod:`splitnn.data.psi_messages`). With another codec the
    payload is that codec's self-describing payload, which must name the same codec. Several values crossing a cut
    at once (a skip connection over the cut) travel as one values payload (flag bit 1) whose entries are tensor
    frames or payloads of the frame's codec (:mod:`splitnn.wire.cut_codec`). Payloads above the chunk size are cut
    into several DATA frames, so no gRPC message exceeds the limits set in :class:`~splitnn.transport.Limits`. PUSH
    payloads are cut the same way. The receiver checks every header and the declared total against its limits
    *before* buffering, and decodes the payload with the validating codec.

    Copies. For gRPC the sender writes each frame with one copy of its bytes (header and a view of
    the tensor's memory joined into the ``bytes`` gRPC sends); a TCP link (:mod:`splitnn.transport.tcp`)
    takes the frame as its parts (``joined=False``: the header, then views of the tensor) and the
    kernel copies them from where they are. The receiver of a chunked tensor reads the tensor header
    from the first chunk, then copies each chunk's bytes straight into the new tensor's memory (no
    reassembly buffer, no second copy when it is complete); a whole tensor in a frame that is the
    receiver's own (``owned``: a TCP link receives each frame into memory of its own, its payload
    aligned where :func:`payload_start` says) becomes a tensor on that memory, without a copy.
    """

    type: int
    kind: str
    more: bool
    id: int
    total: int
    codec: int = NO_CODEC
    values: bool = False  # the payload is a values payload (several tensors)


#: A frame as the sender hands it to a stream: its bytes, or (``joined=False``) its parts in order.
Frame = bytes | tuple[bytes | memoryview, ...]


def frame_len(frame: Frame) -> int:
    """Bytes of ``frame`` on the wire (whole or in parts)."""
    if not isinstance(frame, tuple):
        return len(frame)
    total = 0
    for part in frame:  # (a loop, not a generator: this runs for every frame)
        total += len(part)
    return total


def payload_start(head: bytes | bytearray | memoryview) -> int:
    """Where, in a frame that begins with ``head``, the payload of the plain tensor it carries starts (0 when
    ``head`` is too short to say or the frame carries no whole plain tensor): a receiver that aligns this
    offset in memory of its own can decode the tensor in place (:func:`decode_tensor`'s ``borrow``)."""
    if len(head) < HEADER_SIZE + TENSOR_PREFIX_SIZE:
        return 0
    _, type_, _, flags, codec, _, _ = HEADER.unpack_from(head, 0)
    if type_ not in PAYLOAD_TYPES or codec != NO_CODEC or flags:
        return 0
    return HEADER_SIZE + header_size(head[HEADER_SIZE + TENSOR_PREFIX_SIZE - 1])


def _head(
    type_: int, kind: str, tensor_id: int, total: int, more: bool = False, codec: int = NO_CODEC, values: bool = False
) -> bytes:
    flags = (FLAG_MORE if more else 0) | (FLAG_VALUES if values else 0)
    return HEADER.pack(PEER_MAGIC, type_, KIND_CODES[kind], flags, codec, tensor_id, total)


def pack(
    type_: int, kind: str, tensor_id: int, total: int, chunk: bytes | memoryview = b"", more: bool = False
) -> bytes:
    """One frame: header followed by ``chunk``."""
    head = _head(type_, kind, tensor_id, total, more)
    return head + chunk if chunk else head


def request(kind: str, tensor_id: int) -> bytes:
    """Ask the peer for its tensor ``tensor_id``."""
    return pack(REQUEST, kind, tensor_id, 0)


def ack(entries: Sequence[tuple[str, int]]) -> bytes:
    """The ACK frame telling a pusher these pushes ``(kind, id)`` (at most :data:`MAX_ACKS`) arrived whole; with
    none, it asks the peer to acknowledge what it has now."""
    payload = bytearray(len(entries) * ACK_ENTRY.size)
    at = 0
    for kind, tensor_id in entries:  # (a loop, not a generator: a call less per push acknowledged)
        ACK_ENTRY.pack_into(payload, at, KIND_CODES[kind], tensor_id)
        at += ACK_ENTRY.size
    return pack(ACK, "activation", 0, len(payload), payload)


def acked(chunk: memoryview) -> list[tuple[str, int]]:
    """The ``(kind, id)`` entries of an ACK frame's chunk (checked by :func:`parse`). Raises :class:`WireError`."""
    out = []
    for code, tensor_id in ACK_ENTRY.iter_unpack(chunk):
        kind = CODE_KINDS.get(code)
        if kind is None:
            raise WireError(f"ACK peer frame names unknown kind code {code}")
        out.append((kind, tensor_id))
    return out


def error(kind: str, tensor_id: int, message: str) -> bytes:
    """Tell the peer its request for ``tensor_id`` failed."""
    text = message.encode("utf-8", "replace")[:MAX_ERROR_BYTES]
    return pack(ERROR, kind, tensor_id, len(text), text)


def abort(run_id: int, message: str) -> bytes:
    """Tell an adjacent peer that this worker's part of shipped epoch ``run_id`` failed."""
    text = message.encode("utf-8", "replace")[:MAX_ERROR_BYTES]
    return pack(ABORT, "activation", run_id, len(text), text)


def payload_frames(
    kind: str,
    tensor_id: int,
    parts: Sequence[bytes | memoryview],
    chunk_bytes: int,
    *,
    type_: int = DATA,
    codec: int = NO_CODEC,
    values: bool = False,
    joined: bool = True,
) -> Iterator[Frame]:
    """The DATA (or PUSH) frames carrying the payload ``b"".join(parts)``, cut at ``chunk_bytes``
    (``values``: it is a values payload).

    The payload is never joined as a whole: each frame is its header plus views of
    ``parts`` joined once, so every payload byte is copied exactly once here; with
    ``joined=False`` each frame is that tuple of header and views, not copied at all.
    A payload of one frame (the common case) is made at once, without a generator.
    """
    if type_ not in PAYLOAD_TYPES:
        raise ValueError(f"frame type {type_} carries no tensor")
    if codec not in CODEC_NAMES:
        raise ValueError(f"unknown codec id {codec}")
    views, total = [], 0
    for p in parts:  # (a loop, not comprehensions: this runs for every frame)
        if len(p):
            v = memoryview(p).cast("B")
            views.append(v)
            total += len(v)
    join = b"".join if joined else tuple
    if total <= chunk_bytes:
        return iter((join([_head(type_, kind, tensor_id, total, False, codec, values), *views]),))
    return _chunked_frames(kind, tensor_id, views, total, chunk_bytes, type_, codec, values, join)


def _chunked_frames(
    kind: str,
    tensor_id: int,
    views: list[memoryview],
    total: int,
    chunk_bytes: int,
    type_: int,
    codec: int,
    values: bool,
    join: Callable,
) -> Iterator[Frame]:
    """:func:`payload_frames` of a payload above ``chunk_bytes``: one frame per chunk, made as it is asked for."""
    sent = 0
    while sent < total:
        end = min(sent + chunk_bytes, total)
        pieces, pos = [_head(type_, kind, tensor_id, total, end < total, codec, values)], 0
        for v in views:  # the slices of the parts that fall in [sent, end)
            lo, hi = max(sent - pos, 0), min(end - pos, len(v))
            if lo < hi:
                pieces.append(v[lo:hi])
            pos += len(v)
        yield join(pieces)
        sent = end


def data_frames(
    kind: str,
    tensor_id: int,
    tensor: torch.Tensor,
    chunk_bytes: int,
    *,
    type_: int = DATA,
    codec: compress.Codec | str | None = None,
    joined: bool = True,
) -> Iterator[Frame]:
    """The DATA (or PUSH) frames carrying ``tensor`` (one unless it exceeds ``chunk_bytes``).

    ``codec`` (default ``none``) encodes the tensor first; a stateful sender (error
    feedback) encodes itself and calls :func:`payload_frames` with the codec's id.
    """
    if codec is None:  # (the common case, without a codec object per frame; payload_frames checks ``type_``)
        return payload_frames(kind, tensor_id, encode_tensor_parts(tensor), chunk_bytes, type_=type_, joined=joined)
    if type_ not in PAYLOAD_TYPES:
        raise ValueError(f"frame type {type_} carries no tensor")
    c = compress.get_codec(codec)
    parts = encode_tensor_parts(tensor) if c.id == NO_CODEC else (c.encode(tensor),)
    return payload_frames(kind, tensor_id, parts, chunk_bytes, type_=type_, codec=c.id, joined=joined)


def value_frames(
    kind: str,
    tensor_id: int,
    value: torch.Tensor | tuple | Encoded,
    chunk_bytes: int,
    *,
    type_: int = DATA,
    joined: bool = True,
) -> Iterator[Frame]:
    """The DATA (or PUSH) frames carrying what crosses a cut: a tensor (exactly :func:`data_frames`), a
    tuple of them (a values payload), or a value its sender encoded (:class:`~splitnn.wire.cut_codec.Encoded`:
    the frames name its codec)."""
    if isinstance(value, torch.Tensor):
        return data_frames(kind, tensor_id, value, chunk_bytes, type_=type_, joined=joined)
    encoded = cut_codec.encoded_of(value)
    parts = encoded.wire_parts()
    return payload_frames(
        kind, tensor_id, parts, chunk_bytes, type_=type_, codec=encoded.codec, values=encoded.several, joined=joined
    )


def parse(buf: bytes) -> tuple[FrameHeader, memoryview]:
    """Validate a frame's header; return it and a view of its chunk. Raises :class:`WireError`."""
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise WireError(f"peer frame must be bytes, got {type(buf).__name__}")
    if len(buf) < HEADER_SIZE:
        raise WireError(f"peer frame too short: {len(buf)} bytes, the header alone is {HEADER_SIZE}")
    magic, type_, kind_code, flags, codec, tensor_id, total = HEADER.unpack_from(buf, 0)
    if magic != PEER_MAGIC:
        raise WireError(f"not a peer frame: bad magic {bytes(magic)!r}")
    if type_ not in (REQUEST, DATA, ERROR, PUSH, ABORT, ACK):
        raise WireError(f"peer frame has unknown type {type_}")
    kind = CODE_KINDS.get(kind_code)
    if kind is None:
        raise WireError(f"peer frame has unknown kind code {kind_code}")
    if flags & ~(FLAG_MORE | FLAG_VALUES):
        raise WireError("peer frame has unknown flag bits set")
    if flags & FLAG_VALUES and type_ not in PAYLOAD_TYPES:
        raise WireError("only DATA and PUSH peer frames may carry several values")
    if codec not in CODEC_NAMES:
        raise WireError(f"peer frame names unknown codec id {codec}")
    if codec != NO_CODEC and type_ not in PAYLOAD_TYPES:
        raise WireError("only DATA and PUSH peer frames may name a codec")
    chunk = memoryview(buf)[HEADER_SIZE:]
    if type_ == REQUEST and (len(chunk) or total or flags):
        raise WireError("a REQUEST peer frame carries no payload")
    if type_ == ACK and (len(chunk) != total or total % ACK_ENTRY.size or total > MAX_ACKS * ACK_ENTRY.size or flags):
        raise WireError("malformed ACK peer frame")
    if type_ in TEXT_TYPES and (len(chunk) != total or total > MAX_ERROR_BYTES or flags):
        raise WireError("malformed ERROR/ABORT peer frame")
    return FrameHeader(type_, kind, bool(flags & FLAG_MORE), tensor_id, total, codec, bool(flags & FLAG_VALUES)), chunk


@dataclass
class _Partial:
    """A payload whose chunks are still arriving, written straight into its final memory."""

    total: int
    codec: int
    values: bool
    header: TensorHeader | None  # one plain tensor: the tensor header, read from the first chunk
    dest: torch.Tensor  # uint8: the tensor's payload (codec none) or the whole codec payload
    view: memoryview
    filled: int = 0


@dataclass
class Reassembler:
    """Collects the DATA chunks of one payload and decodes it once complete.

    The declared total is checked against ``max_tensor_bytes`` before anything is
    buffered; chunks must agree on the total, the codec and the values flag and may not
    overrun it.
    """

    max_tensor_bytes: int
    _parts: dict[int, _Partial] = field(default_factory=dict)

    def feed(self, hdr: FrameHeader, chunk: memoryview) -> torch.Tensor | tuple | None:
        """Add one DATA chunk; return the tensor (a tuple for several values) when its last chunk arrived,
        else None."""
        arrived = self.feed_arrival(hdr, chunk)
        return arrived.value if arrived is not None else None

    def feed_arrival(
        self, hdr: FrameHeader, chunk: memoryview, *, owned: bool = False, max_bytes: int | None = None
    ) -> Arrived | None:
        """:meth:`feed`, with the bytes the value took on the wire and its raw size (what the ledger records).
        ``owned``: the frame's memory is handed over (a whole tensor in it may become the tensor's memory).
        ``max_bytes``: a tighter bound than ``max_tensor_bytes`` on what the value may take decoded, checked
        against what its payload declares before anything is allocated for it."""
        cap = self.max_tensor_bytes if max_bytes is None else min(max_bytes, self.max_tensor_bytes)
        limit = cap + (VALUES_HEADER_ROOM if hdr.values else PAYLOAD_HEADER_ROOM)
        if hdr.total > limit:
            self._parts.pop(hdr.id, None)
            raise WireError(f"peer tensor #{hdr.id} declares {hdr.total} bytes; the limit is {limit}")
        part = self._parts.get(hdr.id)
        if part is None:
            if not hdr.more:  # the common case: one frame, no reassembly
                if len(chunk) != hdr.total:
                    raise WireError(f"peer tensor #{hdr.id}: frame holds {len(chunk)} bytes but declares {hdr.total}")
                return self._decode(hdr.codec, hdr.values, chunk, owned, cap)
            part, chunk = self._start(hdr, chunk)
        elif part.total != hdr.total or part.codec != hdr.codec or part.values != hdr.values:
            del self._parts[hdr.id]
            raise WireError(f"peer tensor #{hdr.id}: chunks disagree on its total length, codec or values flag")
        end = part.filled + len(chunk)
        if end > len(part.view):
            self._parts.pop(hdr.id, None)
            raise WireError(f"peer tensor #{hdr.id}: chunks overrun the declared {part.total} bytes")
        part.view[part.filled : end] = chunk
        part.filled = end
        if hdr.more:
            return None
        del self._parts[hdr.id]
        if part.filled != len(part.view):
            raise WireError(f"peer tensor #{hdr.id} truncated: got {part.filled} of {len(part.view)} payload bytes")
        if part.header is not None:
            t = tensor_from_payload(part.header, part.dest)
            return Arrived(t, part.header.payload_len, part.header.payload_len)
        return self._decode(part.codec, part.values, part.view, False, cap)

    def _start(self, hdr: FrameHeader, chunk: memoryview) -> tuple[_Partial, memoryview]:
        """The first chunk of a chunked payload: its destination, and the part of the chunk that goes there."""
        header = None
        if hdr.codec == NO_CODEC and not hdr.values:
            try:
                header = read_header(chunk, max_bytes=self.max_tensor_bytes)
            except WireError as exc:
                raise WireError(f"peer tensor #{hdr.id}: its first chunk must hold the tensor header: {exc}") from None
            if header.frame_len != hdr.total:
                raise WireError(
                    f"peer tensor #{hdr.id}: its header describes {header.frame_len} bytes but the frame "
                    f"declares {hdr.total}"
                )
            dest = payload_buffer(header)
            chunk = chunk[header.header_len :]
        else:
            dest = torch.empty(hdr.total, dtype=torch.uint8)  # pages are committed only as chunks fill them
        view = memoryview(dest.numpy()) if dest.numel() else memoryview(bytearray())
        part = _Partial(hdr.total, hdr.codec, hdr.values, header, dest, view)
        self._parts[hdr.id] = part
        return part, chunk

    def _decode(self, codec: int, values: bool, payload: memoryview, owned: bool, max_bytes: int) -> Arrived:
        if codec == NO_CODEC and not values:
            t = decode_tensor(payload, max_bytes=max_bytes, borrow=owned)
            nbytes = tensor_nbytes(t)
            return Arrived(t, nbytes, nbytes)
        return cut_codec.decode_payload(payload, codec, values, max_bytes=max_bytes)

    def drop(self, tensor_id: int) -> None:
        self._parts.pop(tensor_id, None)
