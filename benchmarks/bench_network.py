"""Throughput of networked split learning on loopback, against in-process and torch.distributed.rpc.

    OMP_NUM_THREADS=1 python benchmarks/bench_network.py [--batches 40] [--runs 5]

Trains the tutorial network (784-128-640-10, three segments, SGD lr 0.03, batch 64,
NLL) for ``--batches`` batches per run, ``--runs`` times, and prints the median
samples/s of:

* ``in-process``: SplitNN on three VirtualWorkers in this process;
* ``grpc, shipped epochs``: SplitNN on three ``splitnn worker`` processes over
  127.0.0.1 (``splitnn.connect``); each worker gets one plan per epoch and the
  workers train among themselves, pushing activations and gradients peer to peer
  (the default of ``fit`` with networked workers);
* ``grpc, per-op``: the same, driven one pipelined command per operation by the
  researcher (``SplitNN(..., ship_epochs=False)``);
* ``torch.distributed.rpc``: the same three segments on three RPC worker processes
  driven the way PyTorch's RPC tutorials do it: the master chains ``rpc.remote``
  calls passing RRefs (each stage fetches its input with ``to_here()``), runs
  ``dist_autograd.backward`` and steps a ``DistributedOptimizer`` (TensorPipe over
  TCP on 127.0.0.1).

With ``--sweep 64,128,256,512,1024`` it instead measures the cost of the networked data plane
per byte: for each batch size it times in-process and shipped-epoch training (interleaved
runs, medians), takes the extra time per batch of the networked path, and fits a line
``extra = fixed + per_byte x bytes`` over the raw activation+gradient bytes per batch
(least squares): the fixed per-batch cost (ms) and the per-byte cost (ns/byte), from the
median and from the fastest run of each (the fastest is the least disturbed on a busy
machine), and the same for the CPU seconds of all processes together. With
``--baseline-src OLD/src`` a second set of workers runs another source tree (e.g. a git
worktree of an older commit), interleaved with the first, for a fair before/after; with
``--data-plane grpc,tcp`` a second set of workers takes its peer links over the TCP data plane
(``splitnn worker --data-listen``), interleaved with the gRPC set.

With ``--parties 1,16`` it gives, per pipeline depth, the samples/s of in-process training and of
shipped epochs on each ``--data-plane`` (loopback, no emulator), and every party's CPU milliseconds
per batch: where the networked path's CPU goes, against the two cores this machine has.

It also reports, for both gRPC paths, the bytes on the wire per batch (every
serialized gRPC message of every party: peer frames, control commands and replies)
against the raw tensor bytes (numel x itemsize of the activations and gradients
crossing the two cuts), and the researcher's CPU seconds per batch.
Every process uses one torch thread. Not a test: nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.helpers

import torch  # noqa: E402

NAMES = ("alice", "bob", "claire")
BATCH = 64


def _data(n: int):
    from tests.helpers import toy_dataset

    return toy_dataset(n, seed=0)


def _segments():
    from splitnn.models import tutorial_mlp

    torch.manual_seed(0)
    return tutorial_mlp()


def _time_fit(model, data, runs: int) -> list[float]:
    model.fit(data, epochs=1, batch_size=BATCH, progress=False)  # warm-up (and data placement)
    rates = []
    for r in range(runs):
        t0 = time.perf_counter()
        model.fit(data, epochs=1, batch_size=BATCH, seed=r + 1, progress=False)
        rates.append(len(data) / (time.perf_counter() - t0))
    return rates


def bench_in_process(data, runs: int) -> list[float]:
    import splitnn

    model = splitnn.SplitNN(_segments(), [splitnn.VirtualWorker(n) for n in NAMES])
    return _time_fit(model, data, runs)


def bench_grpc(data, runs: int, cluster) -> dict[str, tuple[list[float], dict[str, float]]]:
    """Both gRPC paths on the same three worker processes, alternating runs (fair under load)."""
    import splitnn

    models = {}
    for label, ship in (("grpc, shipped epochs (3 processes)", True), ("grpc, per-op (3 processes)", False)):
        workers = [splitnn.connect(cluster.workers[n].url, token=cluster.token, name=n) for n in NAMES]
        model = splitnn.SplitNN(_segments(), workers, ship_epochs=ship, ledger=splitnn.accounting.Ledger())
        model.fit(data, epochs=1, batch_size=BATCH, progress=False)  # warm-up, data placement
        models[label] = (model, workers, {"rates": [], "wire": 0, "peer": 0, "cpu": 0.0, "moved": []})
    try:
        for r in range(runs):
            for model, workers, acc in models.values():
                before_ledger, before = model.ledger.snapshot(), _wire_total(workers)
                c0, t0 = time.process_time(), time.perf_counter()
                model.fit(data, epochs=1, batch_size=BATCH, seed=r + 1, progress=False)
                acc["rates"].append(len(data) / (time.perf_counter() - t0))
                acc["cpu"] += time.process_time() - c0
                after = _wire_total(workers)  # fit returns with every record in (its last step drained)
                acc["wire"] += after["all"] - before["all"]
                acc["peer"] += after["peer"] - before["peer"]
                acc["moved"].append(model.ledger.since(before_ledger))
    finally:
        for _, workers, _ in models.values():
            for w in workers:
                w.close()
    from splitnn.accounting import RESEARCHER

    batches = runs * -(-len(data) // BATCH)
    out = {}
    for label, (_, _, acc) in models.items():
        raw = sum(m.total(kind=k) for m in acc["moved"] for k in ("activation", "gradient"))
        out[label] = (
            acc["rates"],
            {
                "raw_tensor_bytes_per_batch": raw / batches,
                "wire_bytes_per_batch": acc["wire"] / batches,
                "peer_wire_bytes_per_batch": acc["peer"] / batches,
                "researcher_cpu_ms_per_batch": 1000 * acc["cpu"] / batches,
                "researcher_tensor_bytes": sum(
                    m.total(src=RESEARCHER, kind=k) + m.total(dst=RESEARCHER, kind=k)
                    for m in acc["moved"]
                    for k in ("activation", "gradient")
                ),
            },
        )
    return out


def _wire_total(workers) -> dict[str, int]:
    """Bytes sent by every party: each server's counters (via stats) plus the researcher's own.

    Each measured interval also holds one ``stats`` exchange per worker (a few KB in all,
    under 0.1% of the figure): counted, not subtracted.
    """
    total = peer = 0
    for w in workers:
        rows = w.stats()["counters"]
        sent = [r for r in rows if r["direction"] == "sent"]
        total += sum(r["nbytes"] for r in sent)
        peer += sum(r["nbytes"] for r in sent if r["peer"] in NAMES)
        total += w.counters.total(direction="sent")
    return {"all": total, "peer": peer}


# ---------------------------------------------------------------- torch.distributed.rpc baseline
class _Stage:
    """One segment at an RPC worker, as in the RPC tutorials (held via an RRef by the master)."""

    def __init__(self, index: int, n: int) -> None:
        torch.manual_seed(0)
        from splitnn.models import tutorial_mlp

        self.net = tutorial_mlp()[index]
        self.data = _data(n)

    def forward_idx(self, idx):
        return self.net(self.data.features[idx])

    def forward(self, x_rref):
        return self.net(x_rref.to_here())

    def loss(self, x_rref, idx):
        import torch.nn.functional as F

        return F.nll_loss(self.net(x_rref.to_here()), self.data.labels[idx])

    def param_rrefs(self):
        from torch.distributed.rpc import RRef

        return [RRef(p) for p in self.net.parameters()]


def _rpc_options(port: int):
    from torch.distributed import rpc

    return rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=8, init_method=f"tcp://127.0.0.1:{port}", rpc_timeout=120, _transports=["uv"]
    )


def rpc_worker(rank: int, port: int) -> None:
    from torch.distributed import rpc

    torch.set_num_threads(1)
    rpc.init_rpc(NAMES[rank - 1], rank=rank, world_size=4, rpc_backend_options=_rpc_options(port))
    rpc.shutdown()


def bench_rpc(data, runs: int) -> list[float]:
    import socket

    import torch.distributed.autograd as dist_autograd
    from torch import optim
    from torch.distributed import rpc
    from torch.distributed.optim import DistributedOptimizer

    from splitnn.training import epoch_batches

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, __file__, "--rpc-worker", str(r), "--port", str(port)], env=env)
        for r in (1, 2, 3)
    ]
    try:
        rpc.init_rpc("master", rank=0, world_size=4, rpc_backend_options=_rpc_options(port))
        stages = [rpc.remote(n, _Stage, args=(i, len(data))) for i, n in enumerate(NAMES)]
        params = [p for st in stages for p in st.rpc_sync().param_rrefs()]
        opt = DistributedOptimizer(optim.SGD, params, lr=0.03)

        def epoch(seed: int) -> float:
            t0 = time.perf_counter()
            for idx in epoch_batches(len(data), BATCH, seed=seed):
                with dist_autograd.context() as ctx:
                    a = stages[0].remote().forward_idx(idx)
                    b = stages[1].remote().forward(a)
                    loss = stages[2].rpc_sync().loss(b, idx)
                    dist_autograd.backward(ctx, [loss])
                    opt.step(ctx)
            return len(data) / (time.perf_counter() - t0)

        epoch(0)  # warm-up
        rates = [epoch(r + 1) for r in range(runs)]
        rpc.shutdown()
        return rates
    finally:
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()


# ---------------------------------------------------------------- per-byte cost sweep
def _cut_bytes(batch: int) -> int:
    """Raw activation + gradient bytes crossing the tutorial network's two cuts per batch (float32)."""
    return 2 * batch * (128 + 640) * 4


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``; returns ``(a, b)``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def bench_sweep(sizes: list[int], batches: int, runs: int, clusters: dict) -> list[dict]:
    """Per batch size: median seconds per batch in-process and over shipped epochs on each cluster.

    ``clusters`` maps a label to a running cluster of the three workers (e.g. this tree's and a
    baseline's); runs alternate between in-process and every cluster, so machine noise hits all alike.
    """
    import splitnn
    from tests.helpers import toy_dataset

    rows = []
    for size in sizes:
        data = toy_dataset(batches * size, seed=0, name=f"sweep{size}")
        models = {
            "in": splitnn.SplitNN(_segments(), [splitnn.VirtualWorker(n) for n in NAMES]),
            # the same autograd work as a networked party's (one backward per segment): what remains is the data plane's
            "eager": splitnn.SplitNN(_segments(), [splitnn.VirtualWorker(n, fuse=False) for n in NAMES]),
        }
        opened = []
        for label, cluster in clusters.items():
            workers = [splitnn.connect(cluster.workers[n].url, token=cluster.token, name=n) for n in NAMES]
            opened += workers
            models[label] = splitnn.SplitNN(_segments(), workers)
        times: dict[str, list[float]] = {label: [] for label in models}
        cpu: dict[str, list[float]] = {label: [] for label in models}
        pids = {label: [cl.workers[n].proc.pid for n in NAMES] for label, cl in clusters.items()}
        try:
            for model in models.values():  # warm-up, data placement
                model.fit(data, epochs=1, batch_size=size, progress=False)
            for r in range(runs):
                for label, model in models.items():
                    c0, t0 = _cpu_seconds(pids.get(label, [])), time.perf_counter()
                    model.fit(data, epochs=1, batch_size=size, seed=r + 1, progress=False)
                    times[label].append((time.perf_counter() - t0) / batches)
                    cpu[label].append((_cpu_seconds(pids.get(label, [])) - c0) / batches)
        finally:
            for w in opened:
                w.close()
        med = {label: statistics.median(t) for label, t in times.items()}
        best = {label: min(t) for label, t in times.items()}
        med_cpu = {label: statistics.median(t) for label, t in cpu.items()}
        rows.append({"batch": size, "bytes": _cut_bytes(size), "s": med, "min": best, "cpu": med_cpu})
    return rows


