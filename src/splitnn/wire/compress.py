"""Codecs for a tensor at the cut: ``none``, ``fp16``, ``bf16``, ``int8`` and ``topk:RATIO``.

A codec turns a floating tensor (an activation or the gradient of one) into a smaller, self-describing
payload and back: :func:`get_codec` names one, :func:`decode` reads any payload, checking every length
against its header and the caller's limit before it reads a value (:class:`~splitnn.errors.WireError`
otherwise). The error feedback of a sparsifying codec is the sender's state, kept apart in
:class:`ErrorFeedback`. The ``none`` codec's payload is a plain :mod:`splitnn.wire.tensor_codec` frame
(``SNT1``); the layout of the others is written above ``_HEAD`` below.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch
from torch import Tensor

from splitnn.errors import ConfigurationError, WireError
from splitnn.wire import tensor_codec
from splitnn.wire.tensor_codec import DEFAULT_MAX_TENSOR_BYTES, DTYPE_CODES, MAX_NDIM

__all__ = [
    "CODEC_IDS",
    "CODEC_NAMES",
    "codec_name",
    "codec_spec",
    "MAGIC",
    "Codec",
    "NoCodec",
    "CastCodec",
    "Int8Codec",
    "TopKCodec",
    "ErrorFeedback",
    "get_codec",
    "decode",
    "codec_id_of",
]

MAGIC = b"SNC1"
#: Stable wire ids of the codecs. Never renumber: ids are protocol (a peer frame carries one).
CODEC_IDS: dict[str, int] = {"none": 0, "fp16": 1, "bf16": 2, "int8": 3, "topk": 4}
#: The codec of each wire id (the one place an id is named).
CODEC_NAMES: dict[int, str] = {v: k for k, v in CODEC_IDS.items()}
#: Dtypes a lossy codec accepts (and restores on decode).
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

#: A ``topk`` payload keeps at least one value in this many (``topk:RATIO`` needs RATIO >= 1/this): what a
#: payload of k values may declare, and so what it takes decoded, is bounded by its own size (at most
#: about 680 times it), checked before anything is allocated.
TOPK_MAX_SPARSITY = 1024

# Payload layout (all integers little-endian)::
#
#     offset  size        field
#     0       4           magic b"SNC1"
#     4       1           codec id (see :data:`CODEC_IDS`; ``none`` payloads are plain tensor frames instead)
#     5       1           dtype code of the original tensor (:data:`splitnn.wire.tensor_codec.DTYPE_CODES`)
#     6       1           ndim
#     7       1           reserved, 0
#     8       8 * ndim    shape, one u64 per dimension
#     ...                 codec parameters and body:
#
#     fp16, bf16  numel x 2 bytes: the values cast to float16 / bfloat16
#     int8        rows x f32 scale, rows x f32 zero point (the row's minimum), numel x u8 codes;
#                 rows = shape[0] (one row for a 0-d or 1-d tensor); value = code x scale + zero point
#     topk        u64 k, u8 index width (4 or 8), 7 bytes reserved (0), k indices (int32/int64, strictly
#                 increasing, into the flattened tensor), k values in the original dtype; the rest is 0.
#                 k is at least one in :data:`TOPK_MAX_SPARSITY` values (a ratio >= 1/1024), so that a
#                 small payload cannot declare a huge tensor
#
_HEAD = struct.Struct("<4sBBBB")  # magic, codec id, dtype code, ndim, reserved
_TOPK = struct.Struct("<QB7x")  # k, index width, reserved
_CODE_TO_DTYPE = {code: dt for dt, code in DTYPE_CODES.items()}


class Codec:
    """A tensor codec. ``encode(t)`` -> payload, ``decode(payload)`` -> tensor, ``nbytes(t)`` -> payload size."""

    name: str = ""

    @property
    def id(self) -> int:
        """The codec's wire id."""
        return CODEC_IDS[self.name]

    @property
    def spec(self) -> str:
        """The text that names this codec (what :func:`get_codec` parses)."""
        return self.name

    def encode(self, t: Tensor) -> bytes:
        raise NotImplementedError

    def nbytes(self, t: Tensor) -> int:
        """Length of ``encode(t)``, computed from ``t``'s shape and dtype alone."""
        raise NotImplementedError

    def decode(self, payload: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_TENSOR_BYTES) -> Tensor:
        """Decode a payload of this codec (WireError if it is another codec's or malformed)."""
        if codec_id_of(payload) != self.id:
            raise WireError(f"payload is not a {self.name} payload")
        return decode(payload, max_bytes=max_bytes)

    def __repr__(self) -> str:
        return f"Codec({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)


