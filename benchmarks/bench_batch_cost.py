"""The per-batch cost of networked training, per party, in counts that a busy machine does not blur.

    OMP_NUM_THREADS=1 python benchmarks/bench_batch_cost.py TREE [TREE ...] [--batches 60] [--runs 3]
        [--rounds 2] [--tcp] [--per-op] [--yappi DIR]

For each source tree (a checkout's root, e.g. this one and a git worktree of an older commit), in
turn, ``--rounds`` times: starts three ``splitnn worker`` processes that import splitnn from that
tree, trains the tutorial network on them (batch 64, ``--batches`` batches per epoch, ``--runs``
epochs after a warm-up; shipped epochs over gRPC links, or ``--tcp`` links, or ``--per-op``
commands), and prints one JSON line: samples/s (wall clock: noisy on a shared machine), and per
batch each party's CPU milliseconds (``/proc``, 10 ms ticks; also by thread, and user and system
apart), minor page faults, context switches, event-loop passes, tasks created and the garbage
collector's passes (``benchmarks/loop_counts`` on the workers' ``PYTHONPATH``), and the machine's busy
and stolen CPU. The researcher runs the tree's own client too, so an old tree is measured as it was.
``--yappi DIR`` also saves each worker's yappi profile of the timed epochs as
``DIR/<tree>-<round>/<party>.pstat``. Not a test: nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = ("alice", "bob", "claire")
GC_KEYS = ("gc0", "gc1", "gc2", "gc_s")  # collections per generation, and seconds in them
BATCH = 64


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _switches(pid: int) -> dict[str, float]:
    """User and system CPU seconds of ``pid``, its minor page faults and its threads' context switches
    (voluntary: waits; not: preempted)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    out = {"user": int(fields[11]) / os.sysconf("SC_CLK_TCK"), "sys": int(fields[12]) / os.sysconf("SC_CLK_TCK")}
    out["minflt"] = float(fields[7])
    out["voluntary"] = out["involuntary"] = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches"):
                out["voluntary"] += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches"):
                out["involuntary"] += int(line.split()[1])
    return out


def _machine() -> dict[str, float]:
    """The machine's CPU seconds since boot, all processes and the kernel (``/proc/stat``): busy, and stolen by
    the hypervisor for other guests (``steal``: time this machine's CPUs wanted to run and could not)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return {"busy": (user + nice + system + irq + softirq) / tick, "steal": steal / tick}


def _threads(pid: int) -> dict[str, float]:
    """CPU seconds of ``pid``'s threads, summed by thread name (the main thread is named after the program)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rpartition(")")[2].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


@contextlib.contextmanager
def trained_cluster(batches: int, tcp: bool, per_op: bool):
    """Three ``splitnn worker`` processes of the tree on ``sys.path`` (the workers' ``PYTHONPATH`` as set by the
    caller), the researcher's tutorial network on them, one epoch trained (warm-up, data placement): yields
    ``(model, data, cluster)``. For a process that imports splitnn from one tree (older trees too)."""
    import torch

    import splitnn
    from splitnn.models import tutorial_mlp
    from tests.helpers import toy_dataset

    try:
        from splitnn.testing.cluster import Cluster
    except ImportError:  # older trees
        from tests.transport.cluster import Cluster

    torch.set_num_threads(1)
    data = toy_dataset(batches * BATCH, seed=0)
    links = {"tcp": True} if tcp else {}
    with tempfile.TemporaryDirectory() as tmp, Cluster(Path(tmp), lifetime=3600, **links) as cl:
        for n in NAMES:
            cl.start(n)
        workers = [splitnn.connect(cl.workers[n].url, token=cl.token, name=n) for n in NAMES]
        torch.manual_seed(0)
        model = splitnn.SplitNN(tutorial_mlp(), workers, **({"ship_epochs": False} if per_op else {}))
        model.fit(data, epochs=1, batch_size=BATCH, progress=False)
        try:
            yield model, data, cl
        finally:
            for w in workers:
                w.close()


