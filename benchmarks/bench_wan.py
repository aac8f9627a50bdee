"""Split learning at WAN latency: throughput of networked training behind an emulated link.

    OMP_NUM_THREADS=1 python benchmarks/bench_wan.py [--delays 0,1,5,10,25] [--rate 100mbit]
        [--batches 24] [--runs 3] [--png docs/img/wan_throughput.png] [--json out.json]

Three ``splitnn worker`` processes (alice, bob, claire) train the tutorial network
(784-128-640-10, SGD lr 0.03, batch 64, NLL) with shipped epochs (``fit``'s default for
networked workers). Each worker sits behind its own proxy of
:mod:`splitnn.testing.linkemu`, which delays every byte by the one-way delay in each
direction (and with ``--rate`` caps each direction of each proxy): the researcher connects
to the proxies and announces their addresses, so the activations and gradients going
alice -> bob -> claire -> bob -> alice cross four emulated one-way trips per batch.

For each one-way delay the table gives the emulator's measured round trip (a 1-byte ping
through one proxy: 2 x delay plus its own overhead), the median samples/s of lock-step
training over ``--runs`` epochs of ``--batches`` batches, the lock-step bound
``64 / (4 x delay + 393,216 B / rate)`` (one batch per four one-way trips plus, with a
rate cap, the serialisation of its four transfers; computation free), and the same
training in-process (three VirtualWorkers, no network) as the reference.

``--pipeline K,...`` adds one column per depth: ``fit(..., pipeline=K)``, up to K batches
in flight (:class:`splitnn.workers.schedules.Pipelined`; 1 is lock-step). Pipelined epochs
fill and drain the pipeline once each, so give enough ``--batches`` for the steady state to
dominate (e.g. 200). ``--compression CODEC,...`` adds one column per codec at the cuts
(``SplitNN(..., compression=CODEC)``, both directions: none, fp16, bf16, int8, topk:RATIO),
and a second table gives the bytes each variant moves across the cuts per batch (the
ledger's, sent and raw). Every depth runs with every codec (``--pipeline 1,4
--compression none,int8``: four columns). ``--predict BETA`` runs the pipelined columns with
weight prediction (``SplitNN(..., weight_prediction=BETA)``). ``--data-plane tcp`` gives every
worker a TCP data plane (``--data-listen``) behind a proxy of its own, with the same delay and
rate, so peer links go over plain TCP instead of gRPC streams.
Not a test: nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import splitnn  # noqa: E402
from splitnn.data import Dataset  # noqa: E402
from splitnn.errors import ConfigurationError  # noqa: E402
from splitnn.models import tutorial_mlp  # noqa: E402
from splitnn.testing.cluster import Cluster  # noqa: E402
from splitnn.testing.linkemu import ThreadedLinkEmulator, measure_rtt, parse_rate, serve_echo  # noqa: E402
from splitnn.wire.compress import get_codec  # noqa: E402
from splitnn.workers.schedules import MAX_IN_FLIGHT  # noqa: E402

NAMES = ("alice", "bob", "claire")
BATCH = 64
#: Raw activation + gradient bytes of one batch across both cuts (float32): 2 x 64 x (128 + 640) x 4.
CUT_BYTES = 2 * BATCH * (128 + 640) * 4


def _data(n: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g), "wan", 10)


def _segments():
    torch.manual_seed(0)
    return tutorial_mlp()


def _rate_of(model, data: Dataset, runs: int, seed0: int = 1, **fit_options) -> list[float]:
    rates = []
    for r in range(runs):
        t0 = time.perf_counter()
        model.fit(data, epochs=1, batch_size=BATCH, seed=seed0 + r, progress=False, **fit_options)
        rates.append(len(data) / (time.perf_counter() - t0))
    return rates


def lockstep_bound(delay: float, rate: float | None) -> float | None:
    """Samples/s if a batch cost only its four one-way trips and, with a rate cap, the serialisation of
    its four transfers (each on its own link direction, one after the other): computation free."""
    per_batch = 4 * delay + (CUT_BYTES / rate if rate else 0.0)
    return BATCH / per_batch if per_batch else None


def variants(pipelines: list[int], codecs: list[str], predict: float | None = None) -> list[tuple[str, dict, dict]]:
    """The training variants to time: (column label, model options, fit options); refuses bad ones."""
    out = []
    for k in pipelines:
        if not 1 <= k <= MAX_IN_FLIGHT:
            raise SystemExit(f"--pipeline {k}: the depth must be 1..{MAX_IN_FLIGHT} (1 is lock-step)")
    for c in codecs:
        try:
            get_codec(c)
        except ConfigurationError as exc:
            raise SystemExit(f"--compression {c}: {exc}") from None
    for k in pipelines:
        for c in codecs:
            label = "lock-step" if k == 1 else f"pipeline {k}"
            label += "" if c == "none" else f", {c}"
            model_opts = {} if c == "none" else {"compression": c}
            if k != 1 and predict is not None:
                label += ", predicted"
                model_opts["weight_prediction"] = predict
            out.append((label, model_opts, {"pipeline": k} if k != 1 else {}))
    return out


def cut_bytes(model, data: Dataset, **fit_options) -> tuple[float, float]:
    """Activation and gradient bytes one epoch of ``model`` moves per batch: (sent, raw), from its ledger."""
    before = model.ledger.snapshot()
    model.fit(data, epochs=1, batch_size=BATCH, progress=False, **fit_options)
    diff = model.ledger.since(before)
    batches = -(-len(data) // BATCH)
    sent = sum(diff.total(kind=k) for k in ("activation", "gradient"))
    raw = sum(diff.raw_total(kind=k) for k in ("activation", "gradient"))
    return sent / batches, raw / batches


def run(args) -> dict:
    delays = [float(d) for d in args.delays.split(",")]
    todo = variants([int(k) for k in args.pipeline.split(",")], args.compression.split(","), args.predict)
    data = _data(args.batches * BATCH)
    inproc = splitnn.SplitNN(_segments(), [splitnn.VirtualWorker(n) for n in NAMES])
    inproc.fit(data, epochs=1, batch_size=BATCH, progress=False)  # warm-up
    in_rates = _rate_of(inproc, data, args.runs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Cluster(Path(tmp), lifetime=3600) as cl, ThreadedLinkEmulator() as emu:
        rate = parse_rate(args.rate)
        for n in NAMES:
            if args.data_plane == "tcp":  # the data plane behind a proxy of its own, which peers are told to dial
                listen = cl.data_listen(n)
                proxy = emu.add(f"{n}-data", listen, rate=rate)
                cl.start(n, "--data-listen", listen, "--data-advertise", proxy)
            else:
                cl.start(n)
        proxies = {n: emu.add(n, cl.workers[n].address, rate=rate) for n in NAMES}
        echo = emu.call(serve_echo())
        ping = emu.add("ping", f"127.0.0.1:{echo.sockets[0].getsockname()[1]}", rate=rate)
        workers = [splitnn.connect(f"grpc://{proxies[n]}", token=cl.token, name=n, timeout=600) for n in NAMES]
        try:
            models = {label: (splitnn.SplitNN(_segments(), workers, **mo), fo) for label, mo, fo in todo}
            # warm-up and data placement; the ledger of that epoch gives the cut bytes per batch
            volume = {label: cut_bytes(model, data, **opts) for label, (model, opts) in models.items()}
            print(_header([label for label, _, _ in todo]), flush=True)
            for d in delays:
                emu.set(delay=d / 1000)
                rtt = statistics.median(measure_rtt(ping, samples=9))
                row = {"delay_ms": d, "rtt_ms": 1000 * rtt, "bound": lockstep_bound(d / 1000, rate)}
                for label, (model, opts) in models.items():
                    row[label] = statistics.median(_rate_of(model, data, args.runs, **opts))
                rows.append(row)
                print(_format_row(row, [label for label, _, _ in todo]), flush=True)
        finally:
            for w in workers:
                w.close()
            emu.close_server(echo)
    return {
        "batch": BATCH,
        "batches": args.batches,
        "runs": args.runs,
        "rate": args.rate,
        "in_process": statistics.median(in_rates),
        "columns": [label for label, _, _ in todo],
        "rows": rows,
        "cut_bytes_per_batch": {label: {"sent": s, "raw": r} for label, (s, r) in volume.items()},
    }


def _header(columns: list[str]) -> str:
    cells = ["one-way ms", "ping RTT ms", *[f"{c} samples/s" for c in columns], "lock-step bound"]
    return " | ".join(cells)


def _format_row(row: dict, columns: list[str]) -> str:
    bound = f"{row['bound']:,.0f}" if row["bound"] else "-"
    cells = [f"{row['delay_ms']:g}", f"{row['rtt_ms']:.2f}", *[f"{row[c]:,.0f}" for c in columns], bound]
    return " | ".join(cells)


def print_table(result: dict) -> None:
    rate = result["rate"] or "unlimited"
    print(
        f"\ntutorial MLP, batch {result['batch']}, {result['batches']} batches x {result['runs']} runs, "
        f"3 worker processes behind the link emulator (rate {rate}); in-process: {result['in_process']:,.0f} samples/s"
    )
    print("| " + _header(result["columns"]) + " |")
    print("|" + "---|" * (len(result["columns"]) + 3))
    for row in result["rows"]:
        print("| " + _format_row(row, result["columns"]) + " |")
    print("\n| variant | cut bytes per batch (sent) | raw | raw / sent |")
    print("|---|---|---|---|")
    for label, v in result["cut_bytes_per_batch"].items():
        print(f"| {label} | {v['sent']:,.0f} | {v['raw']:,.0f} | {v['raw'] / v['sent']:.2f}x |")


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = [max(r["delay_ms"], 0.1) for r in rows]  # 0 ms drawn at 0.1 ms on the log axis
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for c in result["columns"]:
        ax.plot(x, [r[c] for r in rows], "o-", label=f"networked, {c}")
    bx = [xi for xi, r in zip(x, rows) if r["bound"]]
    ax.plot(bx, [r["bound"] for r in rows if r["bound"]], "k--", label="lock-step bound")
    ax.axhline(result["in_process"], color="grey", ls=":", label="in-process")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("one-way delay per link (ms; 0 drawn at 0.1)")
    ax.set_ylabel("training samples/s")
    rate = result["rate"] or "unlimited rate"
    ax.set_title(f"Tutorial MLP, 3 workers, batch {result['batch']}, {rate}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delays", default="0,1,5,10,25", help="one-way delays in ms (default 0,1,5,10,25)")
    parser.add_argument("--rate", default=None, help="bandwidth cap per proxy and direction, e.g. 10mbit, 100mbit")
    parser.add_argument("--batches", type=int, default=24, help="batches of 64 per timed epoch (default 24)")
    parser.add_argument("--runs", type=int, default=3, help="timed epochs per delay (default 3)")
    parser.add_argument("--pipeline", default="1", help="batches in flight, comma-separated, e.g. 1,2,4,8,16")
    parser.add_argument(
        "--compression", default="none", help="codecs at the cuts, comma-separated, e.g. none,fp16,int8,topk:0.1"
    )
    parser.add_argument(
        "--predict", type=float, default=None, help="weight prediction's factor for the pipelined runs, e.g. 0.5"
    )
    parser.add_argument(
        "--data-plane",
        choices=("grpc", "tcp"),
        default="grpc",
        help="peer links over gRPC streams (default) or the workers' TCP data plane (--data-listen), each "
        "behind a proxy of its own with the same delay and rate",
    )
    parser.add_argument("--png", default=None, help="write samples/s against delay (log scale) here")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = run(args)
    print_table(result)
    if args.png:
        plot(result, args.png)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