class NoCodec(Codec):
    """``none``: the tensor as it is (a plain :mod:`~splitnn.wire.tensor_codec` frame)."""

    name = "none"

    def encode(self, t: Tensor) -> bytes:
        return tensor_codec.encode_tensor(t)

    def nbytes(self, t: Tensor) -> int:
        return tensor_codec.header_size(t.dim()) + tensor_codec.tensor_nbytes(t)


def _header(codec_id: int, t: Tensor) -> bytes:
    return _HEAD.pack(MAGIC, codec_id, DTYPE_CODES[t.dtype], t.dim(), 0) + struct.pack(f"<{t.dim()}Q", *t.shape)


def _header_len(ndim: int) -> int:
    return _HEAD.size + 8 * ndim


def _floating(codec: Codec, t: Tensor) -> Tensor:
    if not isinstance(t, Tensor):
        raise ConfigurationError(f"codec {codec.spec!r} encodes torch tensors, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ConfigurationError(
            f"codec {codec.spec!r} compresses floating tensors only, not {t.dtype}; use 'none' for this tensor"
        )
    if t.dim() > MAX_NDIM:
        raise ConfigurationError(f"codec {codec.spec!r}: a tensor of {t.dim()} dimensions exceeds the limit {MAX_NDIM}")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous()


def _raw(t: Tensor) -> bytes:
    """The raw little-endian bytes of a contiguous CPU tensor."""
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


@dataclass(frozen=True, eq=False)
class CastCodec(Codec):
    """``fp16`` / ``bf16``: the values cast to a 16-bit float (exactly ``t.to(dtype)``), restored on decode."""

    name: str = "fp16"

    def __post_init__(self) -> None:
        if self.name not in ("fp16", "bf16"):
            raise ConfigurationError(f"a cast codec is 'fp16' or 'bf16', not {self.name!r}")

    @property
    def wire_dtype(self) -> torch.dtype:
        return torch.float16 if self.name == "fp16" else torch.bfloat16

    def encode(self, t: Tensor) -> bytes:
        t = _floating(self, t)
        return _header(self.id, t) + _raw(t.to(self.wire_dtype))

    def nbytes(self, t: Tensor) -> int:
        return _header_len(t.dim()) + 2 * t.numel()


def _rows(shape: tuple[int, ...]) -> int:
    return shape[0] if len(shape) >= 2 else (1 if math.prod(shape) else 0)


class Int8Codec(Codec):
    """``int8``: per row (the first dimension), 8-bit codes with a float32 scale and zero point.

    ``scale = (max - min) / 255`` and ``zero point = min`` per row; each value becomes
    ``round((x - min) / scale)`` in 0..255 and decodes to ``code x scale + min``, so the error
    is at most ``scale / 2`` per element (plus float32 rounding). A constant row decodes exactly.
    Refuses non-finite values (they have no 8-bit code).
    """

    name = "int8"

    def encode(self, t: Tensor) -> bytes:
        t = _floating(self, t)
        rows = _rows(tuple(t.shape))
        x = t.reshape(rows, -1).to(torch.float32) if rows else t.reshape(0, 0).float()
        if not bool(torch.isfinite(x).all()):
            raise ConfigurationError("codec 'int8' cannot carry inf or nan values; use 'none' or 'fp16'")
        if rows and x.shape[1]:
            lo, hi = x.min(dim=1).values, x.max(dim=1).values
        else:
            lo = hi = torch.zeros(rows)
        scale = (hi - lo) / 255
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.round((x - lo[:, None]) / safe[:, None]).clamp_(0, 255).to(torch.uint8)
        return _header(self.id, t) + _raw(scale) + _raw(lo) + _raw(codes)

    def nbytes(self, t: Tensor) -> int:
        return _header_len(t.dim()) + 8 * _rows(tuple(t.shape)) + t.numel()


