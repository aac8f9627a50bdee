"""State dict <-> bytes codec using the safetensors format (never pickle, never ``torch.load``).

A safetensors blob is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw data. :func:`decode_state` checks the
blob's size and its JSON header (entry count, dtypes) before handing it to
``safetensors.torch.load``, and turns every failure into :class:`WireError`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor

from splitnn.errors import WireError
from splitnn.wire.tensor_codec import DEFAULT_ALLOWED, DEFAULT_MAX_TENSOR_BYTES, byte_view

__all__ = [
    "DEFAULT_MAX_STATE_BYTES",
    "DEFAULT_MAX_STATE_ENTRIES",
    "encode_state",
    "decode_state",
]

#: Largest state blob :func:`decode_state` accepts unless told otherwise (2 GiB).
DEFAULT_MAX_STATE_BYTES: int = 2 * DEFAULT_MAX_TENSOR_BYTES
#: Most tensors one state blob may hold unless told otherwise.
DEFAULT_MAX_STATE_ENTRIES: int = 100_000
#: Largest JSON header accepted (safetensors itself refuses headers over 100 MB).
_MAX_HEADER_BYTES = 100_000_000

# safetensors dtype names of the dtypes the wire carries
_ST_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F64": torch.float64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


_ORDER_KEY = "splitnn.order"


def encode_state(state: Mapping[str, Tensor]) -> bytes:
    """Encode a state dict (name -> tensor) as safetensors bytes.

    Tensors are detached, moved to the CPU and made contiguous; tensors that share
    memory (tied weights) are stored as independent copies. Raises :class:`WireError`
    for a non-string key, a non-tensor value or a dtype the wire does not carry.
    """
    if not isinstance(state, Mapping):
        raise WireError(f"encode_state expects a mapping of name -> tensor, got {type(state).__name__}")
    out: dict[str, Tensor] = {}
    seen_storage: set[int] = set()
    for key, t in state.items():
        if not isinstance(key, str):
            raise WireError(f"state dict keys must be strings, got {key!r}")
        if not isinstance(t, Tensor):
            raise WireError(f"state dict entry {key!r} is a {type(t).__name__}, not a tensor")
        if t.dtype not in DEFAULT_ALLOWED:
            raise WireError(f"state dict entry {key!r} has dtype {t.dtype}, which the wire does not carry")
        if t.layout is not torch.strided:
            raise WireError(f"state dict entry {key!r} has layout {t.layout}; convert it with .to_dense()")
        t = t.detach().to("cpu").contiguous()
        if t.numel() > 0:
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen_storage:
                t = t.clone()
            else:
                seen_storage.add(ptr)
        out[key] = t
    try:
        # safetensors lays entries out by its own order; keep the caller's (a state dict's
        # order is meaningful: optimizers and averaging code walk it in parallel).
        return safetensors_save(out, metadata={_ORDER_KEY: json.dumps(list(out))})
    except Exception as exc:  # safetensors raises RuntimeError / SafetensorError
        raise WireError(f"cannot encode state dict: {exc}") from exc


def _check_header(mv: memoryview, max_entries: int, allowed: Iterable[torch.dtype]) -> dict:
    n = len(mv)
    if n < 8:
        raise WireError(f"state blob too short: {n} bytes, a safetensors header needs at least 8")
    (hlen,) = struct.unpack_from("<Q", mv, 0)
    if hlen > _MAX_HEADER_BYTES or hlen > n - 8:
        raise WireError(f"state blob header length {hlen} does not fit the {n}-byte blob")
    try:
        header = json.loads(bytes(mv[8 : 8 + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WireError(f"state blob header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("state blob header is not a JSON object")
    entries = [k for k in header if k != "__metadata__"]
    if len(entries) > max_entries:
        raise WireError(f"state blob holds {len(entries)} tensors; the limit is {max_entries}")
    for key in entries:
        info = header[key]
        dtype_name = info.get("dtype") if isinstance(info, dict) else None
        dtype = _ST_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None or dtype not in allowed:
            raise WireError(f"state blob entry {key!r} has dtype {dtype_name!r}, which is not allowed here")
    return header


def _in_sent_order(state: dict[str, Tensor], header: dict) -> dict[str, Tensor]:
    """``state`` in the order the sender's mapping had (recorded by :func:`encode_state`)."""
    meta = header.get("__metadata__")
    try:
        order = json.loads(meta[_ORDER_KEY]) if isinstance(meta, dict) and _ORDER_KEY in meta else None
    except (TypeError, ValueError):
        order = None
    if not isinstance(order, list) or sorted(map(str, order)) != sorted(state):
        return state  # not written by encode_state: keep the library's order
    return {key: state[key] for key in order}


def decode_state(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = DEFAULT_MAX_STATE_BYTES,
    max_entries: int = DEFAULT_MAX_STATE_ENTRIES,
    allowed_dtypes: Iterable[torch.dtype] | None = DEFAULT_ALLOWED,
) -> dict[str, Tensor]:
    """Decode safetensors bytes made by :func:`encode_state` into a dict of new CPU tensors.

    Checks the blob's size, header, entry count and dtypes first; the tensors returned
    own writable memory. Raises :class:`WireError` for anything malformed or over a limit.
    """
    mv = byte_view(data, "a state blob")
    if len(mv) > max_bytes:
        raise WireError(f"state blob is {len(mv)} bytes; the limit is {max_bytes}")
    allowed = DEFAULT_ALLOWED if allowed_dtypes is None else allowed_dtypes
    header = _check_header(mv, max_entries, allowed)
    try:
        state = safetensors_load(data if type(data) is bytes else bytes(mv))
    except Exception as exc:  # SafetensorError, ValueError, RuntimeError, ...
        raise WireError(f"malformed state blob: {exc}") from None
    for key, t in state.items():  # belt and braces: the library parsed the header itself
        if t.dtype not in allowed:
            raise WireError(f"state blob entry {key!r} has dtype {t.dtype}, which is not allowed here")
    return _in_sent_order(state, header)
