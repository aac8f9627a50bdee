"""Peer frames: round trips, chunking, and refusal of malformed input; the generated proto is in sync."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitnn.errors import ConfigurationError, WireError
from splitnn.transport import frames
from splitnn.transport.counters import ByteCounters
from splitnn.transport.limits import Limits
from splitnn.wire import compress, cut_codec
from splitnn.wire.tensor_codec import encode_tensor

REPO = Path(__file__).resolve().parents[2]


def _roundtrip(t: torch.Tensor, chunk: int, max_bytes: int = 1 << 30) -> tuple[torch.Tensor, int]:
    reasm = frames.Reassembler(max_bytes)
    out, n = None, 0
    for raw in frames.data_frames("activation", 7, t, chunk):
        assert len(raw) <= chunk + frames.HEADER_SIZE
        hdr, body = frames.parse(raw)
        out, n = reasm.feed(hdr, body), n + 1
    return out, n


@pytest.mark.parametrize(
    "shape,dtype",
    [((64, 128), torch.float32), ((3, 5, 7), torch.float64), ((0, 4), torch.float32), ((10,), torch.int64)],
)
@pytest.mark.parametrize("chunk", [1 << 10, 1 << 20])
def test_data_frames_roundtrip_exactly(shape, dtype, chunk):
    t = (torch.randn(shape) * 100).to(dtype)
    out, n = _roundtrip(t, chunk)
    assert torch.equal(out, t) and out.dtype == t.dtype
    assert n == max(1, -(-(t.numel() * t.element_size() + 6 + 8 * t.dim()) // chunk))


def test_reassembler_refuses_oversized_truncated_and_inconsistent_frames():
    t = torch.randn(1000)
    parts = list(frames.data_frames("gradient", 1, t, 1024))
    with pytest.raises(WireError, match="limit"):
        _roundtrip(t, 1024, max_bytes=1000)
    reasm = frames.Reassembler(1 << 20)
    hdr, body = frames.parse(parts[0])
    reasm.feed(hdr, body)
    last_hdr, last_body = frames.parse(parts[-1])
    with pytest.raises(WireError, match="truncated"):
        reasm.feed(last_hdr, last_body)  # chunks in the middle are missing
    bad_total = frames.HEADER.pack(frames.PEER_MAGIC, frames.DATA, 1, 0, 0, 5, 10) + b"\x00" * 4
    with pytest.raises(WireError):
        frames.Reassembler(1 << 20).feed(*frames.parse(bad_total))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_parse_rejects_garbage(buf):
    try:
        hdr, chunk = frames.parse(buf)
    except WireError:
        return
    assert buf[:4] == frames.PEER_MAGIC and hdr.type in (
        frames.REQUEST,
        frames.DATA,
        frames.ERROR,
        frames.PUSH,
        frames.ABORT,
    )


def test_request_and_error_frames():
    hdr, body = frames.parse(frames.request("gradient", 2**63))
    assert (hdr.type, hdr.kind, hdr.id, len(body)) == (frames.REQUEST, "gradient", 2**63, 0)
    hdr, body = frames.parse(frames.error("activation", 3, "x" * 10_000))
    assert hdr.type == frames.ERROR and len(body) == frames.MAX_ERROR_BYTES


def test_limits_and_counters():
    with pytest.raises(ConfigurationError):
        Limits(chunk_bytes=10)
    with pytest.raises(ConfigurationError):
        Limits(peer_chunk_bytes=0)
    assert Limits().frame_bytes == 1 << 20 and Limits(chunk_bytes=1 << 16).frame_bytes == 1 << 16
    assert dict(Limits().grpc_options())["grpc.max_receive_message_length"] == Limits().max_message_bytes
    c = ByteCounters()
    c.record("bob", "sent", "activation", 10)
    c.record("bob", "sent", "activation", 5)
    assert c.total(peer="bob", kind="activation") == 15
    assert ByteCounters.from_rows(c.to_rows()).totals() == c.totals()


def test_generated_proto_is_in_sync(tmp_path):
    """Regenerating from splitnn.proto gives the committed module (run tools/gen_proto.sh if this fails)."""
    pytest.importorskip("grpc_tools")
    src = REPO / "src"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{src}",
            f"--python_out={tmp_path}",
            "splitnn/wire/proto/splitnn.proto",
        ],
        check=True,
        cwd=src,
    )
    fresh = (tmp_path / "splitnn/wire/proto/splitnn_pb2.py").read_text()
    assert fresh == (src / "splitnn/wire/proto/splitnn_pb2.py").read_text()


# ------------------------------------------------------------------ codecs in frames
@pytest.mark.parametrize("spec", ["none", "fp16", "bf16", "int8", "topk:0.1"])
@pytest.mark.parametrize("chunk", [1 << 10, 1 << 20])
def test_frames_carry_each_codec_and_say_which(spec, chunk):
    t = torch.randn(40, 64)
    codec = compress.get_codec(spec)
    reasm = frames.Reassembler(1 << 24)
    raws = list(frames.data_frames("activation", 9, t, chunk, type_=frames.PUSH, codec=spec))
    assert len(raws) == -(-codec.nbytes(t) // chunk)
    out = None
    for raw in raws:
        hdr, body = frames.parse(raw)
        assert hdr.codec == codec.id and hdr.total == codec.nbytes(t)
        out = reasm.feed(hdr, body)
    assert torch.equal(out, compress.decode(codec.encode(t)))


def test_payload_frames_copy_each_byte_once_and_cut_anywhere():
    parts = [b"ab", memoryview(b"cdefg"), b"", bytearray(b"hij")]
    raws = list(frames.payload_frames("gradient", 3, parts, 4, type_=frames.DATA))
    assert [bytes(frames.parse(r)[1]) for r in raws] == [b"abcd", b"efgh", b"ij"]
    assert [frames.parse(r)[0].more for r in raws] == [True, True, False]
    with pytest.raises(ValueError, match="codec"):
        next(frames.payload_frames("gradient", 3, parts, 4, codec=77))


@pytest.mark.parametrize("chunk", [1 << 10, 1 << 20])
def test_unjoined_frames_are_the_joined_frames_parts_on_the_tensors_memory(chunk):
    t = torch.randn(64, 128)
    joined = list(frames.data_frames("activation", 7, t, chunk, type_=frames.PUSH))
    parts = list(frames.data_frames("activation", 7, t, chunk, type_=frames.PUSH, joined=False))
    assert all(type(p) is tuple for p in parts) and all(type(f) is bytes for f in joined)
    assert [b"".join(p) for p in parts] == joined
    assert [frames.frame_len(p) for p in parts] == [len(f) for f in joined] == [frames.frame_len(f) for f in joined]
    t.neg_()  # the parts are views of the tensor, not copies
    assert b"".join(parts[-1]) != joined[-1]


def test_payload_start_says_where_a_whole_tensor_payload_begins():
    t = torch.randn(4, 5, 6)
    (frame,) = frames.data_frames("gradient", 1, t, 1 << 20, type_=frames.PUSH)
    start = frames.payload_start(frame)
    assert start == frames.HEADER_SIZE + 6 + 3 * 8 and frame[start:] == t.numpy().tobytes()
    assert frames.payload_start(frame[: frames.HEADER_SIZE + 5]) == 0  # too short to say
    assert frames.payload_start(next(frames.data_frames("gradient", 1, t, 64))) == 0  # chunked: reassembled
    assert frames.payload_start(next(frames.data_frames("gradient", 1, t, 1 << 20, codec="fp16"))) == 0
    several = cut_codec.encoded_of((t, t)).wire_parts()
    assert frames.payload_start(next(frames.payload_frames("gradient", 1, several, 1 << 20, values=True))) == 0
    assert frames.payload_start(frames.request("activation", 3)) == 0


@settings(max_examples=200, deadline=None)
@given(head=st.binary(max_size=64))
def test_payload_start_of_any_bytes_is_an_offset_never_an_error(head):
    start = frames.payload_start(head)
    assert start == 0 or frames.HEADER_SIZE + 6 <= start <= frames.HEADER_SIZE + 6 + 8 * 255


def _frame(type_=frames.DATA, codec=0, tensor_id=1, total=None, body=b"", flags=0) -> bytes:
    total = len(body) if total is None else total
    return frames.HEADER.pack(frames.PEER_MAGIC, type_, 1, flags, codec, tensor_id, total) + body


def test_parse_validates_the_codec_byte():
    with pytest.raises(WireError, match="unknown codec"):
        frames.parse(_frame(codec=99))
    for type_ in (frames.REQUEST, frames.ERROR, frames.ABORT):
        with pytest.raises(WireError, match="codec"):
            frames.parse(_frame(type_=type_, codec=1))
    assert frames.parse(_frame(codec=3, body=b"x"))[0].codec == 3


def test_reassembler_refuses_codec_mismatches():
    t = torch.randn(300)
    fp16 = compress.get_codec("fp16").encode(t)
    # the frame says int8 but the payload is fp16
    with pytest.raises(WireError, match="another codec"):
        frames.Reassembler(1 << 20).feed(*frames.parse(_frame(codec=3, body=fp16)))
    # codec 'none' with a codec payload (or the reverse) is not a tensor frame
    with pytest.raises(WireError):
        frames.Reassembler(1 << 20).feed(*frames.parse(_frame(codec=0, body=fp16)))
    with pytest.raises(WireError):
        frames.Reassembler(1 << 20).feed(*frames.parse(_frame(codec=1, body=encode_tensor(t))))
    # chunks of one payload must agree on the codec
    reasm = frames.Reassembler(1 << 20)
    first, second = fp16[:100], fp16[100:]
    reasm.feed(*frames.parse(_frame(codec=1, total=len(fp16), body=first, flags=frames.FLAG_MORE)))
    with pytest.raises(WireError, match="disagree"):
        reasm.feed(*frames.parse(_frame(codec=2, total=len(fp16), body=second)))


def test_chunked_tensor_header_must_fit_the_first_chunk_and_the_total():
    frame = encode_tensor(torch.randn(100))
    reasm = frames.Reassembler(1 << 20)
    for cut in (5, 10):  # the tensor header split across chunks
        with pytest.raises(WireError, match="first chunk must hold the tensor header"):
            reasm.feed(*frames.parse(_frame(total=len(frame), body=frame[:cut], flags=frames.FLAG_MORE)))
    with pytest.raises(WireError, match="describes"):  # the header and the frame disagree on the length
        reasm.feed(*frames.parse(_frame(total=len(frame) + 4, body=frame[:50], flags=frames.FLAG_MORE)))
    reasm.feed(*frames.parse(_frame(tensor_id=2, total=len(frame), body=frame[:50], flags=frames.FLAG_MORE)))
    with pytest.raises(WireError, match="overrun"):
        reasm.feed(*frames.parse(_frame(tensor_id=2, total=len(frame), body=frame[50:] + b"xx")))


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(
        st.tuples(
            st.sampled_from([frames.DATA, frames.PUSH]),
            st.integers(0, 5),  # codec id, including unknown ones
            st.integers(0, 2),  # tensor id
            st.integers(0, 400),  # declared total
            st.booleans(),  # more
            st.binary(max_size=80),
        ),
        min_size=1,
        max_size=6,
    ),
    prefix=st.sampled_from(
        [b"", encode_tensor(torch.zeros(3, 4)), compress.get_codec("int8").encode(torch.ones(2, 3))]
    ),
)
def test_fuzz_reassembler_sees_only_wire_errors(chunks, prefix):
    """Arbitrary sequences of payload frames: the reassembler returns tensors within its limit or raises WireError."""
    reasm = frames.Reassembler(1 << 12)
    for i, (type_, codec, tid, total, more, body) in enumerate(chunks):
        body = (prefix + body) if i == 0 else body
        raw = _frame(type_, codec, tid, total, body, frames.FLAG_MORE if more else 0)
        try:
            hdr, chunk = frames.parse(raw)
            out = reasm.feed(hdr, chunk)
        except WireError as exc:
            assert str(exc)
            continue
        if out is not None:
            assert out.numel() * out.element_size() <= 1 << 12


# ------------------------------------------------------------------ several values in frames
def _values_roundtrip(value, chunk: int, type_: int = frames.DATA):
    reasm = frames.Reassembler(1 << 24)
    out = None
    raws = list(frames.value_frames("activation", 11, value, chunk, type_=type_))
    for raw in raws:
        hdr, body = frames.parse(raw)
        assert hdr.values == (not isinstance(value, torch.Tensor) and getattr(value, "several", True))
        out = reasm.feed_arrival(hdr, body)
    return out, raws


@pytest.mark.parametrize("chunk", [64, 1 << 20])
@pytest.mark.parametrize("type_", [frames.DATA, frames.PUSH])
def test_several_values_cross_in_one_payload_of_frames(chunk, type_):
    h, mask, idx = torch.randn(16, 8, requires_grad=True), torch.ones(16, 8), torch.arange(16)
    arrived, raws = _values_roundtrip((h, mask, idx), chunk, type_)
    assert len(raws) > 1 if chunk == 64 else len(raws) == 1
    assert all(frames.parse(r)[0].codec == 0 for r in raws)
    got = arrived.value
    assert torch.equal(got[0], h.detach()) and torch.equal(got[1], mask) and torch.equal(got[2], idx)
    assert [t.requires_grad for t in got] == [True, False, False]
    assert arrived.nbytes == arrived.raw == 16 * 8 * 4 * 2 + 16 * 8
    # a gradient tuple: None where nothing flows back
    arrived, _ = _values_roundtrip((torch.randn(16, 8), None, None), chunk, type_)
    assert arrived.value[1:] == (None, None)


@pytest.mark.parametrize("spec", ["fp16", "int8", "topk:0.2"])
@pytest.mark.parametrize("chunk", [100, 1 << 20])
def test_encoded_values_say_their_codec_and_decode_to_what_the_engine_hands_over(spec, chunk):
    enc = cut_codec.CutEncoder(spec).encode((torch.randn(16, 8), torch.arange(16)))
    arrived, raws = _values_roundtrip(enc, chunk)
    assert {frames.parse(r)[0].codec for r in raws} == {compress.get_codec(spec).id}
    want = enc.decode()
    assert torch.equal(arrived.value[0], want[0]) and torch.equal(arrived.value[1], want[1])
    assert (arrived.nbytes, arrived.raw) == (enc.nbytes, enc.raw)
    single = cut_codec.CutEncoder(spec).encode(torch.randn(16, 8))
    arrived, raws = _values_roundtrip(single, chunk)
    assert not frames.parse(raws[0])[0].values and arrived.nbytes == compress.get_codec(spec).nbytes(want[0])


def test_the_values_flag_is_validated():
    with pytest.raises(WireError, match="several values"):
        frames.parse(_frame(type_=frames.REQUEST, flags=frames.FLAG_VALUES))
    with pytest.raises(WireError, match="unknown flag"):
        frames.parse(_frame(flags=4))
    payload = b"".join(bytes(p) for p in cut_codec.plain((torch.randn(30), torch.randn(30))).wire_parts())
    reasm = frames.Reassembler(1 << 20)
    reasm.feed(
        *frames.parse(_frame(total=len(payload), body=payload[:50], flags=frames.FLAG_MORE | frames.FLAG_VALUES))
    )
    with pytest.raises(WireError, match="values flag"):
        reasm.feed(*frames.parse(_frame(total=len(payload), body=payload[50:])))
    with pytest.raises(WireError):  # a values payload without the flag is not a tensor frame
        frames.Reassembler(1 << 20).feed(*frames.parse(_frame(body=payload)))
    with pytest.raises(WireError):  # the flag on a plain tensor frame
        frames.Reassembler(1 << 20).feed(*frames.parse(_frame(body=encode_tensor(torch.ones(3)), flags=2)))


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(
        st.tuples(
            st.integers(0, 5),  # codec id, including unknown ones
            st.integers(0, 1),  # tensor id
            st.integers(0, 600),  # declared total
            st.booleans(),  # more
            st.binary(max_size=80),
        ),
        min_size=1,
        max_size=5,
    ),
    prefix=st.sampled_from(
        [
            b"",
            b"".join(bytes(p) for p in cut_codec.plain((torch.zeros(3, 4), None, torch.arange(2))).wire_parts()),
            b"".join(bytes(p) for p in cut_codec.CutEncoder("int8").encode((torch.ones(2, 3),)).wire_parts()),
        ]
    ),
)
def test_fuzz_reassembler_with_the_values_flag_sees_only_wire_errors(chunks, prefix):
    reasm = frames.Reassembler(1 << 12)
    for i, (codec, tid, total, more, body) in enumerate(chunks):
        body = (prefix + body) if i == 0 else body
        raw = _frame(frames.PUSH, codec, tid, total, body, frames.FLAG_VALUES | (frames.FLAG_MORE if more else 0))
        try:
            arrived = reasm.feed_arrival(*frames.parse(raw))
        except WireError as exc:
            assert str(exc)
            continue
        if arrived is not None:
            assert isinstance(arrived.value, tuple) and arrived.raw <= 1 << 12
