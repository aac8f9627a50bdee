"""What crosses a cut, as its sender encodes it: one tensor or several, each plain or compressed.

A value at a cut is one tensor or a tuple of them (:mod:`splitnn.workers.values`); where the cut has a
codec (:mod:`splitnn.wire.compress`) every floating tensor takes it, others (indices, masks) cross plain.
:class:`CutEncoder` is the sender's side of one cut in one direction (the codec and each value's error
feedback); it gives an :class:`Encoded`: each tensor's payload bytes and the counts the ledger records
(``nbytes`` sent, ``raw`` uncompressed). In process the receiver decodes those bytes
(:meth:`Encoded.decode`), a networked worker sends them (:meth:`Encoded.wire_parts`): both compute on
identical numbers. One tensor travels as a tensor frame or one codec payload; several as one values
payload, whose layout is written above ``MAGIC`` below.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from splitnn.errors import ConfigurationError, WireError
from splitnn.wire import compress, tensor_codec
from splitnn.wire.compress import FLOAT_DTYPES, Codec, ErrorFeedback, NoCodec, TopKCodec, codec_name, get_codec
from splitnn.wire.tensor_codec import DEFAULT_MAX_TENSOR_BYTES, tensor_nbytes

__all__ = [
    "MAGIC",
    "MAX_VALUES",
    "VALUES_HEADER_ROOM",
    "Arrived",
    "CutEncoder",
    "Encoded",
    "decode_payload",
    "decode_values",
    "encoded_of",
    "plain",
]

# A values payload: several values at a cut (the peer frame's ``values`` flag; all integers little-endian)::
#
#     offset     size     field
#     0          4        magic b"SNV1"
#     4          1        count n, 1..MAX_VALUES
#     5          3        reserved, 0
#     8          16 x n   per value: u8 flags (bit 0: present, bit 1: requires a gradient),
#                         7 bytes reserved (0), u64 length of its body (0 when absent)
#     8 + 16n    ...      the bodies of the present values, in order: each a tensor frame
#                         (``SNT1``) or a payload of the frame's codec (``SNC1``)
#
# "Requires a gradient" tells the receiver which values send a gradient back (the rule of
# :mod:`splitnn.workers.values`). :func:`decode_values` checks every length, flag and codec
# against the header, the frame and the caller's limit before it decodes a value, and
# raises :class:`~splitnn.errors.WireError` naming the problem.
MAGIC = b"SNV1"
#: Most values one crossing may carry.
MAX_VALUES = 64
PRESENT, REQUIRES_GRAD = 1, 2

_HEAD = struct.Struct("<4sB3x")  # magic, count, reserved
_ENTRY = struct.Struct("<B7xQ")  # flags, reserved, body length
#: Bytes a values payload may need beyond its tensors' data: its header, entry table and each body's own header.
VALUES_HEADER_ROOM = _HEAD.size + MAX_VALUES * (_ENTRY.size + 256)

Value = Tensor | tuple  # a tensor, or a tuple of tensors (None entries in gradients)


class Arrived(NamedTuple):
    """A value as its receiver decoded it, with the bytes it took on the wire and its raw size (for the ledger)."""

    value: Tensor | tuple
    nbytes: int
    raw: int


@dataclass(frozen=True, eq=False)
class Encoded:
    """A value at a cut as its sender encoded it (:class:`CutEncoder` makes it).

    ``entries`` holds, per value, the codec payload (bytes) of a compressed tensor, the
    tensor itself (detached) of a plain one, or ``None``; ``several`` whether the value is
    a tuple; ``codec`` the wire id of the codec of its compressed entries (0: none is).
    """

    entries: tuple[bytes | Tensor | None, ...]
    requires_grad: tuple[bool, ...]
    several: bool
    codec: int
    nbytes: int
    raw: int

    def decode(self) -> Tensor | tuple:
        """The value the receiver computes on (what a networked receiver decodes from the same bytes)."""
        out: list[Tensor | None] = []
        for entry, grad in zip(self.entries, self.requires_grad):
            if entry is None:
                out.append(None)
                continue
            t = entry.detach() if isinstance(entry, Tensor) else compress.decode(entry)
            out.append(t.requires_grad_() if grad else t)
        return tuple(out) if self.several else out[0]

    def arrived(self) -> Arrived:
        """:meth:`decode`, with the byte counts."""
        return Arrived(self.decode(), self.nbytes, self.raw)

    def wire_parts(self) -> list[bytes | memoryview]:
        """The payload of the peer frames that carry this value (their codec: :attr:`codec`; a values payload
        when :attr:`several`)."""
        if not self.several:
            entry = self.entries[0]
            return list(tensor_codec.encode_tensor_parts(entry)) if isinstance(entry, Tensor) else [entry]
        bodies: list[list[bytes | memoryview]] = []
        table = [_HEAD.pack(MAGIC, len(self.entries))]
        for entry, grad in zip(self.entries, self.requires_grad):
            if entry is None:
                table.append(_ENTRY.pack(0, 0))
                continue
            parts = list(tensor_codec.encode_tensor_parts(entry)) if isinstance(entry, Tensor) else [entry]
            bodies.append(parts)
            table.append(_ENTRY.pack(PRESENT | (REQUIRES_GRAD if grad else 0), sum(len(p) for p in parts)))
        return [b"".join(table), *(p for parts in bodies for p in parts)]


class CutEncoder:
    """The sender's side of one cut in one direction: its codec, and the error feedback of each value.

    Floating tensors are encoded with ``codec``, everything else crosses plain. A ``topk``
    codec keeps what it dropped and adds it to the next tensor of the same value index
    (:class:`~splitnn.wire.compress.ErrorFeedback`), unless ``feedback=False`` (evaluation:
    the state is neither used nor changed).
    """

    def __init__(self, codec: str | Codec) -> None:
        self.codec = get_codec(codec)
        self._feedback: dict[int, ErrorFeedback] = {}

    def __repr__(self) -> str:
        return f"CutEncoder({self.codec.spec!r})"

    @property
    def spec(self) -> str:
        return self.codec.spec

    def reset(self) -> None:
        """Forget the error feedback."""
        self._feedback.clear()

    def feedback_state(self) -> dict[int, Tensor]:
        """The error feedback's residuals, by value index (what a checkpoint keeps; empty without any)."""
        return {i: fb.residual for i, fb in sorted(self._feedback.items()) if fb.residual is not None}

    def load_feedback_state(self, residuals: dict[int, Tensor]) -> None:
        """Replace the error feedback with ``residuals`` (from :meth:`feedback_state`)."""
        self._feedback = {i: ErrorFeedback(self.codec, r) for i, r in residuals.items()}

    def encode(self, value: Value, *, feedback: bool = True) -> Encoded:
        several = type(value) is tuple
        items = value if several else (value,)
        lossy = not isinstance(self.codec, NoCodec)
        entries: list[bytes | Tensor | None] = []
        grads: list[bool] = []
        nbytes = raw = 0
        compressed = False
        for i, t in enumerate(items):
            if t is None:
                entries.append(None)
                grads.append(False)
                continue
            if not isinstance(t, Tensor):
                raise ConfigurationError(f"only tensors cross a cut, got a {type(t).__name__} as value {i}")
            size = tensor_nbytes(t)
            raw += size
            grads.append(bool(t.requires_grad))
            if lossy and t.dtype in FLOAT_DTYPES:
                if feedback and isinstance(self.codec, TopKCodec):
                    fb = self._feedback.get(i)
                    if fb is None:
                        fb = self._feedback[i] = ErrorFeedback(self.codec)
                    payload = fb.encode(t)
                else:
                    payload = self.codec.encode(t)
                entries.append(payload)
                nbytes += len(payload)
                compressed = True
            else:
                entries.append(t.detach())
                nbytes += size
        codec = self.codec.id if compressed else compress.CODEC_IDS["none"]
        return Encoded(tuple(entries), tuple(grads), several, codec, nbytes, raw)


