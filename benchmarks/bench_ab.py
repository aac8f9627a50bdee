"""Two source trees' networked epochs, interleaved one by one: a before/after that a busy machine does not blur.

    OMP_NUM_THREADS=1 python benchmarks/bench_ab.py TREE_A TREE_B [--batches 30] [--pairs 60] [--sets 1] [--tcp]
        [--per-op]

On a shared machine the speed of the same work drifts by a factor of 1.5 or more over tens of seconds
(another guest's load), so two trees timed a run apart can differ by more than the change between them. Here
each tree (a checkout's root, e.g. a git worktree of an older commit, and this one) gets its own researcher
process with its own three ``splitnn worker`` processes, set up once, that import splitnn from that tree;
the two then take turns, one ``fit`` of one epoch (the tutorial network, batch 64, ``--batches`` batches,
shipped epochs over gRPC links unless ``--tcp`` or ``--per-op``) at a time, A then B, then B then A. While one
trains, the other's four processes wait idle. Each pair is a few hundred milliseconds apart, so both see
the same machine, and the ratio of a pair cancels the drift. The level of a whole set of processes also varies
from one start to the next (10% between two starts of the same tree here): ``--sets N`` starts both trees'
processes afresh N times, ``--pairs`` pairs each, and prints each set's median ratio too.

Printed: each tree's median samples/s and its workers' median CPU per batch, the median of the per-pair
ratios B/A with its quartiles, and how many pairs B won (with the two-sided sign-test p-value of "no
difference"). Not a test: nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from scipy.stats import binomtest  # (scipy comes with scikit-learn, a dependency)

NAMES = ("alice", "bob", "claire")
BATCH = 64


def _cpu(pid: int) -> float:
    """CPU seconds of ``pid``'s threads, in nanoseconds' precision (``schedstat``; ``stat`` counts 10 ms ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):  # the thread ended meanwhile
            continue
    return total / 1e9


def serve(tree: Path, batches: int, tcp: bool, per_op: bool) -> None:
    """A child: set up one tree's cluster and researcher, then run one epoch per ``go SEED`` line on stdin and
    answer each with a JSON line (wall seconds, the workers' CPU seconds)."""
    from bench_batch_cost import trained_cluster  # (this directory is on sys.path: the script's own)

    os.environ["PYTHONPATH"] = str(tree / "src")
    with trained_cluster(batches, tcp, per_op) as (model, data, cl):
        pids = [cl.workers[n].proc.pid for n in NAMES]
        print("ready", flush=True)
        for line in sys.stdin:
            seed = int(line.split()[1])
            c0, t0 = sum(map(_cpu, pids)), time.perf_counter()
            model.fit(data, epochs=1, batch_size=BATCH, seed=seed, progress=False)
            wall, cpu = time.perf_counter() - t0, sum(map(_cpu, pids)) - c0
            print(json.dumps({"wall": wall, "cpu": cpu}), flush=True)


def _child(tree: Path, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, __file__, str(tree), "--serve", "--batches", str(args.batches)]
    cmd += ["--tcp"] * args.tcp + ["--per-op"] * args.per_op
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree / "src")}
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit(f"bench_ab: the researcher of {tree} did not start (see its output above)")
    return proc


def _epoch(proc: subprocess.Popen, seed: int) -> dict:
    proc.stdin.write(f"go {seed}\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def _timed_set(trees: list[Path], args: argparse.Namespace) -> list[tuple[list[float], list[float]]]:
    """``args.pairs`` interleaved epoch pairs on a fresh researcher and workers per tree: each tree's wall and
    workers' CPU seconds per epoch."""
    procs = [_child(t, args) for t in trees]
    out: list[tuple[list[float], list[float]]] = [([], []), ([], [])]
    try:
        for p in range(args.pairs):
            for i in (0, 1) if p % 2 == 0 else (1, 0):
                for _ in range(args.warm):  # (untimed: the tree's processes warm again after the other's turn)
                    _epoch(procs[i], seed=p + 1)
                r = _epoch(procs[i], seed=p + 1)
                out[i][0].append(r["wall"])
                out[i][1].append(r["cpu"])
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait(60)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", type=Path, help="two source trees (checkout roots): A, then B")
    parser.add_argument("--batches", type=int, default=30, help="batches of 64 per epoch (default 30)")
    parser.add_argument("--pairs", type=int, default=60, help="epoch pairs timed (default 60)")
    parser.add_argument("--tcp", action="store_true", help="peer links over the TCP data plane")
    parser.add_argument("--per-op", action="store_true", help="one command per operation, not shipped epochs")
    parser.add_argument(
        "--sets",
        type=int,
        default=1,
        help="fresh researcher and workers per tree this many times, --pairs each (a start's level varies)",
    )
    parser.add_argument(
        "--warm",
        type=int,
        default=0,
        help="untimed epochs before each timed one, in the same turn (measures a tree warm, as back-to-back "
        "epochs run; 0: each timed epoch follows the other tree's)",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # (a child: one tree's researcher)
    args = parser.parse_args()
    trees = [t.resolve() for t in args.trees]
    if args.serve:
        sys.path[:0] = [str(trees[0] / "src"), str(trees[0])]
        serve(trees[0], args.batches, args.tcp, args.per_op)
        return
    if len(trees) != 2:
        parser.error("give exactly two trees, A and B")
    walls: list[list[float]] = [[], []]
    cpus: list[list[float]] = [[], []]
    for k in range(args.sets):
        set_walls = _timed_set(trees, args)
        for i in (0, 1):
            walls[i] += set_walls[i][0]
            cpus[i] += set_walls[i][1]
        if args.sets > 1:
            ratio = statistics.median(a / b for a, b in zip(set_walls[0][0], set_walls[1][0]))
            print(f"  set {k + 1} of {args.sets} (fresh processes): B/A speed, median of its pairs {ratio:.3f}")
    nb = args.batches
    path = "per-op" if args.per_op else "shipped epochs over " + ("TCP" if args.tcp else "gRPC") + " links"
    sets = f" in {args.sets} sets of fresh processes" if args.sets > 1 else ""
    print(f"{args.sets * args.pairs} interleaved epoch pairs{sets} of {nb} batches of {BATCH}, {path}")
    for name, t, w, c in zip("AB", trees, walls, cpus):
        print(
            f"  {name} {t}: median {nb * BATCH / statistics.median(w):,.0f} samples/s, "
            f"workers' CPU {1e3 * statistics.median(c) / nb:.3f} ms per batch"
        )
    cpu_ratios = sorted(b / a for a, b in zip(cpus[0], cpus[1]))
    print(f"  B/A workers' CPU, per pair: median {statistics.median(cpu_ratios):.3f}")
    ratios = sorted(a / b for a, b in zip(walls[0], walls[1]))  # B's speed over A's, pair by pair
    q1, med, q3 = statistics.quantiles(ratios, n=4)
    wins = sum(r > 1 for r in ratios)
    print(
        f"  B/A speed, per pair: median {med:.3f} (quartiles {q1:.3f}-{q3:.3f}); B faster in {wins} of "
        f"{len(ratios)} pairs (sign test p = {binomtest(wins, len(ratios)).pvalue:.2g})"
    )


if __name__ == "__main__":
    main()
