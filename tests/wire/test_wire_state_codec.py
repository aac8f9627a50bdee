"""Tests of splitnn.wire.state_codec: safetensors round trips and hostile input."""

from __future__ import annotations

import json
import struct
import warnings

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from splitnn.errors import WireError
from splitnn.wire import decode_state, encode_state
from splitnn.wire.tensor_codec import DTYPE_CODES

ALL_DTYPES = list(DTYPE_CODES)
_BITS_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype is torch.bool:
        return t.to(torch.uint8)
    return t.contiguous().reshape(-1).view(_BITS_VIEW[t.element_size()]).reshape(t.shape)


def assert_state_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(bits(a[k]), bits(b[k])), k


def test_module_state_round_trip() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    m(torch.randn(2, 1, 28, 28))  # non-trivial running stats
    state = m.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = decode_state(encode_state(state))
    assert_state_bit_equal(out, state)
    m2 = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    m2.load_state_dict(out)
    m.eval(), m2.eval()
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(m(x), m2(x))


def test_every_dtype_and_odd_shapes() -> None:
    state = {}
    for i, dt in enumerate(ALL_DTYPES):
        state[f"scalar.{i}"] = torch.ones((), dtype=dt)
        state[f"empty.{i}"] = torch.zeros((0, 3), dtype=dt)
        state[f"block.{i}"] = (torch.arange(12) % 2).to(dt).reshape(3, 4)
    nan_bits = torch.tensor([0x7FC00001, -0x00400001, 0x7F800001], dtype=torch.int32)
    state["nans"] = nan_bits.view(torch.float32)
    state["bf16_nans"] = torch.tensor([0x7FC1, 0x7F81, -0x007F], dtype=torch.int16).view(torch.bfloat16)
    assert_state_bit_equal(decode_state(encode_state(state)), state)


def test_empty_state() -> None:
    assert decode_state(encode_state({})) == {}


def test_non_contiguous_shared_and_grad_tensors() -> None:
    w = torch.randn(4, 6, requires_grad=True)
    base = torch.arange(24.0).reshape(4, 6)
    state = {"w": w, "tied": w, "t": base.t(), "slice": base[1:3], "base": base}
    out = decode_state(encode_state(state))
    assert_state_bit_equal(out, {k: v.detach() for k, v in state.items()})
    out["w"] += 1  # decoded tensors are independent and writable
    assert not torch.equal(out["w"], out["tied"])


def test_decoded_tensors_are_fresh() -> None:
    data = bytearray(encode_state({"a": torch.zeros(4)}))
    out = decode_state(data)
    data[-4:] = b"\xff" * 4
    assert torch.equal(out["a"], torch.zeros(4))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=12),
        st.tuples(st.sampled_from(ALL_DTYPES), st.lists(st.integers(0, 4), max_size=3), st.binary(max_size=512)),
        max_size=6,
    )
)
def test_round_trip_random(entries) -> None:  # type: ignore[no-untyped-def]
    state = {}
    for key, (dtype, shape, raw) in entries.items():
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = 1
        for d in shape:
            numel *= d
        data = bytearray(raw[: numel * itemsize].ljust(numel * itemsize, b"\0"))
        if dtype is torch.bool:
            data = bytearray(b & 1 for b in data)
        state[key] = (
            torch.frombuffer(data, dtype=dtype).reshape(shape).clone() if numel else torch.empty(shape, dtype=dtype)
        )
    assert_state_bit_equal(decode_state(encode_state(state)), state)


# ----------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\0" * 7,
        b"garbage!",
        b"\xff" * 16,
        struct.pack("<Q", 2) + b"[]",
        struct.pack("<Q", 4) + b"\xff\xfe{}",
        struct.pack("<Q", 10) + b"{}",
    ],
)
def test_garbage(data: bytes) -> None:
    with pytest.raises(WireError):
        decode_state(data)


def _blob(header: dict, payload: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + payload


@pytest.mark.parametrize(
    "header,payload",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 7]}}, b"\0" * 7),  # size mismatch
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),  # truncated data
        ({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, b"\0" * 8),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),  # gap
        ({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),  # complex: not allowed
        ({"a": {"dtype": "U16", "shape": [1], "data_offsets": [0, 2]}}, b"\0" * 2),
        ({"a": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
        ({"a": {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
        ({"a": "not an object"}, b""),
        ({"a": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
    ],
)
def test_malformed_headers(header: dict, payload: bytes) -> None:
    with pytest.raises(WireError):
        decode_state(_blob(header, payload))


def test_limits() -> None:
    data = encode_state({"a": torch.zeros(100), "b": torch.zeros(2)})
    with pytest.raises(WireError, match="limit"):
        decode_state(data, max_bytes=len(data) - 1)
    assert set(decode_state(data, max_bytes=len(data))) == {"a", "b"}
    with pytest.raises(WireError, match="limit"):
        decode_state(data, max_entries=1)
    with pytest.raises(WireError, match="not allowed"):
        decode_state(data, allowed_dtypes={torch.int64})


def test_metadata_is_tolerated() -> None:
    data = safetensors.torch.save({"a": torch.ones(2)}, metadata={"format": "pt"})
    assert torch.equal(decode_state(data)["a"], torch.ones(2))


@pytest.mark.parametrize(
    "state",
    [{1: torch.zeros(1)}, {"a": [1.0]}, {"a": torch.zeros(2, dtype=torch.complex64)}, [("a", torch.zeros(1))]],
)
def test_encode_rejects(state: object) -> None:
    with pytest.raises(WireError):
        encode_state(state)  # type: ignore[arg-type]


def test_not_bytes_like() -> None:
    with pytest.raises(WireError, match="bytes-like"):
        decode_state("text")  # type: ignore[arg-type]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    try:
        decode_state(data)
    except WireError:
        pass


_VALID = encode_state({"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([True, False]), "s": torch.tensor(3)})


@settings(max_examples=400, deadline=None)
@given(
    edits=st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(-16, 16),
)
def test_fuzz_mutated_blobs(edits, cut) -> None:  # type: ignore[no-untyped-def]
    data = bytearray(_VALID)
    for pos, value in edits:
        data[pos] = value
    if cut < 0:
        del data[cut:]
    else:
        data += b"\x20" * cut
    try:
        out = decode_state(bytes(data))
    except WireError:
        return
    for t in out.values():
        assert t.dtype in DTYPE_CODES


def test_decode_keeps_the_senders_key_order():
    """safetensors stores entries in its own order; a state dict's order must survive the wire."""
    keys = ["z.weight", "a.bias", "m.weight", "b", "0.weight"]
    state = {k: torch.full((i + 1,), float(i)) for i, k in enumerate(keys)}
    assert list(decode_state(encode_state(state))) == keys
