"""Where pipelining's accuracy cost comes from: the tutorial network trained with a delay per layer, in plain PyTorch.

    OMP_NUM_THREADS=1 python benchmarks/sim_staleness.py --delays 15,7,0     # K = 16's staleness (1F1B)
    OMP_NUM_THREADS=1 python benchmarks/sim_staleness.py --delays 15,0,0     # the first layer's alone
    OMP_NUM_THREADS=1 python benchmarks/sim_staleness.py --delays 0,7,0      # the middle layer's alone
    OMP_NUM_THREADS=1 python benchmarks/sim_staleness.py --delays 15,7,0 --standardize

Layer i (784-128, 128-640, 640-10; ReLU, ReLU, LogSoftmax) computes batch t, forward and backward,
with its weights of ``delays[i]`` updates before (weight stashing, as ``fit(..., pipeline=K)`` does
with delays K - 1, K/2 - 1, 0), and plain SGD applies the gradient to the current weights. No splitnn
code runs here but the data loader: this is the definition, written independently, to ask which
layer's delay costs the accuracy (Fashion-MNIST, 5 epochs, batch 64, lr 0.03; mean over ``--seeds``
of the final test accuracy, of the last two epochs', and of the last epoch's training loss).
``--standardize`` standardises each pixel with the training set's statistics first.
Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from splitnn.data import load_dataset, standardize  # noqa: E402

SIZES = (784, 128, 640, 10)
BATCH = 64


def run(x, y, xt, yt, delays: list[int], lr: float, epochs: int, seed: int) -> tuple[list[float], float]:
    """Test accuracy after each epoch and the last epoch's mean training loss."""
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(a, b) for a, b in zip(SIZES[:-1], SIZES[1:])]
    weights = [[layer.weight.detach().clone(), layer.bias.detach().clone()] for layer in layers]
    versions = [[[w.clone() for w in ws]] for ws in weights]  # per layer: its last delay + 1 versions
    order = torch.Generator().manual_seed(seed)
    accuracy, loss_sum = [], 0.0
    for _ in range(epochs):
        perm, loss_sum, steps = torch.randperm(len(y), generator=order), 0.0, 0
        for start in range(0, len(y), BATCH):
            idx = perm[start : start + BATCH]
            used = [[w.clone().requires_grad_() for w in v[0]] for v in versions]  # the oldest kept version
            h = x[idx]
            for i, (w, b) in enumerate(used):
                h = F.linear(h, w, b)
                h = F.relu(h) if i < len(used) - 1 else F.log_softmax(h, dim=1)
            loss = F.nll_loss(h, y[idx])
            loss.backward()
            loss_sum, steps = loss_sum + loss.item(), steps + 1
            for i, ws in enumerate(weights):
                for w, u in zip(ws, used[i]):
                    w -= lr * u.grad
                versions[i].append([w.clone() for w in ws])
                del versions[i][: max(0, len(versions[i]) - delays[i] - 1)]
        with torch.no_grad():
            h = xt
            for i, (w, b) in enumerate(weights):
                h = F.linear(h, w, b)
                h = F.relu(h) if i < len(weights) - 1 else h
            accuracy.append((h.argmax(1) == yt).float().mean().item())
    return accuracy, loss_sum / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/fashion-mnist"))
    parser.add_argument("--delays", default="15,7,0", help="updates of delay per layer, comma-separated")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--standardize", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    delays = [int(d) for d in args.delays.split(",")]
    if len(delays) != len(SIZES) - 1 or min(delays) < 0:
        raise SystemExit(f"--delays: give {len(SIZES) - 1} non-negative integers, one per layer")
    load = dict(data_dir=args.data_dir, download=False, progress=False)
    train, test = load_dataset("fashion-mnist", "train", **load), load_dataset("fashion-mnist", "test", **load)
    if args.standardize:
        train, test = standardize(train, test)
    x, xt = train.features.reshape(len(train), -1), test.features.reshape(len(test), -1)
    runs = [run(x, train.labels, xt, test.labels, delays, args.lr, args.epochs, int(s)) for s in args.seeds.split(",")]
    final = statistics.mean(acc[-1] for acc, _ in runs)
    last2 = statistics.mean(statistics.mean(acc[-2:]) for acc, _ in runs)
    loss = statistics.mean(loss for _, loss in runs)
    print(f"delays {delays}: test accuracy {final:.4f} (last 2 epochs {last2:.4f}), training loss {loss:.3f}")


if __name__ == "__main__":
    main()