def bench_parties(
    depths: list[int], batches: int, runs: int, clusters: dict, op_dirs: dict[str, Path] | None = None
) -> list[dict]:
    """Per transport and depth K: samples/s and each party's CPU milliseconds per batch of shipped epochs over
    loopback (no emulator), and the same for in-process training (lock-step and pipelined): where the
    networked path's CPU goes, against what two cores can give. With ``op_dirs`` (per cluster label, where its
    workers write their compute calls' CPU: ``op_cpu/sitecustomize.py``), also the CPU inside compute calls."""
    import splitnn

    data = _data(batches * BATCH)
    rows = []
    if op_dirs is not None:
        import op_cpu.sitecustomize as op_cpu

        op_cpu.install()
    for k in depths:
        inproc = splitnn.SplitNN(_segments(), [splitnn.VirtualWorker(n) for n in NAMES], optimizer="sgd:lr=0.03")
        ops = (lambda: {n: tuple(op_cpu.totals.get(n, (0, 0.0))) for n in NAMES}) if op_dirs is not None else None
        rows.append(_party_row(f"in-process, K={k}", inproc, data, k, runs, {}, ops))
    for label, cluster in clusters.items():
        workers = [splitnn.connect(cluster.workers[n].url, token=cluster.token, name=n) for n in NAMES]
        ops = (lambda d=op_dirs[label]: _op_cpu_of(d)) if op_dirs is not None else None
        try:
            for k in depths:
                model = splitnn.SplitNN(_segments(), workers, optimizer="sgd:lr=0.03")
                pids = {n: cluster.workers[n].proc.pid for n in NAMES}
                rows.append(_party_row(f"{label}, K={k}", model, data, k, runs, pids, ops))
        finally:
            for w in workers:
                w.close()
    return rows


