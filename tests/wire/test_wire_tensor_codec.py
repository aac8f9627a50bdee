"""Tests of splitnn.wire.tensor_codec: bit-exact round trips and strict validation."""

from __future__ import annotations

import struct
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitnn.errors import WireError
from splitnn.wire.tensor_codec import (
    DEFAULT_ALLOWED,
    DTYPE_CODES,
    MAGIC,
    MAX_NDIM,
    decode_tensor,
    encode_tensor,
    encode_tensor_parts,
    header_size,
    read_header,
    tensor_nbytes,
)

ALL_DTYPES = list(DTYPE_CODES)
_BITS_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bit pattern as an integer tensor (NaN payloads compare exactly)."""
    if t.dtype is torch.bool:
        return t.to(torch.uint8)
    flat = t.contiguous().reshape(-1)
    return flat.view(_BITS_VIEW[t.element_size()]).reshape(t.shape)


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], raw: bytes) -> torch.Tensor:
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for d in shape:
        numel *= d
    data = bytearray(raw[: numel * itemsize].ljust(numel * itemsize, b"\x00"))
    if dtype is torch.bool:
        data = bytearray(b & 1 for b in data)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(shape).clone()


shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)


# ----------------------------------------------------------------------------- layout


def test_golden_frame_layout() -> None:
    t = torch.tensor([[1.0, 2.0]], dtype=torch.float32)
    expected = b"SNT1" + bytes([1, 2]) + struct.pack("<QQ", 1, 2) + struct.pack("<2f", 1.0, 2.0)
    assert encode_tensor(t) == expected
    assert header_size(2) == 6 + 16


def test_scalar_frame_layout() -> None:
    t = torch.tensor(7, dtype=torch.int64)
    assert encode_tensor(t) == MAGIC + bytes([5, 0]) + struct.pack("<q", 7)


def test_dtype_codes_are_stable() -> None:
    assert [DTYPE_CODES[d] for d in ALL_DTYPES] == list(range(1, 11))
    assert set(ALL_DTYPES) == {
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    }
    assert frozenset(ALL_DTYPES) == DEFAULT_ALLOWED


def test_parts_equal_whole_frame() -> None:
    t = torch.randn(3, 4)
    header, payload = encode_tensor_parts(t)
    assert isinstance(payload, memoryview) and payload.readonly
    assert header + bytes(payload) == encode_tensor(t)
    assert len(header) == header_size(2)
    assert len(payload) == tensor_nbytes(t) == 48


def test_read_header() -> None:
    t = torch.zeros(2, 3, 5, dtype=torch.int16)
    frame = encode_tensor(t)
    hdr = read_header(frame[: header_size(3)])  # payload not needed
    assert hdr.dtype is torch.int16 and hdr.shape == (2, 3, 5)
    assert hdr.header_len == header_size(3) and hdr.payload_len == 60 and hdr.frame_len == len(frame)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_tensor_nbytes(dtype: torch.dtype) -> None:
    t = torch.zeros(3, 7, dtype=dtype)
    assert tensor_nbytes(t) == 21 * t.element_size()
    assert len(encode_tensor(t)) == header_size(2) + tensor_nbytes(t)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (2, 3), (2, 1, 3, 1, 2, 1, 1, 2)])
def test_round_trip_every_dtype(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = random_tensor(dtype, shape, bytes(range(256)) * 2)
    out = decode_tensor(encode_tensor(t))
    assert_bit_equal(out, t)
    assert torch.equal(out, t) or dtype.is_floating_point  # NaN != NaN for floats


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from(ALL_DTYPES), shape=shapes, raw=st.binary(min_size=0, max_size=5**4 * 8))
def test_round_trip_random(dtype: torch.dtype, shape: tuple[int, ...], raw: bytes) -> None:
    t = random_tensor(dtype, shape, raw)
    frame = encode_tensor(t)
    out = decode_tensor(frame)
    assert_bit_equal(out, t)
    assert encode_tensor(out) == frame  # canonical
    header, payload = encode_tensor_parts(t)
    assert decode_tensor(header + bytes(payload)).shape == t.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_nan_payloads_preserved(dtype: torch.dtype) -> None:
    itemsize = torch.empty((), dtype=dtype).element_size()
    int_dtype = _BITS_VIEW[itemsize]
    # all-ones exponent with distinct mantissas: quiet/signalling NaNs, both signs, infinities
    if itemsize == 2:
        patterns = [0x7C01, 0x7E00, 0xFC01, 0x7FFF, 0x7F81, 0x7FC1, 0xFF81, 0x7C00]
    elif itemsize == 4:
        patterns = [0x7F800001, 0x7FC00000, 0xFF800001, 0x7FFFFFFF, 0x7F800000, 0x00000001]
    else:
        patterns = [0x7FF0000000000001, 0x7FF8000000000000, 0x7FFFFFFFFFFFFFFF, 0x0000000000000001]
    signed = [p - (1 << (8 * itemsize)) if p >= 1 << (8 * itemsize - 1) else p for p in patterns]
    t = torch.tensor(signed, dtype=int_dtype).view(dtype)
    out = decode_tensor(encode_tensor(t))
    assert torch.equal(out.view(int_dtype), t.view(int_dtype))


def test_bfloat16_values() -> None:
    t = torch.tensor([1.5, -2.25, 3.0e38, 1e-40, float("inf")], dtype=torch.bfloat16)
    assert torch.equal(decode_tensor(encode_tensor(t)), t)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(24.0).reshape(4, 6).t(),
        lambda: torch.arange(24.0).reshape(4, 6)[:, ::2],
        lambda: torch.arange(24.0).reshape(4, 6)[1:3],  # contiguous, non-zero storage offset
        lambda: torch.arange(24.0)[5],  # 0-d view into the middle of a storage
        lambda: torch.arange(6, dtype=torch.bfloat16).reshape(2, 3).t(),
        lambda: torch.tensor([True, False, True]).expand(4, 3),  # stride 0
        lambda: torch.arange(12, dtype=torch.int16).reshape(3, 4).permute(1, 0)[::2],
        lambda: torch.randn(3, 4, requires_grad=True) * 2,
    ],
)
def test_non_contiguous_and_views(make) -> None:  # type: ignore[no-untyped-def]
    t = make()
    out = decode_tensor(encode_tensor(t))
    assert torch.equal(out, t.detach())
    assert out.is_contiguous() and not out.requires_grad
    header, payload = encode_tensor_parts(t)
    assert len(payload) == tensor_nbytes(t)


def test_decoded_tensor_owns_writable_memory() -> None:
    t = torch.arange(10, dtype=torch.float32)
    frame = bytearray(encode_tensor(t))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = decode_tensor(frame)
        out2 = decode_tensor(bytes(frame))
        out3 = decode_tensor(memoryview(frame))
    out += 1  # writable
    frame[-4:] = b"\xff\xff\xff\xff"  # the input changing does not change the tensors
    assert torch.equal(out, t + 1)
    assert torch.equal(out2, t) and torch.equal(out3, t)
    out2[0] = 5.0
    assert out3[0] == 0.0  # no aliasing between decodes


def _in_own_memory(frame: bytes, aligned_at: int) -> memoryview:
    """``frame`` copied into memory of its own, its byte ``aligned_at`` at a 64-byte boundary."""
    mem = torch.empty(len(frame) + 64, dtype=torch.uint8)
    pad = -(mem.data_ptr() + aligned_at) % 64
    mv = memoryview(mem.numpy())[pad : pad + len(frame)]
    mv[:] = frame
    return mv


def test_a_borrowed_frame_becomes_the_tensors_memory() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    mv = _in_own_memory(encode_tensor(t), header_size(2))
    out = decode_tensor(mv, borrow=True)
    assert torch.equal(out, t) and out.data_ptr() % 64 == 0
    out += 1
    assert torch.equal(decode_tensor(mv), t + 1)  # the frame's memory changed with the tensor: no copy


@pytest.mark.parametrize("why", ["not asked", "read-only", "unaligned", "bool"])
def test_decode_copies_unless_it_may_borrow_aligned_writable_memory(why: str) -> None:
    t = (torch.arange(12) % 2).to(torch.bool if why == "bool" else torch.float32).reshape(3, 4)
    mv = _in_own_memory(encode_tensor(t), header_size(2) + (1 if why == "unaligned" else 0))
    out = decode_tensor(mv.toreadonly() if why == "read-only" else mv, borrow=why != "not asked")
    assert torch.equal(out, t)
    out.logical_not_() if why == "bool" else out.add_(1)
    assert torch.equal(decode_tensor(mv), t)  # the frame is as it was: the tensor has memory of its own


def test_decode_accepts_non_byte_memoryview() -> None:
    frame = encode_tensor(torch.arange(4, dtype=torch.int32))  # 14 + 16 = 30 bytes: even
    mv = memoryview(frame).cast("H")
    assert torch.equal(decode_tensor(mv), torch.arange(4, dtype=torch.int32))
    for strided in (memoryview(bytearray(40)).cast("H")[::2], memoryview(frame + frame)[::2]):
        with pytest.raises(WireError, match="contiguous"):
            decode_tensor(strided)


def test_allowed_dtypes_restricts() -> None:
    frame = encode_tensor(torch.zeros(2, dtype=torch.int64))
    assert decode_tensor(frame, allowed_dtypes={torch.int64}).dtype is torch.int64
    with pytest.raises(WireError, match="not allowed"):
        decode_tensor(frame, allowed_dtypes={torch.float32})


def test_size_cap_boundary() -> None:
    frame = encode_tensor(torch.zeros(25, dtype=torch.float32))  # 100 bytes
    assert decode_tensor(frame, max_bytes=100).numel() == 25
    with pytest.raises(WireError, match="limit"):
        decode_tensor(frame, max_bytes=99)


# ----------------------------------------------------------------------------- validation


def frame_of(code: int, shape: tuple[int, ...], payload: bytes = b"", magic: bytes = MAGIC) -> bytes:
    return magic + bytes([code, len(shape)]) + struct.pack(f"<{len(shape)}Q", *shape) + payload


@pytest.mark.parametrize("magic", [b"SNT2", b"snt1", b"\0\0\0\0", b"PK\x03\x04"])
def test_bad_magic(magic: bytes) -> None:
    with pytest.raises(WireError, match="magic"):
        decode_tensor(frame_of(1, (1,), b"\0" * 4, magic=magic))


@pytest.mark.parametrize("code", [0, 11, 12, 100, 255])
def test_unknown_dtype_code(code: int) -> None:
    with pytest.raises(WireError, match="dtype code"):
        decode_tensor(frame_of(code, (1,), b"\0" * 8))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("delta", [-1, 1])
def test_payload_off_by_one(dtype: torch.dtype, delta: int) -> None:
    frame = encode_tensor(torch.zeros(3, 2, dtype=dtype))
    bad = frame[:delta] if delta < 0 else frame + b"\0"
    with pytest.raises(WireError, match="payload"):
        decode_tensor(bad)


def test_zero_size_with_payload_rejected() -> None:
    with pytest.raises(WireError, match="payload"):
        decode_tensor(frame_of(1, (0, 3), b"\0"))


@pytest.mark.parametrize("ndim", [MAX_NDIM + 1, 64, 255])
def test_absurd_ndim(ndim: int) -> None:
    with pytest.raises(WireError, match="dimensions"):
        decode_tensor(frame_of(9, (1,) * ndim, b"\0"))


def test_ndim_cap_is_configurable() -> None:
    t = torch.zeros((1,) * 10)
    with pytest.raises(WireError, match="dimensions"):
        encode_tensor(t)
    frame = encode_tensor(t, max_ndim=10)
    with pytest.raises(WireError, match="dimensions"):
        decode_tensor(frame)
    assert decode_tensor(frame, max_ndim=10).shape == t.shape


@pytest.mark.parametrize(
    "shape",
    [
        (2**32, 2**32),  # product is 2**64: overflows u64 / int64
        (2**63, 2),
        (2**64 - 1,),  # would be -1 as int64
        (0, 2**63),  # zero-size but absurd dimension
        (2**31, 2**31, 2**31),
        (65536,) * 8,
    ],
)
def test_huge_dims(shape: tuple[int, ...]) -> None:
    with pytest.raises(WireError, match="limit"):
        decode_tensor(frame_of(1, shape, b"\0" * 16))


@pytest.mark.parametrize("n", range(0, 6))
def test_too_short_for_prefix(n: int) -> None:
    with pytest.raises(WireError, match="too short"):
        decode_tensor(encode_tensor(torch.zeros(2))[:n])


def test_truncated_shape() -> None:
    frame = frame_of(1, (2, 3, 4))[: header_size(3) - 1]
    with pytest.raises(WireError, match="truncated"):
        decode_tensor(frame)


def test_bool_payload_must_be_zero_or_one() -> None:
    with pytest.raises(WireError, match="bool"):
        decode_tensor(frame_of(10, (3,), b"\x00\x01\x02"))


@pytest.mark.parametrize("buf", ["SNT1", 12, None, [1, 2]])
def test_not_bytes_like(buf: object) -> None:
    with pytest.raises(WireError, match="bytes-like"):
        decode_tensor(buf)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "t",
    [
        torch.zeros(2, dtype=torch.complex64),
        torch.zeros(2, dtype=torch.uint16),
        torch.zeros(2, 2).to_sparse(),
    ],
    ids=["complex64", "uint16", "sparse"],
)
def test_encode_rejects_unsupported(t: torch.Tensor) -> None:
    with pytest.raises(WireError):
        encode_tensor(t)


def test_encode_rejects_non_tensor() -> None:
    with pytest.raises(WireError, match="torch.Tensor"):
        encode_tensor([1.0, 2.0])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- fuzz


def _decode_or_wire_error(buf: bytes, **kw) -> torch.Tensor | None:  # type: ignore[no-untyped-def]
    try:
        out = decode_tensor(buf, **kw)
    except WireError as exc:
        assert str(exc)  # every error says something
        return None
    # whatever decodes is a canonical frame of a valid tensor
    assert out.dtype in DEFAULT_ALLOWED and out.dim() <= MAX_NDIM
    assert encode_tensor(out) == bytes(buf)
    return out


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(buf: bytes) -> None:
    _decode_or_wire_error(buf, max_bytes=1 << 16)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_random_bytes_after_magic(rest: bytes) -> None:
    _decode_or_wire_error(MAGIC + rest, max_bytes=1 << 16)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(ALL_DTYPES),
    shape=st.lists(st.integers(0, 4), max_size=3).map(tuple),
    edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(-8, 8),
    data=st.data(),
)
def test_fuzz_mutated_frames(dtype, shape, edits, cut, data) -> None:  # type: ignore[no-untyped-def]
    frame = bytearray(encode_tensor(torch.zeros(shape, dtype=dtype)))
    for pos, value in edits:
        if frame:
            frame[pos % len(frame)] = value
    if cut < 0:
        del frame[cut:]
    else:
        frame += data.draw(st.binary(min_size=cut, max_size=cut))
    _decode_or_wire_error(bytes(frame), max_bytes=1 << 16)
