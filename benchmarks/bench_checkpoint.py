"""What checkpoints cost: fit with and without them, interleaved, on the tutorial network.

In-process (three VirtualWorkers) on synthetic MNIST-shaped data, SGD with momentum, batch 64:
one epoch of ``--samples`` samples per run, without checkpoints, with a checkpoint per epoch,
and with one every ``N`` batches for each ``--every`` value. Runs are interleaved so that
machine noise hits them alike; the report gives medians, the ratio to the run without
checkpoints, and the size of one party's checkpoint file.

    python benchmarks/bench_checkpoint.py [--samples 12800] [--every 100,20] [--repeats 5] [--json out.json]
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
from splitnn.data import Dataset
from splitnn.models import tutorial_mlp


def _data(n: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g), "bench", 10)


def _run(data: Dataset, every: str | int | None) -> tuple[float, int]:
    torch.manual_seed(0)
    workers = [splitnn.VirtualWorker(n) for n in ("alice", "bob", "claire")]
    model = splitnn.SplitNN(tutorial_mlp(), workers, optimizer="sgd:lr=0.03,momentum=0.9")
    with tempfile.TemporaryDirectory() as d:
        kwargs = {} if every is None else {"checkpoint_dir": d, "checkpoint_every": every}
        start = time.perf_counter()
        model.fit(data, epochs=1, batch_size=64, progress=False, **kwargs)
        seconds = time.perf_counter() - start
        files = sorted(Path(d).rglob("step-*.safetensors"))
        size = max((f.stat().st_size for f in files if "bob" in f.parts), default=0)
    return seconds, size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=12800)
    p.add_argument("--every", default="100,20", help="checkpoint intervals in batches, comma-separated")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = _data(args.samples)
    settings: list[str | int | None] = [None, "epoch", *(int(x) for x in args.every.split(","))]
    times: dict[str, list[float]] = {str(s): [] for s in settings}
    sizes: dict[str, int] = {}
    _run(data, None)  # warm-up
    for _ in range(args.repeats):
        for s in settings:
            seconds, size = _run(data, s)
            times[str(s)].append(seconds)
            sizes[str(s)] = size
    base = statistics.median(times["None"])
    batches = -(-args.samples // 64)
    print(f"tutorial MLP, SGD momentum, batch 64, {batches} batches x {args.repeats} runs, {args.threads} thread(s)")
    rows = []
    for s in settings:
        med = statistics.median(times[str(s)])
        label = "no checkpoints" if s is None else ("every epoch" if s == "epoch" else f"every {s} batches")
        rows.append({"setting": label, "seconds": med, "ratio": med / base, "bob_checkpoint_bytes": sizes[str(s)]})
        size = f"  bob's file {sizes[str(s)]:,} B" if sizes[str(s)] else ""
        print(f"  {label:<22} {med:7.3f} s   time x{med / base:5.3f}{size}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