@dataclass(frozen=True, eq=False)
class TopKCodec(Codec):
    """``topk:RATIO``: only the ``k = ceil(RATIO x numel)`` values of largest magnitude, with their indices.

    Everything else decodes to 0. Pair it with :class:`ErrorFeedback` on the sender so
    that what is dropped is not lost but added to the next tensor.
    """

    ratio: float = 0.01
    name: str = "topk"

    def __post_init__(self) -> None:
        if not (isinstance(self.ratio, (int, float)) and 1 / TOPK_MAX_SPARSITY <= self.ratio <= 1):
            raise ConfigurationError(
                f"topk ratio must be in [1/{TOPK_MAX_SPARSITY}, 1], got {self.ratio!r}; e.g. 'topk:0.1'"
            )

    @property
    def spec(self) -> str:
        return f"topk:{self.ratio:g}"

    def k(self, numel: int) -> int:
        """How many values a tensor of ``numel`` elements keeps."""
        return min(numel, max(1, math.ceil(self.ratio * numel))) if numel else 0

    def encode(self, t: Tensor) -> bytes:
        t = _floating(self, t)
        flat = t.reshape(-1)
        k = self.k(flat.numel())
        idx = torch.topk(flat.abs().float(), k, sorted=False).indices.sort().values if k else flat.new_zeros(0).long()
        width = 4 if flat.numel() <= 2**31 else 8
        index_bytes = _raw(idx.to(torch.int32 if width == 4 else torch.int64))
        return _header(self.id, t) + _TOPK.pack(k, width) + index_bytes + _raw(flat[idx])

    def nbytes(self, t: Tensor) -> int:
        k, width = self.k(t.numel()), 4 if t.numel() <= 2**31 else 8
        return _header_len(t.dim()) + _TOPK.size + k * (width + t.element_size())


@dataclass
class ErrorFeedback:
    """The sender's memory for a lossy codec (error feedback, as in EF-SGD).

    ``encode(t)`` sends ``t`` plus what earlier encodings dropped, and keeps the new
    residual ``(t + residual) - decode(payload)``. One object per stream (one cut, one
    direction). A tensor of another shape than the residual's starts afresh (the
    residual of a batch of another size has no meaning for this one).
    """

    codec: Codec
    residual: Tensor | None = None

    def encode(self, t: Tensor) -> bytes:
        t = t.detach()
        if self.residual is not None and self.residual.shape == t.shape and self.residual.dtype == t.dtype:
            t = t + self.residual
        payload = self.codec.encode(t)
        self.residual = t - decode(payload).to(t.device)
        return payload

    def reset(self) -> None:
        self.residual = None


def get_codec(spec: str | Codec | None) -> Codec:
    """A codec from its name: ``none``, ``fp16``, ``bf16``, ``int8`` or ``topk:RATIO``; ConfigurationError otherwise."""
    if isinstance(spec, Codec):
        return spec
    if spec is None:
        return NoCodec()
    if not isinstance(spec, str):
        raise ConfigurationError(f"a codec is named by a string such as 'fp16' or 'topk:0.1', got {spec!r}")
    name, sep, arg = spec.strip().partition(":")
    if name == "topk":
        try:
            ratio = float(arg)
        except ValueError:
            raise ConfigurationError(
                f"codec {spec!r}: write topk:RATIO with 1/1024 <= RATIO <= 1, e.g. 'topk:0.1'"
            ) from None
        return TopKCodec(ratio)
    if sep:
        raise ConfigurationError(f"codec {name!r} takes no parameter (got {spec!r})")
    if name == "none":
        return NoCodec()
    if name in ("fp16", "bf16"):
        return CastCodec(name)
    if name == "int8":
        return Int8Codec()
    raise ConfigurationError(f"unknown codec {spec!r}; known: none, fp16, bf16, int8, topk:RATIO")


def codec_spec(spec: str | Codec | None, where: str | None = None) -> str:
    """The canonical name of codec ``spec`` (``"none"`` for no codec, ``"topk:0.1"``...); ConfigurationError,
    prefixed by ``where`` when given, for anything :func:`get_codec` does not know."""
    try:
        return get_codec(spec).spec
    except ConfigurationError as exc:
        if where is None:
            raise
        raise ConfigurationError(f"{where}: {exc}") from None


def codec_name(codec_id: int) -> str:
    """The name of the codec with wire id ``codec_id`` (the number itself, as text, for an unknown id)."""
    return CODEC_NAMES.get(codec_id, str(codec_id))


# ------------------------------------------------------------------------------ decoding
def codec_id_of(payload: bytes | bytearray | memoryview) -> int:
    """The codec id a payload says it carries (``none`` for a plain tensor frame); WireError if neither."""
    mv = tensor_codec.byte_view(payload, "a codec payload")
    if bytes(mv[:4]) == tensor_codec.MAGIC:
        return CODEC_IDS["none"]
    if len(mv) < _HEAD.size or bytes(mv[:4]) != MAGIC:
        raise WireError("not a codec payload: bad magic or too short")
    if mv[4] not in CODEC_NAMES or mv[4] == CODEC_IDS["none"]:
        raise WireError(f"codec payload names unknown codec id {mv[4]}")
    return mv[4]


def _tensor_from(mv: memoryview, dtype: torch.dtype, count: int) -> Tensor:
    """``count`` values of ``dtype`` from ``mv`` (whose length the caller checked), in fresh memory."""
    if count == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(mv), dtype=dtype)