def plain(value: Value) -> Encoded:
    """``value`` encoded without a codec (how several values cross a cut that compresses nothing)."""
    return _PLAIN.encode(value)


_PLAIN = CutEncoder(NoCodec())


# ------------------------------------------------------------------------------ decoding
def decode_payload(
    payload: bytes | bytearray | memoryview, codec: int, several: bool, *, max_bytes: int = DEFAULT_MAX_TENSOR_BYTES
) -> Arrived:
    """Decode what one peer payload carries: a values payload (``several``), or one tensor frame (``codec`` 0)
    or codec payload (``codec``: its wire id, which the payload must name)."""
    if several:
        return decode_values(payload, codec, max_bytes=max_bytes)
    mv = tensor_codec.byte_view(payload, "a payload")
    if codec == compress.CODEC_IDS["none"]:
        t = tensor_codec.decode_tensor(mv, max_bytes=max_bytes)
        return Arrived(t, tensor_nbytes(t), tensor_nbytes(t))
    if compress.codec_id_of(mv) != codec:
        raise WireError(
            f"peer frame says codec {codec_name(codec)!r} but its payload is another codec's (or a plain tensor)"
        )
    t = compress.decode(mv, max_bytes=max_bytes)
    return Arrived(t, len(mv), tensor_nbytes(t))