def _op_cpu_of(out: Path) -> dict[str, tuple[int, float]]:
    """The workers' compute-call totals as they last wrote them (after waiting for their next write)."""
    time.sleep(1.2)
    files = {n: out / f"{n}.json" for n in NAMES}
    return {n: tuple(json.loads(f.read_text()).values()) for n, f in files.items() if f.exists()}


def _party_row(label: str, model, data, k: int, runs: int, pids: dict[str, int], ops=None) -> dict:
    batches = len(data) // BATCH
    model.fit(data, epochs=1, batch_size=BATCH, pipeline=k, progress=False)  # warm-up, data placement
    o0 = ops() if ops is not None else {}
    c0 = {n: _process_cpu(pid) for n, pid in pids.items()}
    r0, t0 = time.process_time(), time.perf_counter()
    model.fit(data, epochs=runs, batch_size=BATCH, pipeline=k, progress=False)
    seconds = time.perf_counter() - t0
    cpu = {n: 1e3 * (_process_cpu(pid) - c0[n]) / (runs * batches) for n, pid in pids.items()}
    cpu["researcher"] = 1e3 * (time.process_time() - r0) / (runs * batches)
    row = {"label": label, "rate": runs * len(data) / seconds, "cpu_ms": cpu}
    if ops is not None:
        o1 = ops()
        row["op_ms"] = {n: 1e3 * (o1[n][1] - o0.get(n, (0, 0.0))[1]) / (runs * batches) for n in o1}
    return row


