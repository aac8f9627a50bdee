"""Tensor <-> bytes codec: a small fixed header followed by the raw little-endian bytes.

Nothing executable crosses the wire: a tensor travels as dtype + shape + raw bytes,
never as a pickle. Frame layout (all integers little-endian)::

    offset  size        field
    0       4           magic  b"SNT1"
    4       1           dtype code (u8), see :data:`DTYPE_CODES`
    5       1           ndim (u8)
    6       8 * ndim    shape, one u64 per dimension
    6+8*ndim  nbytes    payload: numel * itemsize raw bytes, C order

The decoder validates the whole header against the buffer length and the caller's
limits *before* it interprets any payload byte, and always returns a tensor that
owns fresh, writable memory.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from splitnn.errors import WireError

__all__ = [
    "MAGIC",
    "DTYPE_CODES",
    "DEFAULT_ALLOWED",
    "DEFAULT_MAX_TENSOR_BYTES",
    "MAX_NDIM",
    "TensorHeader",
    "encode_tensor",
    "encode_tensor_parts",
    "decode_tensor",
    "read_header",
    "header_size",
    "tensor_nbytes",
    "byte_view",
    "payload_buffer",
    "tensor_from_payload",
]

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("splitnn.wire.tensor_codec supports little-endian hosts only")

MAGIC: bytes = b"SNT1"
"""The four bytes every tensor frame starts with."""

#: Stable wire codes of the dtypes a frame may carry. Never renumber: codes are protocol.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float64: 2,
    torch.float16: 3,
    torch.bfloat16: 4,
    torch.int64: 5,
    torch.int32: 6,
    torch.int16: 7,
    torch.int8: 8,
    torch.uint8: 9,
    torch.bool: 10,
}
_CODE_TO_DTYPE: dict[int, torch.dtype] = {code: dt for dt, code in DTYPE_CODES.items()}
_ITEMSIZE: dict[torch.dtype, int] = {dt: torch.empty((), dtype=dt).element_size() for dt in DTYPE_CODES}

#: Dtypes :func:`decode_tensor` accepts unless told otherwise (all dtypes the format knows).
DEFAULT_ALLOWED: frozenset[torch.dtype] = frozenset(DTYPE_CODES)

#: Largest payload :func:`decode_tensor` accepts unless told otherwise (1 GiB).
DEFAULT_MAX_TENSOR_BYTES: int = 1 << 30

#: Most dimensions a frame may have unless told otherwise.
MAX_NDIM: int = 8

_PREFIX = struct.Struct("<4sBB")  # magic, dtype code, ndim
_PREFIX_SIZE = _PREFIX.size  # 6
#: Bytes of a frame's header before its shape (magic, dtype code, ndim: the last of them).
TENSOR_PREFIX_SIZE = _PREFIX_SIZE
_DIM_SIZE = 8
_SHAPE_STRUCTS = [struct.Struct(f"<{n}Q") for n in range(256)]


class TensorHeader(NamedTuple):
    """What a validated frame header says."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    header_len: int
    payload_len: int

    @property
    def frame_len(self) -> int:
        """Total length of the frame: header plus payload."""
        return self.header_len + self.payload_len


def header_size(ndim: int) -> int:
    """Length in bytes of the header of a frame with ``ndim`` dimensions."""
    return _PREFIX_SIZE + _DIM_SIZE * ndim


def tensor_nbytes(t: Tensor) -> int:
    """Raw size of ``t``'s data, ``numel * element_size``: the number the byte ledger counts."""
    return t.numel() * t.element_size()