def decode_values(
    payload: bytes | bytearray | memoryview, codec: int, *, max_bytes: int = DEFAULT_MAX_TENSOR_BYTES
) -> Arrived:
    """Decode a values payload whose compressed entries must be of codec ``codec`` (a wire id; 0: none may be).

    ``max_bytes`` bounds the decoded tensors together. Returns the tuple with the bytes the
    ledger counts (each compressed body's length, each plain tensor's raw bytes) and its raw size.
    """
    mv = tensor_codec.byte_view(payload, "a payload")
    if len(mv) < _HEAD.size or bytes(mv[:4]) != MAGIC:
        raise WireError("not a values payload: bad magic or too short")
    magic, count = _HEAD.unpack_from(mv, 0)
    if bytes(mv[5:8]).strip(b"\x00"):
        raise WireError("values payload has non-zero reserved bytes")
    if not 0 < count <= MAX_VALUES:
        raise WireError(f"values payload carries {count} values; expected 1..{MAX_VALUES}")
    body_start = _HEAD.size + count * _ENTRY.size
    if len(mv) < body_start:
        raise WireError(f"values payload truncated in its table: {len(mv)} bytes, the table needs {body_start}")
    table = []
    for i in range(count):
        at = _HEAD.size + i * _ENTRY.size
        flags, length = _ENTRY.unpack_from(mv, at)
        if bytes(mv[at + 1 : at + 8]).strip(b"\x00") or flags & ~(PRESENT | REQUIRES_GRAD):
            raise WireError(f"values payload: value {i} has unknown flags or non-zero reserved bytes")
        if not flags & PRESENT and (flags or length):
            raise WireError(f"values payload: absent value {i} declares a body or a gradient")
        if flags & PRESENT and length == 0:
            raise WireError(f"values payload: value {i} is present but has an empty body")
        table.append((flags, length))
    if sum(length for _, length in table) != len(mv) - body_start:
        raise WireError(
            f"values payload: its table declares {sum(length for _, length in table)} body bytes but "
            f"{len(mv) - body_start} follow"
        )
    out: list[Tensor | None] = []
    nbytes = raw = 0
    budget, at = max_bytes, body_start
    for i, (flags, length) in enumerate(table):
        if not flags & PRESENT:
            out.append(None)
            continue
        body = mv[at : at + length]
        at += length
        entry_codec = compress.codec_id_of(body)
        if entry_codec == compress.CODEC_IDS["none"]:
            t = tensor_codec.decode_tensor(body, max_bytes=budget)
            nbytes += tensor_nbytes(t)
        elif entry_codec != codec:
            raise WireError(
                f"values payload: value {i} is a {codec_name(entry_codec)} payload but the frame says "
                f"{codec_name(codec)!r}"
            )
        else:
            t = compress.decode(body, max_bytes=budget)
            nbytes += length
        raw += tensor_nbytes(t)
        budget -= tensor_nbytes(t)
        if flags & REQUIRES_GRAD:
            if t.dtype not in FLOAT_DTYPES:
                raise WireError(f"values payload: value {i} is {t.dtype} and cannot require a gradient")
            t.requires_grad_()
        out.append(t)
    return Arrived(tuple(out), nbytes, raw)


def encoded_of(value: Value | Encoded) -> Encoded:
    """``value`` as what crosses the wire: itself if encoded already, else :func:`plain`."""
    return value if isinstance(value, Encoded) else plain(value)
