"""SplitFed against turn-taking split learning: wall time of one epoch (in-process and networked), and accuracy.

``wall``: one epoch of the same data for K data holders, for turn-taking multi-holder
split learning (``MultiHolderSplitNN``, peer hand-offs) and SplitFed v1 / v2 with the
holders on threads and on one thread, in-process. Runs are interleaved (every
configuration once, then again, ...) so that machine noise hits all of them alike; the
report gives medians and the ratio to turn-taking measured in the same run, and the
process's CPU seconds (all threads), which tell how much of a speed-up is parallelism and
how much overhead.

``net``: the same over ``splitnn worker`` processes (alice1..aliceK and bob, started here
on 127.0.0.1), on plain loopback and behind the link emulator
(:mod:`splitnn.testing.linkemu`: every party, the researcher's control connections
included, behind a proxy with ``--delay`` one way and ``--rate`` per direction). Each run
connects fresh sessions, places the shards (not timed; the link is fast while placing),
times one epoch and ends its sessions. Configurations: turn-taking, SplitFed v1 and v2 with
a thread per holder, and v2 on one thread (the same steps, no concurrency). Medians over
``--repeats`` interleaved repeats; ratios to turn-taking in the same run and link.

``accuracy``: test accuracy after every epoch, for the configurations ``splitnn train``
builds (the command each row equals is printed with it).

    python benchmarks/bench_splitfed.py wall --clients 2,4,8 --repeats 3 [--eager] [--json out.json]
    python benchmarks/bench_splitfed.py net --clients 2,4,8 --repeats 3 --limit 3840 [--delay 10ms --rate 100mbit]
    python benchmarks/bench_splitfed.py accuracy --clients 2,4,8 --epochs 5 [--json out.json]

Data: Fashion-MNIST from --data-dir (default ../shared/data/fashion-mnist); tutorial MLP
784-128-640-10, SGD lr 0.03, batch 64, seed 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import splitnn
from splitnn.data import load_dataset
from splitnn.models import tutorial_mlp
from splitnn.testing.cluster import Cluster
from splitnn.testing.linkemu import ThreadedLinkEmulator, parse_delay, parse_rate
from splitnn.training.topologies import MultiHolderSplitNN, SplitFedSplitNN, TopologyConfig, build_topology

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WALL_CONFIGS = ("multi", "v1 threads", "v1 one thread", "v2 threads", "v2 one thread")
NET_CONFIGS = ("multi", "v1 threads", "v2 threads", "v2 one thread")


def _model(config: str, k: int, fuse: bool, partition: str, workers=None):
    torch.manual_seed(0)
    bottom, *top = tutorial_mlp()
    if workers is None:
        workers = [splitnn.VirtualWorker(n, fuse=fuse) for n in (*(f"alice{i + 1}" for i in range(k)), "bob")]
    *holders, bob = workers
    if config == "multi":
        return MultiHolderSplitNN(bottom, top, holders, bob, partition=partition)
    variant, how = config.split(" ", 1)
    return SplitFedSplitNN(bottom, top, holders, bob, variant=variant, partition=partition, parallel=how == "threads")


def wall(args: argparse.Namespace) -> dict:
    train = load_dataset("fashion-mnist", "train", data_dir=args.data_dir, download=False, limit=args.limit)
    times: dict[tuple[int, str], list[float]] = {}
    cpu: dict[tuple[int, str], list[float]] = {}
    warm = train.subset(torch.arange(640))
    for config in WALL_CONFIGS:  # one-time costs (the first optimizer imports TorchDynamo) before any timing
        _model(config, 2, not args.eager, args.partition).fit(warm, epochs=1, progress=False)
    for repeat in range(args.repeats):
        for k in args.clients:
            for config in WALL_CONFIGS:
                model = _model(config, k, not args.eager, args.partition)
                name, _ = model.prepare(train)  # placing the shards is not part of the epoch
                start, start_cpu = time.perf_counter(), time.process_time()
                model.fit(name, epochs=1, progress=False)
                times.setdefault((k, config), []).append(time.perf_counter() - start)
                cpu.setdefault((k, config), []).append(time.process_time() - start_cpu)
        print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)
    rows = []
    print(f"\none epoch of {len(train)} samples, {'eager' if args.eager else 'fused'} in-process workers, medians")
    print(f"{'K':>3}  {'configuration':<14} {'wall s':>8}  {'vs multi':>8}  {'CPU s':>7}")
    for k in args.clients:
        base = statistics.median(times[(k, "multi")])
        for config in WALL_CONFIGS:
            med, med_cpu = statistics.median(times[(k, config)]), statistics.median(cpu[(k, config)])
            rows.append(
                {"clients": k, "config": config, "median_s": med, "ratio_to_multi": med / base, "cpu_s": med_cpu}
            )
            print(f"{k:>3}  {config:<14} {med:8.2f}  {med / base:8.2f}  {med_cpu:7.2f}")
    return {"samples": len(train), "eager": args.eager, "repeats": args.repeats, "rows": rows}


def net(args: argparse.Namespace) -> dict:
    train = load_dataset("fashion-mnist", "train", data_dir=args.data_dir, download=False, limit=args.limit)
    delay, rate = parse_delay(args.delay), parse_rate(args.rate)
    links = {"loopback": None, f"{args.delay} one way, {args.rate or 'unlimited'}": (delay, rate)}
    names = [f"alice{i + 1}" for i in range(max(args.clients))] + ["bob"]
    times: dict[tuple[str, int, str], list[float]] = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        Cluster(Path(tmp), lifetime=7200) as cluster,
        ThreadedLinkEmulator(timeout=600) as emu,
    ):
        for name in names:
            cluster.start(name)
        proxies = {n: emu.add(n, cluster.workers[n].address) for n in names}

        def run(link: str, k: int, config: str, data) -> float:
            emulated = links[link] is not None
            emu.set(delay=0.0, rate=None)  # connecting and placing the shards is not what is measured
            who = [*names[:k], "bob"]
            address = {n: proxies[n] if emulated else cluster.workers[n].address for n in who}
            workers = [splitnn.connect(f"grpc://{address[n]}", token=cluster.token, name=n, timeout=600) for n in who]
            try:
                model = _model(config, k, False, args.partition, workers)
                name, _ = model.prepare(data)
                if emulated:
                    emu.set(delay=links[link][0], rate=links[link][1])
                start = time.perf_counter()
                model.fit(name, epochs=1, progress=False)
                return time.perf_counter() - start
            finally:
                for w in workers:
                    w.close(end_session=True)

        warm = train.subset(torch.arange(640))
        for config in NET_CONFIGS:  # one-time costs at the workers (imports, first optimizer) before any timing
            run("loopback", 2, config, warm)
        for repeat in range(args.repeats):
            for link in links:
                for k in args.clients:
                    for config in NET_CONFIGS:
                        times.setdefault((link, k, config), []).append(run(link, k, config, train))
            print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)
    rows = []
    print(f"\none epoch of {len(train)} samples over worker processes, medians of {args.repeats}")
    print(f"{'link':<28} {'K':>3}  {'configuration':<14} {'wall s':>8}  {'vs multi':>8}")
    for link in links:
        for k in args.clients:
            base = statistics.median(times[(link, k, "multi")])
            for config in NET_CONFIGS:
                med = statistics.median(times[(link, k, config)])
                rows.append(
                    {"link": link, "clients": k, "config": config, "median_s": med, "ratio_to_multi": med / base}
                )
                print(f"{link:<28} {k:>3}  {config:<14} {med:8.2f}  {med / base:8.2f}")
    return {"samples": len(train), "repeats": args.repeats, "delay": args.delay, "rate": args.rate, "rows": rows}


def accuracy(args: argparse.Namespace) -> dict:
    root = args.data_dir
    train = load_dataset("fashion-mnist", "train", data_dir=root, download=False, limit=args.limit)
    test = load_dataset("fashion-mnist", "test", data_dir=root, download=False)
    rows = []
    runs = [("multi", None, None)] + [(v, r) for v in ("v1", "v2") for r in (None, args.round_batches)]
    for partition in ("iid", "dirichlet:0.5"):
        for k in args.clients:
            for run in runs:
                topology, variant, rounds = ("multi", None, None) if run[0] == "multi" else ("splitfed", *run)
                config = TopologyConfig(
                    topology, clients=k, partition=partition, variant=variant or "v1", round_batches=rounds
                )
                torch.manual_seed(0)  # as `splitnn train --seed 0` does before building
                model = build_topology(config, tuple(train.features.shape[1:]), train.num_classes)
                start = time.perf_counter()
                history = model.fit(train, epochs=args.epochs, test_data=test, progress=False)
                seconds = time.perf_counter() - start
                command = f"splitnn train --dataset fashion-mnist --epochs {args.epochs} --topology {topology} "
                command += f"--clients {k} --partition {partition}"
                if variant:
                    command += f" --variant {variant}" + (f" --round-batches {rounds}" if rounds else "")
                accs = [e.test_accuracy for e in history.epochs]
                weights = model.ledger.total(kind="weights")
                rows.append({"command": command, "accuracy": accs, "seconds": seconds, "weights_bytes": weights})
                print(f"{' '.join(f'{a:.4f}' for a in accs)}  {seconds:6.1f} s  {weights:>13,} B weights  {command}")
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("wall", "net", "accuracy"))
    parser.add_argument("--clients", default="2,4,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--round-batches", type=int, default=10, help="accuracy: the N of the N-batch rounds")
    parser.add_argument("--partition", default="iid", help="wall: how the samples are shared out")
    parser.add_argument("--eager", action="store_true", help="wall: fuse=False workers (as networked ones compute)")
    parser.add_argument("--limit", type=int, default=None, help="use the first LIMIT training samples")
    parser.add_argument("--delay", default="10ms", help="net: one-way delay of the emulated links")
    parser.add_argument("--rate", default="100mbit", help="net: bandwidth per proxy and direction ('' : unlimited)")
    parser.add_argument("--data-dir", type=Path, default=SHARED / "fashion-mnist")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.clients = [int(k) for k in args.clients.split(",")]
    torch.set_num_threads(1)
    out = {"wall": wall, "net": net, "accuracy": accuracy}[args.what](args)
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