def _prepare(t: Tensor, max_ndim: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise WireError(f"encode_tensor expects a torch.Tensor, got {type(t).__name__}")
    if t.layout is not torch.strided:
        raise WireError(f"cannot encode a tensor with layout {t.layout}; convert it with .to_dense() first")
    if t.dtype not in DTYPE_CODES:
        known = ", ".join(str(d).removeprefix("torch.") for d in DTYPE_CODES)
        raise WireError(f"cannot encode dtype {t.dtype}: the wire format carries only {known}")
    if t.dim() > max_ndim:
        raise WireError(f"cannot encode a tensor with {t.dim()} dimensions; the limit is {max_ndim}")
    if t.requires_grad:
        t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if not t.is_contiguous():
        t = t.contiguous()
    return t


def _header(t: Tensor) -> bytes:
    ndim = t.dim()
    return _PREFIX.pack(MAGIC, DTYPE_CODES[t.dtype], ndim) + _SHAPE_STRUCTS[ndim].pack(*t.shape)


def encode_tensor_parts(t: Tensor, *, max_ndim: int = MAX_NDIM) -> tuple[bytes, memoryview]:
    """Encode ``t`` as ``(header, payload)`` without copying the payload when possible.

    The payload is a read-only byte view of ``t``'s memory (of a contiguous CPU copy when
    ``t`` is on another device or not contiguous). It stays valid as long as the view
    lives and must not be used after the tensor is modified in place.
    Raises :class:`WireError` for a dtype, layout or rank the format cannot carry.
    """
    t = _prepare(t, max_ndim)
    header = _header(t)
    return header, _payload_view(t)


def _payload_view(t: Tensor) -> memoryview:
    """Read-only byte view of a contiguous CPU tensor's data (the ndarray keeps it alive)."""
    if t.numel() == 0:
        return memoryview(b"")
    if t.dtype is torch.bfloat16:  # numpy has no bfloat16: view the storage as uint8
        t = t.reshape(-1).view(torch.uint8)
    return memoryview(t.numpy()).cast("B").toreadonly()


def encode_tensor(t: Tensor, *, max_ndim: int = MAX_NDIM) -> bytes:
    """Encode ``t`` as one frame: header followed by its raw little-endian bytes.

    Gradient tracking is dropped; device tensors are copied to the CPU.
    Raises :class:`WireError` for a dtype, layout or rank the format cannot carry.
    """
    t = _prepare(t, max_ndim)
    return b"".join((_header(t), _payload_view(t)))


def byte_view(buf: bytes | bytearray | memoryview, what: str = "a tensor frame") -> memoryview:
    """``buf`` as a flat view of unsigned bytes (no copy); WireError naming ``what`` unless it is a contiguous
    bytes-like buffer. Every decoder of this package reads its input through this."""
    try:
        mv = memoryview(buf)
    except TypeError:
        raise WireError(f"{what} must be bytes-like, got {type(buf).__name__}") from None
    if not mv.c_contiguous:
        raise WireError(f"{what} must be a contiguous buffer")
    return mv.cast("B") if (mv.format != "B" or mv.ndim != 1) else mv


def _resolve_allowed(allowed_dtypes: Iterable[torch.dtype] | None) -> Iterable[torch.dtype]:
    return DEFAULT_ALLOWED if allowed_dtypes is None else allowed_dtypes


def read_header(
    buf: bytes | bytearray | memoryview,
    *,
    max_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
    allowed_dtypes: Iterable[torch.dtype] | None = DEFAULT_ALLOWED,
    max_ndim: int = MAX_NDIM,
) -> TensorHeader:
    """Validate and parse the header at the start of ``buf``; the payload is not checked.

    Useful to a transport that receives a frame in chunks: once ``header_size(ndim)``
    bytes are in, :attr:`TensorHeader.frame_len` says how many bytes to expect.
    Raises :class:`WireError` naming the problem.
    """
    mv = byte_view(buf)
    n = len(mv)
    if n < _PREFIX_SIZE:
        raise WireError(f"tensor frame too short: {n} bytes, a header needs at least {_PREFIX_SIZE}")
    magic, code, ndim = _PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise WireError(f"not a tensor frame: bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    dtype = _CODE_TO_DTYPE.get(code)
    if dtype is None:
        raise WireError(f"tensor frame has unknown dtype code {code}")
    allowed = _resolve_allowed(allowed_dtypes)
    if dtype not in allowed:
        raise WireError(f"tensor frame dtype {dtype} is not allowed here")
    if ndim > max_ndim:
        raise WireError(f"tensor frame has {ndim} dimensions; the limit is {max_ndim}")
    hlen = header_size(ndim)
    if n < hlen:
        raise WireError(f"tensor frame truncated in its shape: {n} bytes, the header of a {ndim}-d tensor needs {hlen}")
    shape = _SHAPE_STRUCTS[ndim].unpack_from(mv, _PREFIX_SIZE)
    itemsize = _ITEMSIZE[dtype]
    max_numel = max_bytes // itemsize
    numel = 1
    for i, d in enumerate(shape):
        if d > max_numel:
            raise WireError(
                f"tensor frame dimension {i} is {d}: a {dtype} tensor that large exceeds the {max_bytes}-byte limit"
            )
        numel *= d  # Python ints: no overflow; bounded below
        if numel > max_numel:
            raise WireError(f"tensor frame shape {tuple(shape)} of {dtype} exceeds the {max_bytes}-byte limit")
    return TensorHeader(dtype, tuple(shape), hlen, numel * itemsize)


def decode_tensor(
    buf: bytes | bytearray | memoryview,
    *,
    max_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
    allowed_dtypes: Iterable[torch.dtype] | None = DEFAULT_ALLOWED,
    max_ndim: int = MAX_NDIM,
    borrow: bool = False,
) -> Tensor:
    """Decode one frame made by :func:`encode_tensor` into a new CPU tensor.

    Checks, in order and before touching the payload: magic, dtype code and allow-list,
    rank, shape fits the header, size limit, and payload length equal to
    ``numel * itemsize`` exactly; a ``bool`` payload must hold only 0 and 1 bytes.
    The result owns fresh writable memory (nothing aliases ``buf``), unless ``borrow``: then
    the caller hands ``buf`` over (nothing else will write to it) and, when it is writable and
    the payload aligned for its dtype, the tensor is built on it, without a copy.
    Raises :class:`WireError` naming the problem.
    """
    mv = byte_view(buf)
    hdr = read_header(mv, max_bytes=max_bytes, allowed_dtypes=allowed_dtypes, max_ndim=max_ndim)
    got = len(mv) - hdr.header_len
    if got != hdr.payload_len:
        raise WireError(
            f"tensor frame payload is {got} bytes but shape {hdr.shape} of {hdr.dtype} needs exactly {hdr.payload_len}"
        )
    if hdr.payload_len == 0:
        return torch.empty(hdr.shape, dtype=hdr.dtype)
    if borrow and not mv.readonly and hdr.dtype is not torch.bool:
        t = torch.frombuffer(mv[hdr.header_len :], dtype=hdr.dtype)
        if t.data_ptr() % _ITEMSIZE[hdr.dtype] == 0:  # else copied: unaligned elements are slow or refused
            return t.reshape(hdr.shape)
    storage = bytearray(mv[hdr.header_len :])  # the one copy; the tensor owns it, writable
    if hdr.dtype is torch.bool and storage.translate(None, b"\x00\x01"):
        raise WireError("tensor frame of dtype torch.bool holds bytes other than 0 and 1")
    return torch.frombuffer(storage, dtype=hdr.dtype).reshape(hdr.shape)


def payload_buffer(hdr: TensorHeader) -> Tensor:
    """Uninitialised uint8 memory for the payload ``hdr`` (a validated header) describes.

    A transport that receives a frame in chunks copies each chunk's payload bytes into
    it and then calls :func:`tensor_from_payload`: one copy in all, into aligned memory
    the tensor owns. Its pages are committed only as they are written.
    """
    return torch.empty(hdr.payload_len, dtype=torch.uint8)


def tensor_from_payload(hdr: TensorHeader, buf: Tensor) -> Tensor:
    """The tensor ``hdr`` describes, on the memory of ``buf`` (a filled :func:`payload_buffer`).

    Raises :class:`WireError` if ``buf`` has another length or a ``bool`` payload holds
    bytes other than 0 and 1.
    """
    if buf.dtype is not torch.uint8 or buf.dim() != 1 or buf.numel() != hdr.payload_len:
        raise WireError(f"tensor payload is {buf.numel()} bytes but shape {hdr.shape} needs {hdr.payload_len}")
    if hdr.payload_len == 0:
        return torch.empty(hdr.shape, dtype=hdr.dtype)
    if hdr.dtype is torch.bool and int(buf.max()) > 1:
        raise WireError("tensor frame of dtype torch.bool holds bytes other than 0 and 1")
    return buf.view(hdr.dtype).reshape(hdr.shape)
