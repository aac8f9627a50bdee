"""In-process split ResNet training throughput against the unsplit model, in one run.

The ResNet of ``examples/resnet_fashion.py`` (BasicBlocks with BatchNorm; width 16 by default),
cut with ``splitnn.cut`` before ``layer2`` and ``layer3`` onto alice, bob and claire (Adam,
cross-entropy, batch 128), trains on synthetic 1x28x28 images; the twin is the same model
unsplit, one Adam, fed the same batches by a plain PyTorch loop. Runs are interleaved (twin,
split fused, split eager, ...) so that machine noise hits all of them alike; the report gives
medians and the ratio twin time / split time (1.0: no cost; the MLP's target is >= 0.95). The
order of the three rotates from one repeat to the next, so none always runs in another's wake.

    python benchmarks/bench_resnet.py [--steps 20] [--repeats 5] [--threads 1] [--device cpu|cuda] [--clock wall|cpu]
                                      [--json out.json]

``--device cuda`` puts every party (and the twin) on the GPU; ``--device cpu,cuda,cpu`` mixes
(the twin then runs on the first device).

``--clock cpu`` times with ``time.process_time`` (CPU seconds of this process) instead of the
wall clock: on a machine shared with other jobs, wall time swings with their load while the
CPU time of a one-thread run does much less. CPU only (GPU work is not CPU time). Besides the
medians, the report gives each variant's fastest run and the ratio of those.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import splitnn
from splitnn.data import Dataset
from splitnn.training import epoch_batches

_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "resnet_fashion.py"


def _example():
    spec = importlib.util.spec_from_file_location("resnet_fashion", _EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ex = _example()


def _data(n: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g), "bench", 10)


clock = time.perf_counter


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_twin(data: Dataset, batches: list[torch.Tensor], width: int, device: torch.device) -> float:
    torch.manual_seed(0)
    twin = ex.ResNet(width=width).to(device)
    opt = torch.optim.Adam(twin.parameters(), lr=2e-3)
    feats, labels = data.features.to(device), data.labels.to(device)  # as a worker holds its data
    _sync(device)
    start = clock()
    for idx in batches:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(twin(feats[idx]), labels[idx])
        loss.backward()
        opt.step()
        loss.item()  # the split model reports each batch's loss too
    _sync(device)
    return clock() - start


def _time_split(data: Dataset, batches: list[torch.Tensor], width: int, devices: list[str], fuse: bool) -> float:
    torch.manual_seed(0)
    split, _ = ex.split_resnet(ex.ResNet(width=width), devices, lr=2e-3)
    for w in split.workers:
        w.fuse = fuse
    name, _ = split.prepare(data)
    first = torch.device(split.data_holder.device)
    _sync(first)
    start = clock()
    for idx in batches:
        split.train_batch(name, idx)
    for w in split.workers:
        _sync(w.device)
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="one device for every party, or three: alice,bob,claire")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall time or CPU time")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    global clock
    if args.clock == "cpu":
        if any(d.startswith(("cuda", "mps")) for d in ex._devices(args.device)):
            parser.error("--clock cpu measures CPU time; use the wall clock with a GPU")
        clock = time.process_time
    torch.set_num_threads(args.threads)
    devices = ex._devices(args.device)
    twin_device = splitnn.VirtualWorker("twin", device=devices[0]).device  # checked like a worker's
    data = _data(args.steps * args.batch_size)
    batches = epoch_batches(len(data), args.batch_size, seed=0)
    runs = {"twin": [], "split (fused)": [], "split (eager)": []}
    warm = batches[: max(2, len(batches) // 5)]
    _time_twin(data, warm, args.width, twin_device), _time_split(data, warm, args.width, devices, True)
    timers = {
        "twin": lambda: _time_twin(data, batches, args.width, twin_device),
        "split (fused)": lambda: _time_split(data, batches, args.width, devices, True),
        "split (eager)": lambda: _time_split(data, batches, args.width, devices, False),
    }
    order = list(timers)
    for r in range(args.repeats):
        for k in order[r % 3 :] + order[: r % 3]:  # rotated: no variant always runs right after another
            runs[k].append(timers[k]())
    samples = len(data)
    medians = {k: statistics.median(v) for k, v in runs.items()}
    best = {k: min(v) for k, v in runs.items()}
    report = {
        k: {
            "samples_per_s": samples / t,
            "ratio_vs_twin": medians["twin"] / t,
            "best_ratio_vs_twin": best["twin"] / best[k],
            "runs_s": runs[k],
        }
        for k, t in medians.items()
    }
    print(
        f"ResNet width {args.width} (cut before layer2 and layer3), batch {args.batch_size}, {args.steps} steps x "
        f"{args.repeats} runs, {args.threads} thread(s), devices {','.join(devices)}, {args.clock} clock; medians:"
    )
    for k, r in report.items():
        print(
            f"  {k:14s} {r['samples_per_s']:10.0f} samples/s   ratio {r['ratio_vs_twin']:.3f}"
            f"   (fastest runs: ratio {r['best_ratio_vs_twin']:.3f})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "report": report}, f, indent=2)


if __name__ == "__main__":
    main()
