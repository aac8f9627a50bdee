"""A worker's resident memory under the memory attacks of issue 24 (data plane and early pushes).

    OMP_NUM_THREADS=1 python benchmarks/bench_floods.py [--connections 200] [--pushes 6] [--part all] [--worker-src DIR]

Starts one ``splitnn worker --data-listen`` process per part and prints its ``VmRSS`` (MB) before,
during and after each attack (:mod:`splitnn.testing.floods`):

1. ``pre-hello``: ``--connections`` connections without the token, each sending 1 MiB - 1 byte of a
   declared 1 MiB first frame instead of a hello, held open, then closed.
2. ``idle``: ``--connections`` connections that send nothing, held open, then closed.
3. ``topk``: a researcher with the token opens a session and, as a made-up peer, pushes ``--pushes``
   early 68-byte frames each carrying a 40-byte ``topk`` payload that declares 2^27 float32 values.
4. ``grpc``: ``--connections`` // 2 gRPC calls with a wrong token, each carrying a 4 MiB request message.

``--worker-src`` runs the worker from another source tree (its ``src``: an A/B against another branch).

Not a test: nothing here asserts; tests/server/test_memory_bounds.py asserts the bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import splitnn  # noqa: E402
from splitnn.testing import floods  # noqa: E402
from splitnn.testing.cluster import Cluster  # noqa: E402


def mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


def settle(seconds: float = 1.0) -> None:
    time.sleep(seconds)


def part(name: str, cluster: Cluster, args) -> None:
    wp = cluster.workers["bob"]
    data = wp.address.rsplit(":", 1)[0] + ":" + str(cluster.data_listen("bob").rsplit(":", 1)[1])
    before = wp.rss_bytes()
    if name == "pre-hello":
        with floods.pre_hello_flood(data, args.connections) as socks:
            settle()
            during = wp.rss_bytes()
            alive = len(socks)
    elif name == "idle":
        with floods.idle_flood(data, args.connections) as socks:
            settle()
            during = wp.rss_bytes()
            alive = len(socks)
    elif name == "grpc":
        import grpc

        from splitnn.wire.proto import CALL

        opts = [("grpc.max_send_message_length", 8 << 20)]
        channels = [grpc.insecure_channel(wp.address, options=opts) for _ in range(args.connections // 2)]
        md = (("x-splitnn-token", "wrong"), ("x-splitnn-party", "researcher"))
        calls = [
            ch.unary_unary(CALL, request_serializer=None, response_deserializer=None).future(
                b"\0" * (4 << 20), metadata=md, timeout=60
            )
            for ch in channels
        ]
        alive = ",".join(sorted({c.exception().code().name if c.exception() else "OK" for c in calls}))
        settle()
        during = wp.rss_bytes()
        for ch in channels:
            ch.close()
    else:
        (w,) = cluster.connect("bob")
        try:
            t0 = time.perf_counter()
            acks = asyncio.run(floods.topk_bomb(data, cluster.token, w.session_tag, args.pushes, parties=args.pushes))
            during = wp.rss_bytes()
            alive = f"{len(acks)} kept, {time.perf_counter() - t0:.1f} s"
        finally:
            w.close()
    settle(2.0)
    after = wp.rss_bytes()
    print(
        f"{name:10s} before {mb(before):>9s}  during {mb(during):>9s}  after close {mb(after):>9s}  "
        f"peak {mb(wp.rss_bytes('VmHWM')):>9s}  ({alive})",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=200)
    ap.add_argument("--pushes", type=int, default=6)
    ap.add_argument("--part", choices=("all", "pre-hello", "idle", "topk", "grpc"), default="all")
    ap.add_argument("--worker-src", default=None, help="run the worker from this source tree (its PYTHONPATH)")
    args = ap.parse_args()
    names = ("pre-hello", "idle", "topk", "grpc") if args.part == "all" else (args.part,)
    print(f"splitnn {splitnn.__version__} from {Path(splitnn.__file__).parent}", file=sys.stderr)
    env = {"PYTHONPATH": args.worker_src} if args.worker_src else {}
    for name in names:
        with tempfile.TemporaryDirectory() as tmp, Cluster(Path(tmp), tcp=True, env=env) as cluster:
            cluster.start("bob")
            settle()
            part(name, cluster, args)


if __name__ == "__main__":
    main()
