"""In-process SplitNN training throughput against its monolithic twin, in one run.

The tutorial network (784-128-640-10, three segments on alice/bob/claire, SGD
lr 0.03, batch 64) trains on synthetic MNIST-shaped data; the twin is the same
layers as one nn.Sequential with one optimizer, fed the same batches. Runs are
interleaved (twin, split fused, split eager, ...) so that machine noise hits
all of them alike; the report gives medians and the ratio split/twin.

    python benchmarks/bench_inprocess.py [--steps 300] [--repeats 9] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn, optim

import splitnn
from splitnn.data import Dataset
from splitnn.models import tutorial_mlp
from splitnn.training import epoch_batches


def _data(n: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g), "bench", 10)


def _time_twin(data: Dataset, batches: list[torch.Tensor]) -> float:
    torch.manual_seed(0)
    twin = nn.Sequential(*tutorial_mlp())
    opt, loss_fn = optim.SGD(twin.parameters(), lr=0.03), nn.NLLLoss()
    start = time.perf_counter()
    for idx in batches:
        opt.zero_grad()
        loss = loss_fn(twin(data.features[idx]), data.labels[idx])
        loss.backward()
        opt.step()
        loss.item()  # the split model reports each batch's loss too
    return time.perf_counter() - start


def _time_split(data: Dataset, batches: list[torch.Tensor], fuse: bool) -> float:
    torch.manual_seed(0)
    workers = [splitnn.VirtualWorker(n, fuse=fuse) for n in ("alice", "bob", "claire")]
    model = splitnn.SplitNN(tutorial_mlp(), workers, optimizer=lambda p: optim.SGD(p, lr=0.03))
    name, _ = model.prepare(data)
    start = time.perf_counter()
    for idx in batches:
        model.train_batch(name, idx)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = _data(args.steps * args.batch_size)
    batches = epoch_batches(len(data), args.batch_size, seed=0)
    runs = {"twin": [], "split (fused)": [], "split (eager)": []}
    _time_twin(data, batches[:20]), _time_split(data, batches[:20], True)  # warm-up
    for _ in range(args.repeats):
        runs["twin"].append(_time_twin(data, batches))
        runs["split (fused)"].append(_time_split(data, batches, True))
        runs["split (eager)"].append(_time_split(data, batches, False))
    samples = len(data)
    medians = {k: statistics.median(v) for k, v in runs.items()}
    report = {k: {"samples_per_s": samples / t, "ratio_vs_twin": medians["twin"] / t} for k, t in medians.items()}
    print(
        f"tutorial MLP, batch {args.batch_size}, {args.steps} steps x {args.repeats} runs, "
        f"{args.threads} thread(s); medians:"
    )
    for k, r in report.items():
        print(f"  {k:14s} {r['samples_per_s']:10.0f} samples/s   ratio {r['ratio_vs_twin']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
