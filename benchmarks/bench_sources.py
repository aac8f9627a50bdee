"""What a map-style dataset costs: the same in-process training on tensors and through a DataLoader.

The tutorial network (784-128-640-10 on alice/bob/claire, SGD lr 0.03, batch 64) trains on
synthetic MNIST-shaped data held as tensors (indexed directly) and as a map-style
``TorchDataset(TensorDataset(x, y))`` (read batch by batch with a ``DataLoader`` whose batch
sampler is the batch's indices, item by item). Runs are interleaved; the report gives medians
and the ratio map-style / tensors. Both runs end with the same weights (the tests check it).

    python benchmarks/bench_sources.py [--steps 300] [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import TensorDataset

import splitnn
from splitnn.data import Dataset, TorchDataset
from splitnn.models import tutorial_mlp
from splitnn.training import epoch_batches


def _time(data: object, batches: list[torch.Tensor]) -> float:
    torch.manual_seed(0)
    workers = [splitnn.VirtualWorker(n) for n in ("alice", "bob", "claire")]
    model = splitnn.SplitNN(tutorial_mlp(), workers, optimizer="sgd:lr=0.03")
    name, _ = model.prepare(data)
    start = time.perf_counter()
    for idx in batches:
        model.train_batch(name, idx)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.steps * args.batch_size
    g = torch.Generator().manual_seed(0)
    tensors = Dataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g), "bench", 10)
    mapped = TorchDataset(TensorDataset(tensors.features, tensors.labels), name="bench")
    batches = epoch_batches(n, args.batch_size, seed=0)
    _time(tensors, batches[:20]), _time(mapped, batches[:20])  # warm-up
    runs: dict[str, list[float]] = {"tensors": [], "map-style (DataLoader)": []}
    for _ in range(args.repeats):
        runs["tensors"].append(_time(tensors, batches))
        runs["map-style (DataLoader)"].append(_time(mapped, batches))
    medians = {k: statistics.median(v) for k, v in runs.items()}
    print(f"tutorial MLP, batch {args.batch_size}, {args.steps} steps x {args.repeats} runs; medians:")
    for k, t in medians.items():
        ratio = medians["tensors"] / t
        print(f"  {k:24s} {n / t:10.0f} samples/s   ratio {ratio:.3f}   {1e6 * t / args.steps:7.0f} us/step")


if __name__ == "__main__":
    main()
