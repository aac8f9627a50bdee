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