def decode(payload: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_TENSOR_BYTES) -> Tensor:
    """Decode any codec's payload into a tensor of the original dtype and shape.

    Checks magic, codec id, dtype, rank, the decoded size against ``max_bytes`` and the
    exact body length for that shape before reading a value; ``int8`` scales and zero
    points must be finite (scales >= 0) and ``topk`` indices strictly increasing and in range.
    Raises :class:`WireError` naming the problem.
    """
    mv = tensor_codec.byte_view(payload, "a codec payload")
    codec_id = codec_id_of(mv)
    if codec_id == CODEC_IDS["none"]:
        return tensor_codec.decode_tensor(mv, max_bytes=max_bytes)
    name = CODEC_NAMES[codec_id]
    _, _, code, ndim, reserved = _HEAD.unpack_from(mv, 0)
    dtype = _CODE_TO_DTYPE.get(code)
    if dtype not in FLOAT_DTYPES:
        raise WireError(f"{name} payload declares dtype code {code}; a codec carries floating tensors only")
    if reserved:
        raise WireError(f"{name} payload has a non-zero reserved byte")
    if ndim > MAX_NDIM:
        raise WireError(f"{name} payload has {ndim} dimensions; the limit is {MAX_NDIM}")
    hlen = _header_len(ndim)
    if len(mv) < hlen:
        raise WireError(f"{name} payload truncated in its shape: {len(mv)} bytes, the header needs {hlen}")
    shape = struct.unpack_from(f"<{ndim}Q", mv, _HEAD.size)
    itemsize = dtype.itemsize
    numel = 1
    for d in shape:
        if d * itemsize > max_bytes:  # each dimension too (a zero elsewhere must not let a huge one through)
            raise WireError(f"{name} payload's dimension {d} of {dtype} exceeds the {max_bytes}-byte limit")
        numel *= d  # Python ints: no overflow
        if numel * itemsize > max_bytes:
            raise WireError(f"{name} payload's shape {tuple(shape)} of {dtype} exceeds the {max_bytes}-byte limit")
    body = mv[hlen:]
    if name in ("fp16", "bf16"):
        _expect(name, len(body), 2 * numel)
        wire = torch.float16 if name == "fp16" else torch.bfloat16
        return _tensor_from(body, wire, numel).to(dtype).reshape(shape)
    if name == "int8":
        rows = _rows(shape)
        _expect(name, len(body), 8 * rows + numel)
        scale = _tensor_from(body[: 4 * rows], torch.float32, rows)
        lo = _tensor_from(body[4 * rows : 8 * rows], torch.float32, rows)
        if not (bool(torch.isfinite(scale).all()) and bool(torch.isfinite(lo).all()) and bool((scale >= 0).all())):
            raise WireError("int8 payload has a non-finite or negative scale or zero point")
        codes = _tensor_from(body[8 * rows :], torch.uint8, numel)
        values = codes.reshape(rows, -1).float() * scale[:, None] + lo[:, None] if rows else codes.float()
        return values.to(dtype).reshape(shape)
    # topk
    if len(body) < _TOPK.size:
        raise WireError(f"topk payload truncated: {len(body)} bytes after the shape, its parameters need {_TOPK.size}")
    if bytes(body[9 : _TOPK.size]).strip(b"\x00"):
        raise WireError("topk payload has non-zero reserved bytes")
    k, width = _TOPK.unpack_from(body, 0)
    if width not in (4, 8):
        raise WireError(f"topk payload has index width {width}; expected 4 or 8")
    if k > numel:
        raise WireError(f"topk payload keeps {k} values of a tensor of {numel}")
    if numel > k * TOPK_MAX_SPARSITY:
        raise WireError(
            f"topk payload keeps {k} values of a tensor of {numel}: a topk payload keeps at least one value in "
            f"{TOPK_MAX_SPARSITY}, so it may declare at most {k * TOPK_MAX_SPARSITY} (refused before decoding)"
        )
    _expect(name, len(body), _TOPK.size + k * (width + itemsize))
    start = _TOPK.size
    idx = _tensor_from(body[start : start + k * width], torch.int32 if width == 4 else torch.int64, k).long()
    if k and (int(idx[0]) < 0 or int(idx[-1]) >= numel or (k > 1 and not bool((idx[1:] > idx[:-1]).all()))):
        raise WireError(f"topk payload's indices must be strictly increasing within 0..{numel - 1}")
    values = _tensor_from(body[start + k * width :], dtype, k)
    out = torch.zeros(numel, dtype=dtype)
    out[idx] = values
    return out.reshape(shape)


def _expect(name: str, got: int, want: int) -> None:
    if got != want:
        raise WireError(f"{name} payload body is {got} bytes; its header says it must be exactly {want}")
