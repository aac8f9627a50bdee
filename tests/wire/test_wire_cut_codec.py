"""splitnn.wire.cut_codec: what crosses a cut, encoded by its sender: round trips of one value or several (plain,
compressed, absent), the receiver decodes exactly what the in-process engine hands over, byte counts are the codecs'
own, error feedback per value at the sender, and malformed values payloads give a WireError before anything is read."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitnn.errors import ConfigurationError, WireError
from splitnn.wire import compress
from splitnn.wire.cut_codec import (
    MAGIC,
    MAX_VALUES,
    Arrived,
    CutEncoder,
    decode_payload,
    decode_values,
    plain,
)
from splitnn.wire.tensor_codec import encode_tensor

MAX = 1 << 24


def _wire(encoded) -> bytes:
    return b"".join(bytes(p) for p in encoded.wire_parts())


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return len(a) == len(b) and all((x is None and y is None) or _same(x, y) for x, y in zip(a, b))


def _values():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(8, 16, generator=g, requires_grad=True)
    mask = (torch.rand(8, 16, generator=g) > 0.5).float()
    bucket = torch.randint(0, 4, (8,), generator=g)
    return h, mask, bucket


@pytest.mark.parametrize("spec", ["none", "fp16", "bf16", "int8", "topk:0.25"])
def test_several_values_round_trip_and_equal_what_in_process_receives(spec):
    h, mask, bucket = _values()
    enc = CutEncoder(spec).encode((h, mask, bucket))
    codec = compress.get_codec(spec)
    arrived = decode_values(_wire(enc), enc.codec, max_bytes=MAX)
    in_process = enc.decode()
    assert _same(arrived.value, in_process)
    got_h, got_mask, got_bucket = arrived.value
    assert torch.equal(got_bucket, bucket)  # integers cross plain whatever the codec
    want_h = h.detach() if spec == "none" else compress.decode(codec.encode(h))
    assert torch.equal(got_h, want_h)
    # which values send a gradient back travels with them
    assert [t.requires_grad for t in arrived.value] == [True, False, False]
    assert [t.requires_grad for t in in_process] == [True, False, False]
    # the ledger's bytes: each compressed value's codec payload, each plain one's raw bytes
    raw = sum(t.numel() * t.element_size() for t in (h, mask, bucket))
    sent = raw if spec == "none" else codec.nbytes(h) + codec.nbytes(mask) + bucket.numel() * 8
    assert (enc.nbytes, enc.raw) == (sent, raw) == (arrived.nbytes, arrived.raw)


def test_a_gradient_tuple_with_nothing_flowing_for_some_values():
    g = torch.randn(8, 16)
    enc = CutEncoder("int8").encode((g, None, None))
    arrived = decode_values(_wire(enc), enc.codec, max_bytes=MAX)
    assert arrived.value[1:] == (None, None) and torch.equal(arrived.value[0], enc.decode()[0])
    assert arrived.nbytes == compress.get_codec("int8").nbytes(g) and arrived.raw == g.numel() * 4
    nothing = plain((None, None))
    assert decode_values(_wire(nothing), 0, max_bytes=MAX) == Arrived((None, None), 0, 0)


@pytest.mark.parametrize("spec", ["none", "fp16", "int8", "topk:0.1"])
def test_one_tensor_travels_as_a_tensor_frame_or_one_codec_payload(spec):
    t = torch.randn(4, 32)
    enc = CutEncoder(spec).encode(t)
    assert not enc.several
    wire = _wire(enc)
    if spec == "none":
        assert wire == encode_tensor(t) and enc.codec == 0
    else:
        assert wire == compress.get_codec(spec).encode(t) and enc.nbytes == len(wire)
    arrived = decode_payload(wire, enc.codec, False, max_bytes=MAX)
    assert torch.equal(arrived.value, enc.decode()) and arrived.nbytes == enc.nbytes
    # an integer tensor at a compressed cut crosses plain
    idx = torch.arange(5)
    enc = CutEncoder(spec).encode(idx)
    assert enc.codec == 0 and enc.nbytes == enc.raw == 40 and _wire(enc) == encode_tensor(idx)


def test_topk_error_feedback_is_per_value_at_the_sender_and_evaluation_leaves_it():
    g = torch.Generator().manual_seed(3)
    a1, b1, a2, b2 = (torch.randn(4, 10, generator=g) for _ in range(4))
    enc = CutEncoder("topk:0.2")

    def keep_top(t: torch.Tensor) -> torch.Tensor:  # the twin: the 8 largest magnitudes of 40, by hand
        flat = t.reshape(-1)
        out = torch.zeros_like(flat)
        idx = flat.abs().argsort(descending=True)[:8]
        out[idx] = flat[idx]
        return out.reshape(t.shape)

    first = enc.encode((a1, b1)).decode()
    assert torch.equal(first[0], keep_top(a1)) and torch.equal(first[1], keep_top(b1))
    enc.encode((torch.ones(4, 10), torch.ones(4, 10)), feedback=False)  # evaluation: state untouched
    second = enc.encode((a2, b2)).decode()
    assert torch.equal(second[0], keep_top(a2 + (a1 - keep_top(a1))))
    assert torch.equal(second[1], keep_top(b2 + (b1 - keep_top(b1))))
    enc.reset()
    assert torch.equal(enc.encode((a2, b2)).decode()[0], keep_top(a2))


def test_the_encoder_refuses_what_is_not_a_tensor():
    with pytest.raises(ConfigurationError, match="value 1"):
        CutEncoder("fp16").encode((torch.zeros(2), "x"))
    with pytest.raises(ConfigurationError, match="unknown codec"):
        CutEncoder("zip")


# ------------------------------------------------------------------------- malformed payloads
def _payload(entries, bodies=(), count=None, magic=MAGIC, reserved=b"\x00\x00\x00") -> bytes:
    head = magic + bytes([len(entries) if count is None else count]) + reserved
    table = b"".join(struct.pack("<B7xQ", f, n) for f, n in entries)
    return head + table + b"".join(bodies)


T = encode_tensor(torch.ones(2, 3))
I8 = compress.get_codec("int8").encode(torch.ones(2, 3))
FP16 = compress.get_codec("fp16").encode(torch.ones(2, 3))


@pytest.mark.parametrize(
    "payload,codec,match",
    [
        (b"SNV", 0, "bad magic or too short"),
        (_payload([(1, len(T))], [T], magic=b"SNX1"), 0, "bad magic"),
        (_payload([], count=0), 0, "carries 0 values"),
        (_payload([(1, len(T))] * 2, [T, T], count=MAX_VALUES + 1), 0, "carries"),
        (_payload([(1, len(T))], [T], reserved=b"\x00\x01\x00"), 0, "reserved"),
        (_payload([(1, len(T))], [T])[:12], 0, "truncated in its table"),
        (_payload([(4, len(T))], [T]), 0, "unknown flags"),
        (_payload([(0, 3)], [b"abc"]), 0, "absent value 0 declares a body"),
        (_payload([(2, 0)]), 0, "absent value 0 declares"),
        (_payload([(1, 0)]), 0, "present but has an empty body"),
        (_payload([(1, len(T) + 1)], [T]), 0, "declares"),
        (_payload([(1, len(T))], [T, b"x"]), 0, "declares"),
        (_payload([(1, len(I8))], [I8]), 0, "frame says 'none'"),
        (_payload([(1, len(FP16))], [FP16]), 3, "frame says 'int8'"),
        (_payload([(3, len(encode_tensor(torch.arange(3))))], [encode_tensor(torch.arange(3))]), 0, "cannot require"),
        (_payload([(1, 5)], [b"SNT1x"]), 0, None),
    ],
)
def test_decode_values_validates_before_reading(payload, codec, match):
    with pytest.raises(WireError, match=match):
        decode_values(payload, codec, max_bytes=MAX)


def test_the_limit_bounds_the_values_together():
    big = encode_tensor(torch.zeros(100))  # 400 bytes each
    payload = _payload([(1, len(big))] * 3, [big] * 3)
    assert len(decode_values(payload, 0, max_bytes=1200).value) == 3
    with pytest.raises(WireError, match="limit"):
        decode_values(payload, 0, max_bytes=1000)


def test_a_single_payload_must_be_the_codec_its_frame_names():
    with pytest.raises(WireError, match="another codec"):
        decode_payload(FP16, 3, False)
    with pytest.raises(WireError):
        decode_payload(I8, 0, False)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 5))
def test_fuzz_random_bytes_after_magic(rest, codec):
    try:
        arrived = decode_values(MAGIC + rest, codec, max_bytes=1 << 12)
    except WireError as exc:
        assert str(exc)
    else:
        assert sum(t.numel() * t.element_size() for t in arrived.value if t is not None) <= 1 << 12


_SEEDS = [
    _wire(CutEncoder("int8").encode(_values())),
    _wire(CutEncoder("topk:0.3").encode((torch.randn(3, 4), None))),
    _wire(plain((torch.randn(2, 2), torch.arange(3)))),
]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(range(len(_SEEDS))),
    st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(0, 5),
)
def test_fuzz_mutated_values_payloads(seed, edits, codec):
    """Flipped bytes anywhere in valid payloads: a tuple within the limit, or a WireError."""
    buf = bytearray(_SEEDS[seed])
    for pos, value in edits:
        buf[pos % len(buf)] = value
    try:
        arrived = decode_values(bytes(buf), codec, max_bytes=1 << 14)
    except WireError as exc:
        assert str(exc)
    else:
        assert isinstance(arrived.value, tuple) and arrived.raw <= 1 << 14