def print_parties(rows: list[dict]) -> None:
    base = rows[0]["rate"]
    ops = all("op_ms" in r for r in rows)
    parties = ", ".join(NAMES)
    head = f"| run | samples/s | vs in-process lock-step | CPU ms per batch: {parties}, researcher | total |"
    print(head + (f" of it in compute calls: {parties} | total | the rest |" if ops else ""))
    print("|---|---:|---:|---|---:|" + ("---|---:|---:|" if ops else ""))
    for r in rows:
        cpu = r["cpu_ms"]
        cells = ", ".join(f"{cpu[n]:.2f}" for n in (*NAMES, "researcher") if n in cpu)
        line = f"| {r['label']} | {r['rate']:,.0f} | {r['rate'] / base:.2f}x | {cells} | {sum(cpu.values()):.2f} |"
        if ops:
            op = r["op_ms"]
            compute = sum(op.values())
            line += f" {', '.join(f'{op.get(n, 0.0):.2f}' for n in NAMES)} | {compute:.2f} | "
            line += f"{sum(cpu.values()) - compute:.2f} |"
        print(line)


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _cpu_seconds(pids: list[int]) -> float:
    """CPU seconds used so far by this process and the processes ``pids`` (user + system)."""
    return time.process_time() + sum(_process_cpu(pid) for pid in pids)


