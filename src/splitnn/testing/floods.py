"""Memory attacks on a worker's TCP data plane, for regression tests and ``benchmarks/bench_floods.py``.

Each helper is what an attacker does, written with plain sockets and the wire helpers, so that a test
can run it against a real ``splitnn worker`` process and read the worker's resident memory
(:meth:`splitnn.testing.cluster.WorkerProcess.rss_bytes`) before, during and after:

* :func:`pre_hello_flood` -- without the token: connections that each send the start of one big first
  frame instead of a hello, and hold on;
* :func:`idle_flood` -- without the token: connections that send nothing;
* :func:`topk_bomb` -- with the token, into the attacker's own session: early pushes of a tiny ``topk``
  payload that declares a huge tensor.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator

import torch

from splitnn.transport import frames, tcp
from splitnn.transport.addresses import split_host_port
from splitnn.wire import compress
from splitnn.wire.tensor_codec import DTYPE_CODES
from splitnn.workers.epoch import push_id


def _connect(address: str) -> socket.socket:
    host, port = split_host_port(address, "a data-plane address")
    sock = socket.create_connection((host, port), timeout=30)
    sock.setblocking(True)
    return sock


@contextlib.contextmanager
def pre_hello_flood(address: str, connections: int, frame_bytes: int = 1 << 20):
    """Open ``connections`` connections to the data plane at ``address``; on each, declare a first frame of
    ``frame_bytes`` bytes and send all of it but its last byte (no hello ever completes). Yields the sockets
    still open (the listener may have closed some); closes them all on exit."""
    socks = []
    body = b"\0" * (frame_bytes - 1)
    try:
        for _ in range(connections):
            sock = _connect(address)
            socks.append(sock)
            try:
                sock.settimeout(5)
                sock.sendall(struct.pack("<I", frame_bytes) + body)
            except OSError:  # the listener closed it (the frame was refused): as it should
                pass
        yield socks
    finally:
        for sock in socks:
            sock.close()


@contextlib.contextmanager
def idle_flood(address: str, connections: int):
    """Open ``connections`` connections to ``address`` that send nothing; close them on exit."""
    socks = []
    try:
        for _ in range(connections):
            socks.append(_connect(address))
        yield socks
    finally:
        for sock in socks:
            sock.close()


def topk_payload(numel: int, kept: int = 1) -> bytes:
    """A ``topk`` codec payload of ``kept`` values (1.0, spread evenly) that declares a 1-D float32 tensor of
    ``numel`` elements: 40 bytes for one value, whatever ``numel`` says."""
    head = struct.pack("<4sBBBB", compress.MAGIC, compress.CODEC_IDS["topk"], DTYPE_CODES[torch.float32], 1, 0)
    step = max(numel // kept, 1)
    index = struct.pack(f"<{kept}i", *range(0, step * kept, step))
    return (
        head
        + struct.pack("<Q", numel)
        + struct.pack("<QB7x", kept, 4)
        + index
        + struct.pack(f"<{kept}f", *[1.0] * kept)
    )


@contextlib.asynccontextmanager
async def peer_stream(address: str, token: str, party: str, tag: str | None) -> AsyncIterator[tcp.FrameStream]:
    """A data-plane connection past its hello, as party ``party`` to the session tagged ``tag``."""
    host, port = split_host_port(address, "a data-plane address")
    stream = tcp.FrameStream.for_peer_frames(1 << 20)
    await asyncio.get_running_loop().create_connection(lambda: stream, host, port)
    try:
        await stream.send(tcp.hello(token, party, tag))
        answer = await asyncio.wait_for(stream.read(), 30)
        if answer != tcp.OK:
            raise ConnectionError(f"hello refused: {None if answer is None else bytes(answer)!r}")
        stream.admit()
        yield stream
    finally:
        stream.cancel()


async def topk_bomb(
    address: str,
    token: str,
    tag: str | None,
    pushes: int,
    numel: int = 1 << 27,
    *,
    kept: int = 1,
    parties: int = 1,
    run_id: int = 4242,
) -> list[tuple[str, int]]:
    """Push ``pushes`` early ``topk`` activations (each :func:`topk_payload` of ``numel`` and ``kept``) into session
    ``tag`` over the data plane at ``address``, from ``parties`` made-up party names in turn (names are free).
    Returns the ``(kind, id)`` acknowledgements the worker sent back (what it kept)."""
    payload = topk_payload(numel, kept)
    acks: list[tuple[str, int]] = []
    names = [f"mallory{i}" for i in range(parties)]
    streams = []
    try:
        for name in names:
            cm = peer_stream(address, token, name, tag)
            streams.append((cm, await cm.__aenter__()))
        for i in range(pushes):
            _, stream = streams[i % parties]
            fid = push_id(run_id, i, 0)
            for frame in frames.payload_frames(
                "activation", fid, [payload], 1 << 20, type_=frames.PUSH, codec=compress.CODEC_IDS["topk"]
            ):
                await stream.send(frame)
        for _, stream in streams:  # ask for the acknowledgements of what was kept
            await stream.send(frames.ack(()))
        for _, stream in streams:
            while True:
                try:
                    raw = await asyncio.wait_for(stream.read(), 2.0)
                except asyncio.TimeoutError:
                    break
                if raw is None:
                    break
                hdr, chunk = frames.parse(bytes(raw))
                if hdr.type == frames.ACK:
                    acks.extend(frames.acked(chunk))
    finally:
        for cm, _ in streams:
            await cm.__aexit__(None, None, None)
    return acks
