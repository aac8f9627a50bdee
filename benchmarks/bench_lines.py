"""Python lines each party of a networked epoch executes per batch: a count, not a timing.

    OMP_NUM_THREADS=1 python benchmarks/bench_lines.py TREE [TREE ...] [--per-op] [--tcp] [--batches 30]
        [--epochs 4] [--top 12]

On this shared two-core machine the same epoch's wall time and CPU time move by half between two runs
minutes apart, and a change of a few percent drowns in that. The number of Python lines the workers run
per batch does not move: it counts work, not time. For each source tree (a checkout's root, e.g. a git
worktree of an older commit, and this one), in turn, this starts three ``splitnn worker`` processes that
import splitnn from that tree, with ``benchmarks/line_counts`` on their ``PYTHONPATH`` (a ``sys.settrace``
line counter switched on and off by a signal), trains the tutorial network on them (batch 64, one warm-up
epoch, then ``--epochs`` counted), and prints the lines per batch of each party (the researcher's main
thread too), by where the code lives (splitnn, asyncio, grpc, torch, other), and the ``--top`` functions of
splitnn. With two trees it prints the second's functions that run more lines than the first's.

A line of Python costs some tenths of a microsecond in a worker (more than in a tight loop: the caches are
cold), so a thousand more lines a batch over the three workers is of the order of the per-batch cost that
issue 25 chased. The count is of line events: a multi-line expression counts once per line, so compare
counts of the same code before and after a change, not two different ways of writing it. Tracing slows
the workers several times; nothing here is timed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "line_counts"))
from line_counter import LineCounter  # noqa: E402  (the workers' counter, in benchmarks/line_counts)

NAMES = ("alice", "bob", "claire")
BATCH = 64
GROUPS = ("splitnn", "asyncio", "grpc", "torch", "other")


def group(filename: str) -> str:
    """Where the code of ``filename`` lives: one of :data:`GROUPS`."""
    f = filename.replace("\\", "/")
    if "/splitnn/" in f:
        return "splitnn"
    if "/asyncio/" in f or f.endswith("/selectors.py"):
        return "asyncio"
    if "/grpc/" in f:
        return "grpc"
    if "/torch/" in f:
        return "torch"
    return "other"


def count_lines(model, data, pids: dict[str, int], out: Path, epochs: int) -> dict[str, list]:
    """Train ``epochs`` epochs of ``model`` on ``data`` while the workers ``pids`` (started with
    ``line_counts`` on their path and ``SPLITNN_LINE_COUNTS=out``) and this thread count their lines; each
    party's rows ``[file, function, first line, lines]``."""
    counter = LineCounter()
    for pid in pids.values():
        os.kill(pid, signal.SIGUSR1)
    time.sleep(0.5)  # (the handlers run between two bytecodes of each worker's main thread)
    counter.start()
    try:
        for e in range(epochs):
            model.fit(data, epochs=1, batch_size=BATCH, seed=e + 1, progress=False)
    finally:
        researcher = counter.stop()
    for pid in pids.values():
        os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 60
    while not all((out / f"{n}.json").exists() for n in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    rows = {n: json.loads((out / f"{n}.json").read_text()) for n in pids}
    rows["researcher"] = researcher
    return rows


def per_batch(rows: dict[str, list], batches: int) -> dict[str, dict[str, float]]:
    """Lines per batch of each party, in all and by :func:`group`."""
    out = {}
    for party, fns in rows.items():
        by = collections.Counter()
        for f, _, _, n in fns:
            by[group(f)] += n
        out[party] = {"all": sum(by.values()) / batches, **{g: by[g] / batches for g in GROUPS}}
    return out


def _one(tree: Path, args: argparse.Namespace) -> dict:
    """In a process that imports splitnn from ``tree``: count, and return the rows and per-batch figures."""
    from bench_batch_cost import trained_cluster  # (this directory is on sys.path: the script's own)

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SPLITNN_LINE_COUNTS"] = tmp
        os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE / "line_counts"), str(tree / "src")])
        with trained_cluster(args.batches, args.tcp, args.per_op) as (model, data, cl):
            pids = {n: cl.workers[n].proc.pid for n in NAMES}
            rows = count_lines(model, data, pids, Path(tmp), args.epochs)
    nb = args.epochs * args.batches
    return {"tree": str(tree), "per_batch": per_batch(rows, nb), "rows": rows, "batches": nb}


def _functions(result: dict, *, where: bool = True) -> collections.Counter:
    """splitnn's lines per batch by function (``where``: with its module's path), over every party."""
    out: collections.Counter = collections.Counter()
    for fns in result["rows"].values():
        for f, name, _, n in fns:
            if group(f) == "splitnn":
                key = f"{f.replace(os.sep, '/').split('/splitnn/')[-1]}:{name}" if where else name
                out[key] += n / result["batches"]
    return out


def report(results: list[dict], top: int) -> None:
    for r in results:
        print(f"{r['tree']}: Python lines per batch")
        for party, by in r["per_batch"].items():
            print(f"  {party:10s} {by['all']:8.0f}   " + "  ".join(f"{g} {by[g]:6.0f}" for g in GROUPS))
        for name, n in _functions(r).most_common(top):
            print(f"    {n:7.1f}  {name}")
    if len(results) == 2:
        # by name alone: a function that moved to another module is still compared with itself
        a, b = (_functions(r, where=False) for r in results)
        grew = sorted(((b[k] - a.get(k, 0.0), k) for k in b), reverse=True)[:top]
        print(f"splitnn functions (by name) that run more lines per batch in {results[1]['tree']}:")
        for d, k in grew:
            if d > 0:
                print(f"    {d:+7.1f}  {k}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", type=Path, help="source trees (checkout roots), counted in turn")
    parser.add_argument("--batches", type=int, default=30, help="batches of 64 per epoch (default 30)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs counted after the warm-up (default 4)")
    parser.add_argument("--per-op", action="store_true", help="one command per operation, not shipped epochs")
    parser.add_argument("--tcp", action="store_true", help="peer links over the TCP data plane")
    parser.add_argument("--top", type=int, default=12, help="splitnn functions listed (default 12)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # (a child: count trees[0])
    args = parser.parse_args()
    if args.one:
        tree = args.trees[0].resolve()
        sys.path[:0] = [str(tree / "src"), str(tree)]
        print(json.dumps(_one(tree, args)), flush=True)
        return
    results = []
    for tree in args.trees:
        cmd = [sys.executable, __file__, str(tree.resolve()), "--one", "--batches", str(args.batches)]
        cmd += ["--epochs", str(args.epochs)] + ["--per-op"] * args.per_op + ["--tcp"] * args.tcp
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree.resolve() / "src")}
        done = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    report(results, args.top)


if __name__ == "__main__":
    main()
