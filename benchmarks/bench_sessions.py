"""A worker as a shared service: what closed sessions leave behind, and what a connection flood costs.

    OMP_NUM_THREADS=1 python benchmarks/bench_sessions.py [--sessions 5] [--flood 1100] [--part memory|flood]

1. Memory. ``--sessions`` researcher sessions one after the other, each uploading 40 x 2 MiB of
   features that stay at the data holder (never consumed), then closing its connection. Prints
   the data holder's resident memory (``VmRSS``) before and after each session: a session's
   tensors are freed when it closes.
2. Flood. ``--flood`` idle TCP connections (no token, no bytes) to a worker started with a soft
   open-files limit of 1024, then a researcher connects and trains two batches. Once with the
   hard limit above the flood (the worker raises its soft limit at start), once with the hard
   limit at 1024 too (it cannot: the flood holds every descriptor until gRPC's handshake
   timeout drops it). Prints the seconds until the researcher's training finished and how
   long the idle connections stayed open.

Not a test: nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.helpers

import torch  # noqa: E402
from torch import nn  # noqa: E402

import splitnn  # noqa: E402
from splitnn.accounting import RESEARCHER  # noqa: E402
from splitnn.client.remote import RemoteWorker  # noqa: E402

MiB = 1 << 20


def _segments() -> list[nn.Module]:
    torch.manual_seed(0)
    return [
        nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU()),
        nn.Sequential(nn.Linear(32, 10), nn.LogSoftmax(1)),
    ]


def memory(sessions: int) -> None:
    from splitnn.testing.cluster import Cluster

    with tempfile.TemporaryDirectory() as tmp, Cluster(Path(tmp)) as cl:
        alice = cl.start("alice")
        cl.start("bob")
        rows = [("start", alice.rss_bytes())]
        for i in range(sessions):
            workers = [splitnn.connect(cl.workers[n].url, token=cl.token, name=n) for n in ("alice", "bob")]
            splitnn.SplitNN(_segments(), workers)
            for k in range(40):
                workers[0].put(torch.full((512, 1024), float(k)), src=RESEARCHER, kind="features")
            workers[0].drain()
            held = alice.rss_bytes()
            for w in workers:
                w.close()
            time.sleep(1.0)  # the worker notices the closed stream
            rows.append((f"session {i + 1}: holding / closed", held, alice.rss_bytes()))
        print(f"\n{sessions} sessions x 40 x 2 MiB of features put at the data holder, each then closed:")
        print("| | data holder RSS (MiB) |")
        print("|---|---|")
        print(f"| before | {rows[0][1] / MiB:.0f} |")
        for label, held, closed in rows[1:]:
            print(f"| {label} | {held / MiB:.0f} / {closed / MiB:.0f} |")
        print(f"| growth over {sessions} sessions | {(rows[-1][2] - rows[0][1]) / MiB:+.0f} |")


def flood(n: int, hard_limit: int | None) -> tuple[float, float]:
    from splitnn.testing.cluster import Cluster, open_files_prefix
    from tests.helpers import toy_dataset

    socks: list[socket.socket] = []
    with tempfile.TemporaryDirectory() as tmp, Cluster(Path(tmp)) as cl:
        alice = cl.start("alice", prefix=open_files_prefix(1024, hard_limit))
        cl.start("bob")
        host, port = alice.address.rsplit(":", 1)
        t0 = time.monotonic()
        for _ in range(n):
            socks.append(socket.create_connection((host, int(port)), timeout=10))
        workers = [  # a patient researcher: connect's default gives up after 10 s
            RemoteWorker(cl.workers[m].url, token=cl.token, name=m, timeout=120, connect_timeout=120)
            for m in ("alice", "bob")
        ]
        model = splitnn.SplitNN(_segments(), workers)
        model.fit(toy_dataset(64), epochs=1, batch_size=32, progress=False)
        fit_s = time.monotonic() - t0
        for w in workers:
            w.close()
        open_ = set(range(len(socks)))
        for s in socks:
            s.setblocking(False)
        while open_ and time.monotonic() - t0 < 300:
            for i in list(open_):
                try:
                    if socks[i].recv(1) == b"":
                        open_.discard(i)
                except BlockingIOError:
                    pass
                except OSError:
                    open_.discard(i)
            time.sleep(0.2)
        dropped_s = time.monotonic() - t0
        for s in socks:
            s.close()
    return fit_s, dropped_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=5)
    ap.add_argument("--flood", type=int, default=1100)
    ap.add_argument("--part", choices=("all", "memory", "flood"), default="all")
    args = ap.parse_args()
    torch.set_num_threads(1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.flood + 512)), hard))
    if args.part in ("all", "memory"):
        memory(args.sessions)
    if args.part == "memory":
        return
    print(f"\n{args.flood} idle connections to a worker started with a soft open-files limit of 1024:")
    print("| worker's hard limit | researcher's connect + fit done after (s) | idle connections closed after (s) |")
    print("|---|---|---|")
    for label, limit in ((f"{hard} (soft raised at start)", None), ("1024 (cannot raise)", 1024)):
        fit_s, dropped_s = flood(args.flood, limit)
        print(f"| {label} | {fit_s:.1f} | {dropped_s:.1f} |")


if __name__ == "__main__":
    main()