def print_sweep(rows: list[dict]) -> None:
    """The table, then per networked label the fitted extra cost against the in-process run (fused autograd,
    the default) and against the in-process eager run (``fuse=False``: one backward per segment, the autograd
    work a networked party does), whose difference is the data plane's alone."""
    labels = [k for k in rows[0]["s"] if k not in ("in", "eager")]
    head = ["batch", "cut bytes", "in-process ms", "in-process eager ms"]
    head += [f"{lb} ms" for lb in labels] + [f"{lb} extra" for lb in labels]
    print(" | ".join(head))
    for r in rows:
        s = r["s"]
        cells = [f"{r['batch']}", f"{r['bytes']:,d}", f"{1e3 * s['in']:.3f}", f"{1e3 * s['eager']:.3f}"]
        cells += [f"{1e3 * s[lb]:.3f}" for lb in labels] + [f"{1e3 * (s[lb] - s['in']):.3f}" for lb in labels]
        print(" | ".join(cells))
    xs = [r["bytes"] for r in rows]
    for lb in labels:
        for base, name in (("in", "in-process"), ("eager", "in-process eager")):
            print(f"{lb} against {name}:")
            for what, key in (("median", "s"), ("fastest", "min"), ("CPU of all processes, median", "cpu")):
                fixed, per_byte = fit_line(xs, [r[key][lb] - r[key][base] for r in rows])
                ratios = ", ".join(f"{r[key][base] / r[key][lb]:.2f}" for r in rows)
                print(
                    f"  {what} runs: extra per batch = {1e3 * fixed:.3f} ms + {1e9 * per_byte:.3f} ns/byte x cut "
                    f"bytes; {name}/networked by batch size: {ratios}"
                )


