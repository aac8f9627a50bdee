"""The peer data plane's cost per byte, piece by piece (a micro-benchmark, not a test).

    OMP_NUM_THREADS=1 python benchmarks/bench_dataplane.py [--sizes 524288,2621440,8388608]
        [--chunks 262144,1048576,4128768] [--reps 30]

For float32 tensors of each size it times, as medians over ``--reps`` repetitions:

* ``memcpy``: one copy of the bytes (``bytearray`` -> ``bytes``): the yardstick;
* ``encode``: :func:`splitnn.transport.frames.data_frames` (the frames a tensor travels as);
* ``decode``: :func:`~splitnn.transport.frames.parse` + :class:`~splitnn.transport.frames.Reassembler`
  (the tensor a receiver gets back);

and then, for each peer chunk size of ``--chunks``, over one ``grpc.aio`` bidirectional
stream to a server in another process on 127.0.0.1 (repetitions interleaved across chunk
sizes and modes, so that a busy machine hits them alike):

* ``grpc raw``: the tensor's frames, built once, sent as ``bytes`` and answered with 24 bytes
  by a server that does nothing with them (gRPC alone);
* ``grpc frames``: the sender encodes the tensor into frames each time and the receiver parses,
  reassembles and decodes them (the data plane of a peer link, end to end);
* ``tcp floor``: no gRPC and no framing: a blocking socket sends the tensor's memory (a length,
  then ``sendall``) and the receiver ``recv_into``s it straight into a new tensor's memory --
  what any transport over this machine's loopback TCP costs at least;
* ``tcp frames``: the TCP data plane (``splitnn worker --data-listen``): the sender encodes the
  tensor into frames and sends them on a :class:`splitnn.transport.tcp.FrameStream` (as parts:
  the header and views of the tensor), the receiver parses, reassembles and decodes them, a
  whole tensor on the frame's own memory, as a TCP peer link does (``grpc frames`` without gRPC).

Each line fits ``time = fixed + per_byte x bytes`` over the sizes (least squares) and prints
the fixed cost (us) and ns/byte of wall time, and of CPU time of both processes together.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

os.environ.setdefault("OMP_NUM_THREADS", "1")

import grpc  # noqa: E402
import torch  # noqa: E402

from splitnn.transport import frames, tcp  # noqa: E402
from splitnn.transport.limits import Limits  # noqa: E402

MAX_BYTES = 1 << 30
MAX_FRAME = 64 << 20  # a frame of the largest chunk size, with its headers


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``; returns ``(a, b)``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _decode(raws: list[bytes]) -> torch.Tensor:
    reasm = frames.Reassembler(MAX_BYTES)
    out = None
    for raw in raws:
        out = reasm.feed(*frames.parse(raw))
    return out


def _copier(t: torch.Tensor):
    buf = bytearray(t.numpy().tobytes())
    return lambda: bytes(buf)


def _encoder(t: torch.Tensor, chunk: int):
    return lambda: list(frames.data_frames("activation", 1, t, chunk))


def _decoder(t: torch.Tensor, chunk: int):
    raws = list(frames.data_frames("activation", 1, t, chunk))
    assert torch.equal(_decode(raws), t)
    return lambda: _decode(raws)


def _cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by this process and process ``pid``."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return time.process_time() + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ the server (own process)
def _announce(port_file: str, port: int) -> None:
    """Tell the benchmark (polling ``port_file``) the port this server listens on, the file whole or absent."""
    with open(port_file + ".tmp", "w") as fh:
        fh.write(str(port))
    os.replace(port_file + ".tmp", port_file)


def serve(port_file: str, limits: Limits) -> None:
    async def raw(request_iterator, context):
        async for msg in request_iterator:
            if not msg[6] & frames.FLAG_MORE:  # answer once per tensor
                yield frames.request("activation", 0)

    async def decoded(request_iterator, context):
        reasm = frames.Reassembler(MAX_BYTES)
        async for msg in request_iterator:
            if reasm.feed(*frames.parse(msg)) is not None:
                yield frames.request("activation", 0)

    async def main() -> None:
        server = grpc.aio.server(options=limits.grpc_options())
        handlers = {
            "Raw": grpc.stream_stream_rpc_method_handler(raw),
            "Frames": grpc.stream_stream_rpc_method_handler(decoded),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Peer", handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        _announce(port_file, port)
        await server.wait_for_termination()

    asyncio.run(main())


def serve_tcp(port_file: str) -> None:
    """The ``tcp floor`` receiver: per message a 4-byte length, then that many bytes into a new tensor."""
    listener = socket.create_server(("127.0.0.1", 0))
    _announce(port_file, listener.getsockname()[1])
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def read_into(view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = conn.recv_into(view[got:])
            if n == 0:
                raise EOFError
            got += n

    try:
        while True:
            head = bytearray(4)
            read_into(memoryview(head))
            tensor = torch.empty(struct.unpack("<I", head)[0], dtype=torch.uint8)
            read_into(memoryview(tensor.numpy()))
            conn.sendall(b"k")
    except (EOFError, ConnectionError):
        pass


def serve_tcp_frames(port_file: str) -> None:
    """The ``tcp frames`` receiver: the TCP data plane's FrameStream; parses, reassembles and decodes every
    tensor's frames and answers once per tensor."""

    async def main() -> None:
        def opened(stream: tcp.FrameStream) -> None:
            async def receive() -> None:
                reasm = frames.Reassembler(MAX_BYTES)
                while (raw := await stream.read()) is not None:  # as a peer link: a frame not bytes is ours
                    if reasm.feed_arrival(*frames.parse(raw), owned=not isinstance(raw, bytes)) is not None:
                        await stream.send(frames.request("activation", 0))

            asyncio.get_running_loop().create_task(receive())

        server = await asyncio.get_running_loop().create_server(
            lambda: tcp.FrameStream(MAX_FRAME, on_open=opened, align=frames.payload_start), "127.0.0.1", 0
        )
        _announce(port_file, server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


async def _tcp_frame_rows(port: int, pid: int, tensors: list[torch.Tensor], chunks: list[int], reps: int) -> dict:
    """chunk -> per size: (median wall seconds, mean CPU seconds) to send one tensor's frames and get the answer."""
    wall: dict[tuple, list[float]] = defaultdict(list)
    cpu: dict[tuple, list[float]] = defaultdict(list)
    stream = tcp.FrameStream(MAX_FRAME)
    await asyncio.get_running_loop().create_connection(lambda: stream, "127.0.0.1", port)
    for rep in range(reps + 2):
        for chunk in chunks:
            for i, t in enumerate(tensors):
                c0, t0 = _cpu_seconds(pid), time.perf_counter()
                for frame in frames.data_frames("activation", 1, t, chunk, joined=False):
                    await stream.send(frame)
                await stream.read()
                if rep >= 2:
                    wall[chunk, i].append(time.perf_counter() - t0)
                    cpu[chunk, i].append(_cpu_seconds(pid) - c0)
    stream.cancel()
    return {
        chunk: [(statistics.median(wall[chunk, i]), statistics.fmean(cpu[chunk, i])) for i in range(len(tensors))]
        for chunk in chunks
    }


def _tcp_rows(port: int, pid: int, tensors: list[torch.Tensor], reps: int) -> list[tuple[float, float]]:
    """Per tensor: (median wall seconds, mean CPU seconds) to send it over the plain socket and get the answer."""
    wall: dict[int, list[float]] = defaultdict(list)
    cpu: dict[int, list[float]] = defaultdict(list)
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for rep in range(reps + 2):
            for i, t in enumerate(tensors):
                view = memoryview(t.numpy()).cast("B")
                c0, t0 = _cpu_seconds(pid), time.perf_counter()
                conn.sendall(struct.pack("<I", len(view)))
                conn.sendall(view)
                conn.recv(1)
                if rep >= 2:
                    wall[i].append(time.perf_counter() - t0)
                    cpu[i].append(_cpu_seconds(pid) - c0)
    return [(statistics.median(wall[i]), statistics.fmean(cpu[i])) for i in range(len(tensors))]


def _start_server(tmp: str, mode: str = "--serve") -> tuple[subprocess.Popen, int]:
    port_file = os.path.join(tmp, "port")
    proc = subprocess.Popen([sys.executable, __file__, mode, port_file])
    deadline = time.monotonic() + 60
    while not os.path.exists(port_file):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the benchmark's server did not start")
        time.sleep(0.05)
    with open(port_file) as fh:
        return proc, int(fh.read())


async def _grpc_rows(port: int, pid: int, tensors: list[torch.Tensor], chunks: list[int], reps: int) -> dict:
    """(mode, chunk) -> per size: (median wall seconds, mean CPU seconds) to send one tensor and get the answer."""
    limits = Limits(chunk_bytes=max(chunks))
    wall: dict[tuple, list[float]] = defaultdict(list)
    cpu: dict[tuple, list[float]] = defaultdict(list)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=limits.grpc_options()) as channel:
        calls = {
            mode: channel.stream_stream(f"/bench.Peer/{mode}", request_serializer=None, response_deserializer=None)()
            for mode in ("Raw", "Frames")
        }
        prebuilt = {
            (i, c): list(frames.data_frames("activation", 1, t, c)) for i, t in enumerate(tensors) for c in chunks
        }
        for rep in range(reps + 2):
            for mode, call in calls.items():
                for chunk in chunks:
                    for i, t in enumerate(tensors):
                        c0, t0 = _cpu_seconds(pid), time.perf_counter()
                        sent = prebuilt[i, chunk] if mode == "Raw" else frames.data_frames("activation", 1, t, chunk)
                        for frame in sent:
                            await call.write(frame)
                        await call.read()
                        if rep >= 2:  # two warm-up rounds
                            wall[mode, chunk, i].append(time.perf_counter() - t0)
                            cpu[mode, chunk, i].append(_cpu_seconds(pid) - c0)
        for call in calls.values():
            await call.done_writing()
    out = {}
    for mode in ("Raw", "Frames"):
        for chunk in chunks:
            out[mode, chunk] = [
                (statistics.median(wall[mode, chunk, i]), statistics.fmean(cpu[mode, chunk, i]))
                for i in range(len(tensors))
            ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="524288,2621440,8388608", help="tensor sizes in bytes")
    parser.add_argument("--chunks", default=f"262144,1048576,{Limits().chunk_bytes}", help="peer chunk sizes")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--only-grpc", action="store_true", help="skip the in-process steps")
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--serve-tcp", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--serve-tcp-frames", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    chunks = [int(c) for c in args.chunks.split(",")]
    if args.serve:
        serve(args.serve, Limits(chunk_bytes=max(64 << 20, *chunks)))
        return
    if args.serve_tcp:
        serve_tcp(args.serve_tcp)
        return
    if args.serve_tcp_frames:
        serve_tcp_frames(args.serve_tcp_frames)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    tensors = [torch.randn(n // 4) for n in sizes]
    print(f"peer data plane, float32 tensors, medians of {args.reps}")
    print(f"{'step':24s} " + " ".join(f"{n:>11,d}B" for n in sizes) + f" {'fixed us':>9s} {'ns/byte':>8s}")

    def line(label: str, times: list[float], extra: str = "") -> None:
        fixed, per_byte = fit_line(sizes, times)
        cells = " ".join(f"{1e6 * x:10.0f}us" for x in times)
        print(f"{label:24s} {cells} {1e6 * fixed:9.1f} {1e9 * per_byte:8.3f}{extra}")

    if not args.only_grpc:
        line("memcpy", [_median_time(_copier(t), args.reps) for t in tensors])
        for chunk in chunks:
            line(f"encode, chunk {chunk >> 10} KiB", [_median_time(_encoder(t, chunk), args.reps) for t in tensors])
        for chunk in chunks:
            line(f"decode, chunk {chunk >> 10} KiB", [_median_time(_decoder(t, chunk), args.reps) for t in tensors])
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = _start_server(tmp)
        try:
            rows = asyncio.run(_grpc_rows(port, proc.pid, tensors, chunks, args.reps))
        finally:
            proc.terminate()
            proc.wait(10)
    for (mode, chunk), cells in rows.items():
        _, cpu_per_byte = fit_line(sizes, [c for _, c in cells])
        label = f"grpc {mode.lower()}, chunk {chunk >> 10} KiB"
        line(label, [w for w, _ in cells], f"   CPU (both processes) {1e9 * cpu_per_byte:.3f} ns/byte")
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = _start_server(tmp, "--serve-tcp")
        try:
            cells = _tcp_rows(port, proc.pid, tensors, args.reps)
        finally:
            proc.terminate()
            proc.wait(10)
    _, cpu_per_byte = fit_line(sizes, [c for _, c in cells])
    line("tcp floor", [w for w, _ in cells], f"   CPU (both processes) {1e9 * cpu_per_byte:.3f} ns/byte")
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = _start_server(tmp, "--serve-tcp-frames")
        try:
            tcp_rows = asyncio.run(_tcp_frame_rows(port, proc.pid, tensors, chunks, args.reps))
        finally:
            proc.terminate()
            proc.wait(10)
    for chunk, cells in tcp_rows.items():
        _, cpu_per_byte = fit_line(sizes, [c for _, c in cells])
        label = f"tcp frames, chunk {chunk >> 10} KiB"
        line(label, [w for w, _ in cells], f"   CPU (both processes) {1e9 * cpu_per_byte:.3f} ns/byte")


if __name__ == "__main__":
    main()
