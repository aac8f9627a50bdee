"""DP-SGD at the data holder (``DPSegment``): test accuracy and the accountant's epsilon per epoch at target epsilons.

The first ``--train-size`` Fashion-MNIST training images, the whole test split; the tutorial MLP
784-128-640-10 cut after its first layer (alice: the first layer, wrapped in ``DPSegment``; bob: the
rest and the labels); SGD lr 0.05, batch 64, clip 1, delta 1e-5, ``--epochs`` epochs, seed 0.

    python benchmarks/bench_privacy_dp.py [--data-dir ../shared/data/fashion-mnist] [--train-size 10000]
        [--epochs 3] [--epsilons 1,3,8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from splitnn.data import load_dataset
from splitnn.models import tutorial_mlp
from splitnn.privacy.defenses.dp import DPSegment
from splitnn.split import SplitNN
from splitnn.workers import VirtualWorker

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "fashion-mnist")
    p.add_argument("--train-size", type=int, default=10_000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--epsilons", default="1,3,8")
    args = p.parse_args()
    load = dict(data_dir=args.data_dir, download=False, progress=False)
    train = load_dataset("fashion-mnist", "train", limit=args.train_size, **load)
    test = load_dataset("fashion-mnist", "test", **load)
    for eps in [None] + [float(e) for e in args.epsilons.split(",")]:
        start = time.perf_counter()
        torch.manual_seed(0)
        segments = tutorial_mlp((128, 640), in_features=784, classes=10)
        bottom, extra = segments[0], {}
        if eps is not None:
            rate = 64 / len(train)
            bottom = DPSegment.for_target_epsilon(bottom, eps, 1e-5, sample_rate=rate, epochs=args.epochs)
            extra = {"on_epoch": bottom.epoch_reporter(1e-5)}
        workers = [VirtualWorker("alice"), VirtualWorker("bob")]
        model = SplitNN([bottom, nn.Sequential(*segments[1:])], workers, optimizer="sgd:lr=0.05")
        history = model.fit(train, epochs=args.epochs, batch_size=64, seed=0, progress=False, **extra)
        spent = [round(e, 3) for e in history.metric("epsilon")] if eps is not None else "-"
        sigma = getattr(bottom, "noise_multiplier", 0.0)
        print(
            f"target epsilon {eps}: noise multiplier {sigma:.3f}, epsilon per epoch {spent}, "
            f"test accuracy {model.evaluate(test).accuracy:.4f} ({time.perf_counter() - start:.0f} s)"
        )


if __name__ == "__main__":
    main()