def _clusters(stack: contextlib.ExitStack, todo: list[tuple[str, str, dict]]) -> dict:
    """Per ``(label, plane, env)``: a running cluster of the three workers, peer links over ``plane`` (grpc or
    tcp), ``env`` added to the workers' environment; closed with ``stack``."""
    from splitnn.testing.cluster import Cluster

    clusters = {}
    for label, plane, env in todo:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        cl = stack.enter_context(Cluster(tmp, lifetime=3600, env=env, tcp=plane == "tcp"))
        for n in NAMES:
            cl.start(n)
        clusters[label] = cl
    return clusters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=40, help="batches of 64 per run (default 40)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per contender (default 5)")
    parser.add_argument("--skip-rpc", action="store_true")
    parser.add_argument(
        "--sweep",
        default=None,
        help="comma-separated batch sizes (e.g. 64,128,256,512,1024): fit fixed and per-byte cost instead",
    )
    parser.add_argument(
        "--baseline-src",
        default=None,
        help="with --sweep: also time workers that import splitnn from this src/ directory (e.g. a worktree "
        "of an older commit), on the last --data-plane, runs interleaved, for a fair before/after on a busy machine",
    )
    parser.add_argument(
        "--parties",
        default=None,
        help="comma-separated pipeline depths (e.g. 1,16): samples/s and each party's CPU per batch instead, "
        "networked (per --data-plane) and in-process",
    )
    parser.add_argument(
        "--op-cpu",
        action="store_true",
        help="with --parties: also the CPU each party spends inside its compute calls (forward, loss, backward, "
        "step), through benchmarks/op_cpu on the workers' PYTHONPATH; the rest is messaging and bookkeeping",
    )
    parser.add_argument(
        "--data-plane",
        default="grpc",
        help="with --sweep or --parties: comma-separated peer transports to time: grpc (peer links over gRPC "
        "streams), tcp (the workers' --data-listen); default grpc",
    )
    parser.add_argument("--rpc-worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rpc_worker is not None:
        rpc_worker(args.rpc_worker, args.port)
        return
    torch.set_num_threads(1)
    from splitnn.testing.cluster import Cluster

    if args.parties:
        planes = args.data_plane.split(",")
        with contextlib.ExitStack() as stack:
            todo, op_dirs = [], {}
            for plane in planes:
                env = {}
                if args.op_cpu:
                    ops = op_dirs[f"{plane} links"] = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                    paths = [str(Path(__file__).parent / "op_cpu"), os.environ.get("PYTHONPATH", "")]
                    env = {"PYTHONPATH": os.pathsep.join(p for p in paths if p), "SPLITNN_OP_CPU": str(ops)}
                todo.append((f"{plane} links", plane, env))
            clusters = _clusters(stack, todo)
            depths = [int(k) for k in args.parties.split(",")]
            rows = bench_parties(depths, args.batches, args.runs, clusters, op_dirs if args.op_cpu else None)
        print(f"tutorial MLP, batch {BATCH}, {args.batches} batches x {args.runs} epochs, 3 workers on 127.0.0.1")
        print_parties(rows)
        return
    if args.sweep:
        sizes = [int(x) for x in args.sweep.split(",")]
        with contextlib.ExitStack() as stack:
            planes = args.data_plane.split(",")
            if not set(planes) <= {"grpc", "tcp"}:
                parser.error(f"--data-plane takes grpc and/or tcp, got {args.data_plane!r}")
            todo = [("networked" if p == "grpc" else "tcp plane", p, {}) for p in planes]
            if args.baseline_src:
                todo.append(("baseline", planes[-1], {"PYTHONPATH": str(Path(args.baseline_src).resolve())}))
            clusters = _clusters(stack, todo)
            rows = bench_sweep(sizes, args.batches, args.runs, clusters)
        print(f"tutorial MLP, shipped epochs vs in-process, {args.batches} batches x {args.runs} runs per size")
        print_sweep(rows)
        return
    data = _data(args.batches * BATCH)
    results = {"in-process": bench_in_process(data, args.runs)}
    with tempfile.TemporaryDirectory() as tmp, Cluster(Path(tmp), lifetime=600) as cl:
        for n in NAMES:
            cl.start(n)
        grpc_results = bench_grpc(data, args.runs, cl)
    results.update({label: rates for label, (rates, _) in grpc_results.items()})
    rpc_label = "torch.distributed.rpc (3 processes)"
    if not args.skip_rpc:
        results[rpc_label] = bench_rpc(data, args.runs)
    print(
        f"tutorial MLP 784-128-640-10, batch {BATCH}, {args.batches} batches x {args.runs} runs, 1 torch thread/process"
    )
    print(f"{'contender':40s} {'median samples/s':>17s}  runs")
    for name, rates in results.items():
        print(f"{name:40s} {statistics.median(rates):17,.0f}  " + " ".join(f"{r:,.0f}" for r in rates))
    for label, (rates, wire) in grpc_results.items():
        print(f"\n{label}:")
        if rpc_label in results:
            print(
                f"  throughput vs torch.distributed.rpc: "
                f"{statistics.median(rates) / statistics.median(results[rpc_label]):.2f}x"
            )
        raw, on_wire, peer = (
            wire["raw_tensor_bytes_per_batch"],
            wire["wire_bytes_per_batch"],
            wire["peer_wire_bytes_per_batch"],
        )
        print(f"  raw activation+gradient bytes per batch: {raw:,.0f}")
        print(
            f"  wire bytes per batch (all parties, all messages): {on_wire:,.0f} ({100 * (on_wire / raw - 1):+.2f}%); "
            f"peer data plane only: {peer:,.0f} ({100 * (peer / raw - 1):+.2f}%)"
        )
        print(
            f"  researcher CPU per batch: {wire['researcher_cpu_ms_per_batch']:.3f} ms; activation/gradient "
            f"bytes sent or received by the researcher: {wire['researcher_tensor_bytes']}"
        )


if __name__ == "__main__":
    main()
