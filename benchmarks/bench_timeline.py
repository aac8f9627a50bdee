"""Where a lock-step batch of shipped epochs waits: the hops between workers and each party's span.

    OMP_NUM_THREADS=1 python benchmarks/bench_timeline.py TREE [TREE ...] [--batches 30] [--epochs 10] [--rounds 2]

For each source tree (a checkout's root: this one, a git worktree of an older commit), in turn, ``--rounds``
times: starts three ``splitnn worker`` processes that import splitnn from that tree, with
``benchmarks/hop_timeline`` on their ``PYTHONPATH`` (time stamps on each data frame read and written, and around
the engine's calls), trains the tutorial network on them (batch 64, shipped epochs over gRPC links; one warm-up
epoch, then ``--epochs`` timed), and prints the median microseconds of each piece of a batch's chain: each hop
(a frame's write started at its sender to its read returning at its receiver) and each party's span between
the frame it waited for and the frame it sends; and, within a span, the time from the frame's arrival to the
party's first engine call and from its last engine call to the write (what a push costs at each end). The
pieces of a batch follow one another, so their sum is about a batch's time. Frames are told apart by size (the
tutorial network's cuts: 64 x 128 and 64 x 640 float32). Not a test: nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = ("alice", "bob", "claire")
BATCH = 64
SMALL = 100_000  # bytes: the 64 x 128 cut's frames are under it, the 64 x 640 cut's over


def _child(tree: Path, out: Path, batches: int, epochs: int) -> None:
    """Run in a process that imports splitnn from ``tree``: train, with the workers stamping into ``out``."""
    from bench_batch_cost import trained_cluster  # (this directory is on sys.path: the script's own)

    os.environ["SPLITNN_TIMELINE"] = str(out)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE / "hop_timeline"), str(tree / "src")])
    with trained_cluster(batches, False, False) as (model, data, _):
        (out / "reset").touch()
        time.sleep(0.6)
        t0 = time.perf_counter()
        for e in range(epochs):
            model.fit(data, epochs=1, batch_size=BATCH, seed=e + 1, progress=False)
        print(json.dumps({"samples/s": epochs * len(data) / (time.perf_counter() - t0)}), flush=True)
        (out / "dump").touch()
        for n in NAMES:
            while not (out / f"{n}.json").exists():
                time.sleep(0.1)


def _frames(stamps: list, tag: str, small: bool) -> list[int]:
    return [t for t, k, n in stamps if k == tag and (n < SMALL) == small]


def _around(stamps: list, arrivals: list[int], sends: list[int]) -> tuple[list[int], list[int]]:
    """For each (arrival, the send after it): arrival to the first engine call, last engine call's end to send."""
    calls = [(t, k) for t, k, _ in stamps if k[-1] in "01" and k[:-1] not in ("s",)]
    first, last = [], []
    for a, s in zip(arrivals, sends):
        inside = [(t, k) for t, k in calls if a <= t <= s]
        if inside:
            first.append(inside[0][0] - a)
            last.append(s - inside[-1][0])
    return first, last


def analyse(out: Path) -> dict[str, float]:
    """Median microseconds of each piece of a batch's chain (see the module's docstring)."""
    st = {n: json.loads((out / f"{n}.json").read_text()) for n in NAMES}
    a_send, a_recv = _frames(st["alice"], "s0", True), _frames(st["alice"], "r", True)
    b_recv_act, b_send_act = _frames(st["bob"], "r", True), _frames(st["bob"], "s0", False)
    b_recv_grad, b_send_grad = _frames(st["bob"], "r", False), _frames(st["bob"], "s0", True)
    c_recv, c_send = _frames(st["claire"], "r", False), _frames(st["claire"], "s0", False)
    n = min(map(len, (a_send, a_recv, b_recv_act, b_send_act, b_recv_grad, b_send_grad, c_recv, c_send)))
    pieces = {
        "hop alice -> bob (activation)": [b_recv_act[i] - a_send[i] for i in range(n)],
        "bob: forward span": [b_send_act[i] - b_recv_act[i] for i in range(n)],
        "hop bob -> claire (activation)": [c_recv[i] - b_send_act[i] for i in range(n)],
        "claire: forward, loss, backward span": [c_send[i] - c_recv[i] for i in range(n)],
        "hop claire -> bob (gradient)": [b_recv_grad[i] - c_send[i] for i in range(n)],
        "bob: backward span": [b_send_grad[i] - b_recv_grad[i] for i in range(n)],
        "hop bob -> alice (gradient)": [a_recv[i] - b_send_grad[i] for i in range(n)],
        # (within an epoch: a run's last gradient is followed by the next fit's start, not by a batch)
        "alice: backward, step, forward span": [d for i in range(n - 1) if 0 < (d := a_send[i + 1] - a_recv[i]) < 5e6],
    }
    ends = {
        "alice": _around(st["alice"], a_recv, a_send[1:]),
        "bob (activation)": _around(st["bob"], b_recv_act, b_send_act),
        "claire": _around(st["claire"], c_recv, c_send),
        "bob (gradient)": _around(st["bob"], b_recv_grad, b_send_grad),
    }
    for who, (first, last) in ends.items():
        pieces[f"{who}: frame in to first engine call"] = first
        pieces[f"{who}: last engine call to frame out"] = last
    return {k: statistics.median(v) / 1e3 for k, v in pieces.items() if v}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="*", type=Path)
    parser.add_argument("--batches", type=int, default=30, help="batches of 64 per epoch (default 30)")
    parser.add_argument("--epochs", type=int, default=10, help="timed epochs per tree and round (default 10)")
    parser.add_argument("--rounds", type=int, default=2, help="times each tree runs, trees alternating (default 2)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # (TREE OUT: one tree's researcher)
    args = parser.parse_args()
    if args.child:
        tree, out = map(Path, args.child)
        sys.path[:0] = [str(tree / "src"), str(tree)]
        _child(tree, out, args.batches, args.epochs)
        return
    if not args.trees:
        parser.error("give at least one tree")
    for r in range(args.rounds):
        for tree in [t.resolve() for t in args.trees]:
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, __file__, "--child", str(tree), tmp, "--batches", str(args.batches)]
                cmd += ["--epochs", str(args.epochs)]
                env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree / "src")}
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                rate = json.loads(done.stdout.strip().splitlines()[-1])["samples/s"]
                pieces = analyse(Path(tmp))
            print(f"{tree} (round {r + 1}): {rate:,.0f} samples/s; median us per batch:")
            for k, v in pieces.items():
                print(f"  {k:44s} {v:8.1f}")
            chain = sum(v for k, v in pieces.items() if k.startswith("hop") or k.endswith("span"))
            print(f"  {'sum of the chain':44s} {chain:8.1f}")


if __name__ == "__main__":
    main()