def measure(tree: Path, batches: int, runs: int, tcp: bool, per_op: bool, yappi: Path | None) -> dict:
    """One tree's figures (run in a process that imports splitnn from ``tree``; see ``main``)."""
    counts = Path(tempfile.mkdtemp())
    os.environ["SPLITNN_LOOP_COUNTS"] = str(counts)
    os.environ["SPLITNN_LOOP_YAPPI"] = "1" if yappi else "0"
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE / "loop_counts"), str(tree / "src")])

    def read() -> dict:
        time.sleep(0.6)
        return {n: json.loads((counts / f"{n}.json").read_text()) for n in NAMES}

    with trained_cluster(batches, tcp, per_op) as (model, data, cl):
        if yappi:
            (counts / "reset").touch()
            time.sleep(0.6)
        pids = {n: cl.workers[n].proc.pid for n in NAMES}
        c0, k0 = {n: _cpu(p) for n, p in pids.items()}, read()
        h0 = {n: _threads(p) for n, p in pids.items()}
        s0 = {n: _switches(p) for n, p in pids.items()}
        m0 = _machine()
        r0, t0 = time.process_time(), time.perf_counter()
        for r in range(runs):
            model.fit(data, epochs=1, batch_size=BATCH, seed=r + 1, progress=False)
        wall, researcher = time.perf_counter() - t0, time.process_time() - r0
        c1, k1 = {n: _cpu(p) for n, p in pids.items()}, read()
        h1 = {n: _threads(p) for n, p in pids.items()}
        s1 = {n: _switches(p) for n, p in pids.items()}
        m1 = _machine()
        if yappi:
            (counts / "dump").touch()
            while not all((counts / f"{n}.done").exists() for n in NAMES):
                time.sleep(0.2)
            yappi.mkdir(parents=True, exist_ok=True)
            for n in NAMES:
                shutil.copy(counts / f"{n}.pstat", yappi / f"{n}.pstat")
    nb = runs * batches
    cpu = {n: round(1e3 * (c1[n] - c0[n]) / nb, 3) for n in NAMES} | {"researcher": round(1e3 * researcher / nb, 3)}
    return {
        "tree": str(tree),
        "path": "per-op" if per_op else "shipped epochs",
        "links": "tcp" if tcp else "grpc",
        "samples/s": round(nb * BATCH / wall),
        "cpu_ms_per_batch": cpu,
        "cpu_ms_total": round(sum(cpu.values()), 3),
        "loop_passes_per_batch": {n: round((k1[n]["passes"] - k0[n]["passes"]) / nb, 2) for n in NAMES},
        "threads_cpu_ms_per_batch": {
            n: {t: round(1e3 * (v - h0[n].get(t, 0.0)) / nb, 3) for t, v in h1[n].items() if v > h0[n].get(t, 0.0)}
            for n in NAMES
        },
        "machine_cpu_ms_per_batch": {k: round(1e3 * (m1[k] - m0[k]) / nb, 3) for k in m1},
        "switches_per_batch": {
            n: {k: round((s1[n][k] - s0[n][k]) / nb * (1e3 if k in ("user", "sys") else 1), 3) for k in s1[n]}
            for n in NAMES
        },
        "gc_per_batch": {
            n: {k: round((k1[n][k] - k0[n][k]) / nb * (1e3 if k == "gc_s" else 1), 3) for k in GC_KEYS} for n in NAMES
        },
        "tasks_per_batch": {n: round((k1[n]["tasks"] - k0[n]["tasks"]) / nb, 2) for n in NAMES},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", type=Path, help="source trees (checkout roots), measured in turn")
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="times each tree is measured, alternating")
    parser.add_argument("--tcp", action="store_true", help="peer links over the TCP data plane")
    parser.add_argument("--per-op", action="store_true", help="one command per operation, not shipped epochs")
    parser.add_argument("--yappi", type=Path, default=None, help="save the workers' yappi profiles under DIR")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # (a child: measure trees[0] once)
    args = parser.parse_args()
    if args.one:
        tree = args.trees[0].resolve()
        sys.path[:0] = [str(tree / "src"), str(tree)]
        print(json.dumps(measure(tree, args.batches, args.runs, args.tcp, args.per_op, args.yappi)), flush=True)
        return
    for r in range(args.rounds):
        for tree in args.trees:
            cmd = [sys.executable, __file__, str(tree), "--one", "--batches", str(args.batches)]
            cmd += ["--runs", str(args.runs)] + ["--tcp"] * args.tcp + ["--per-op"] * args.per_op
            if args.yappi:
                cmd += ["--yappi", str(args.yappi / f"{tree.resolve().name}-{r}")]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree.resolve() / "src")}
            subprocess.run(cmd, env=env, check=True)


if __name__ == "__main__":
    main()
