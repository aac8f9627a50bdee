"""Reader (and a small writer) for IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number ``0x00 0x00 <dtype code> <ndim>``, then
``ndim`` big-endian uint32 dimension sizes, then the payload: ``prod(dims)``
big-endian items of the given type. Files may be gzip-compressed (``.gz``).
Parsing uses :func:`numpy.frombuffer` on the raw bytes; nothing is unpickled.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Union

import numpy as np
import torch

from splitnn.errors import CorruptDataError, DataError

__all__ = ["IDX_DTYPES", "read_idx", "write_idx"]

PathLike = Union[str, "os.PathLike[str]"]

#: IDX dtype code -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}


def _corrupt(path: Path, problem: str) -> CorruptDataError:
    return CorruptDataError(
        f"{path}: not a valid IDX file ({problem}). The file is damaged or incomplete: "
        f"delete it and download it again (splitnn re-downloads missing files)."
    )


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise _corrupt(path, f"bad gzip stream: {exc}") from exc


def read_idx(path: PathLike) -> torch.Tensor:
    """Read an IDX file (raw, or gzipped when the name ends in ``.gz``) into a tensor.

    The magic number, dtype code and the exact payload length
    (``prod(dims) * itemsize``) are validated. The result is a native-endian tensor
    of dtype uint8, int8, int16, int32, float32 or float64 with the file's shape.

    Raises:
        FileNotFoundError: the file does not exist.
        CorruptDataError: bad gzip stream, bad magic number, unknown dtype code,
            or a payload that is truncated or has extra bytes. The message names
            the file, the problem, and the fix (delete it and re-download).
    """
    p = Path(path)
    data = _read_bytes(p)
    if len(data) < 4:
        raise _corrupt(p, f"only {len(data)} bytes, shorter than the 4-byte magic number")
    zero, code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00":
        raise _corrupt(p, f"bad magic number 0x{data[:4].hex()}: the first two bytes must be zero")
    if code not in IDX_DTYPES:
        raise _corrupt(p, f"unknown dtype code 0x{code:02X} in magic number 0x{data[:4].hex()}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _corrupt(p, f"truncated header: {ndim} dimensions need {header} bytes, file has {len(data)}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    got = len(data) - header
    if got != expected:
        kind = "truncated payload" if got < expected else "extra bytes after payload"
        raise _corrupt(p, f"{kind}: dims {tuple(dims)} of {dtype.name} need {expected} bytes, found {got}")
    arr = np.frombuffer(data, dtype=dtype, count=math.prod(dims), offset=header)
    arr = arr.astype(dtype.newbyteorder("="), copy=True).reshape(dims)
    return torch.from_numpy(arr)


def write_idx(path: PathLike, array: np.ndarray | torch.Tensor) -> Path:
    """Write ``array`` as an IDX file (gzipped when ``path`` ends in ``.gz``); return the path.

    Supported dtypes: uint8, int8, int16, int32, float32, float64. Used by tests and
    by tools that produce MNIST-style data.
    """
    arr = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    native = arr.dtype.newbyteorder("=")
    if native not in _CODES:
        raise DataError(
            f"write_idx: dtype {arr.dtype} has no IDX code; use one of uint8, int8, int16, int32, float32, float64"
        )
    code = _CODES[native]
    payload = arr.astype(IDX_DTYPES[code], copy=False).tobytes()
    blob = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + payload
    p = Path(path)
    if p.name.endswith(".gz"):
        blob = gzip.compress(blob, mtime=0)
    p.write_bytes(blob)
    return p
