import gzip
import struct

import numpy as np
import pytest
import torch

from splitnn.data import read_idx, write_idx
from splitnn.errors import CorruptDataError

DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (0, 4)])
def test_round_trip(tmp_path, dtype, suffix, shape):
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal(shape) * 100).astype(dtype)
    path = write_idx(tmp_path / f"a.idx{suffix}", arr)
    t = read_idx(path)
    assert tuple(t.shape) == shape
    assert t.dtype == torch.from_numpy(arr.astype(np.dtype(dtype).newbyteorder("="))).dtype
    np.testing.assert_array_equal(t.numpy(), arr)


def test_big_endian_hand_made(tmp_path):
    # int16 values 258 and -2, int32 dims, written by hand (independent of write_idx)
    blob = bytes([0, 0, 0x0B, 1]) + struct.pack(">I", 2) + bytes([1, 2, 0xFF, 0xFE])
    (tmp_path / "x.idx").write_bytes(blob)
    assert read_idx(tmp_path / "x.idx").tolist() == [258, -2]
    blob = bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 1) + struct.pack(">f", 1.5)
    (tmp_path / "f.idx").write_bytes(blob)
    t = read_idx(tmp_path / "f.idx")
    assert t.dtype == torch.float32 and t.tolist() == [1.5]


def test_gz_written_is_real_gzip(tmp_path):
    write_idx(tmp_path / "a.gz", np.arange(6, dtype=np.uint8).reshape(2, 3))
    raw = gzip.decompress((tmp_path / "a.gz").read_bytes())
    assert raw == bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 0, 1, 2, 3, 4, 5])


def _valid() -> bytes:
    return bytes([0, 0, 8, 2]) + struct.pack(">II", 2, 3) + bytes(range(6))


@pytest.mark.parametrize(
    "blob, problem",
    [
        (b"\x01" + _valid()[1:], "magic"),
        (bytes([0, 0, 0x0A, 2]) + _valid()[4:], "dtype code"),
        (_valid()[:-1], "truncated payload"),
        (_valid() + b"\x00", "extra bytes"),
        (_valid()[:6], "truncated header"),
        (b"\x00\x00", "shorter"),
    ],
)
@pytest.mark.parametrize("gz", [False, True])
def test_corruption_raises(tmp_path, blob, problem, gz):
    path = tmp_path / ("bad.idx.gz" if gz else "bad.idx")
    path.write_bytes(gzip.compress(blob) if gz else blob)
    with pytest.raises(CorruptDataError) as info:
        read_idx(path)
    msg = str(info.value)
    assert str(path) in msg and problem in msg and "delete" in msg


def test_non_gzip_with_gz_suffix(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(_valid())
    with pytest.raises(CorruptDataError, match="gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_truncated_gzip_stream(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(_valid() * 50)[:-12])
    with pytest.raises(CorruptDataError, match="gzip"):
        read_idx(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope.gz")


def test_real_mnist_header(shared_data):
    t = read_idx(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz")
    assert t.dtype == torch.uint8 and tuple(t.shape) == (10000, 28, 28)
    y = read_idx(shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz")
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
