"""FSHA against the data holder, and its hijack detector (policy rule ``detect_hijack``): caught when, false alarms.

The first 2,000 Fashion-MNIST training images at alice (the tutorial MLP's first layer), the next
1,000 as the FSHA attacker's public data, batch 64, threshold 1.1. Per seed: an honest ``fit``
(SGD lr 0.05, 3 epochs) with the rule on (does it raise an alarm? its lowest probe score after
the warm-up); FSHA (alice steps Adam lr 1e-4, as in the FSHA paper) without the rule for
``--steps`` steps (reconstruction MSE, pixels on [0, 1], over 10-step windows); and FSHA against
alice with the rule on (the step it is refused at, its probe scores).

    python benchmarks/bench_privacy_guard.py [--data-dir ../shared/data/fashion-mnist] [--seeds 5] [--nopeek 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from splitnn.data import Dataset, load_dataset
from splitnn.data.batching import epoch_batches
from splitnn.models import tutorial_mlp
from splitnn.privacy.attacks.fsha import FSHA, FSHAConfig
from splitnn.privacy.defenses import NoPeek
from splitnn.split import SplitNN
from splitnn.workers import VirtualWorker
from splitnn.workers.policy import WorkerPolicy

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "fashion-mnist")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--threshold", type=float, default=1.1)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--nopeek", type=float, default=0.0, help="also run FSHA against NoPeek with this alpha")
    args = p.parse_args()
    d = load_dataset("fashion-mnist", "train", data_dir=args.data_dir, download=False, progress=False, limit=3000)
    private, public = Dataset(d.features[:2000], d.labels[:2000], "private", 10), d.features[2000:]
    policy = WorkerPolicy(detect_hijack=args.threshold)
    start = time.perf_counter()
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        segments = tutorial_mlp((128, 640), in_features=784, classes=10)
        alice = VirtualWorker("alice", policy=policy)
        model = SplitNN(
            [segments[0], nn.Sequential(*segments[1:])], [alice, VirtualWorker("bob")], optimizer="sgd:lr=0.05"
        )
        model.fit(private, epochs=3, batch_size=64, seed=seed, progress=False)
        honest = alice._hijack_guards[model.stages[0].key]
        epochs = -(-args.steps // 32)
        batches = [b for e in range(epochs) for b in epoch_batches(2000, 64, shuffle=True, seed=seed, epoch=e)]
        runs = {}
        plans = [("open", WorkerPolicy(), 0.0), ("guarded", policy, 0.0)]
        if args.nopeek > 0:
            plans.append(("nopeek", WorkerPolicy(), args.nopeek))
        for name, rule, alpha in plans:
            torch.manual_seed(seed)
            victim = VirtualWorker("alice", policy=rule)
            bottom = tutorial_mlp((128, 640), in_features=784, classes=10)[0]
            if alpha > 0:
                bottom = NoPeek(bottom, alpha=alpha)
            victim.add_segment("bottom", bottom, lambda ps: torch.optim.Adam(ps, lr=1e-4))
            victim.add_dataset("private", features=private.features)
            attack = FSHA(public, 128, FSHAConfig(seed=seed))
            runs[name] = (attack.attack(victim, "bottom", "private", batches[: args.steps], private.features), victim)
        starts = (0, 50, 100, 200, 300, args.steps - 10)
        curve = runs["open"][0].mse
        windows = {s: sum(curve[s : s + 10]) / 10 for s in starts}
        if "nopeek" in runs:
            nopeek = runs["nopeek"][0].mse
            print(
                f"seed {seed}: FSHA against NoPeek {args.nopeek:g}, MSE from step "
                + ", ".join(f"{s}: {sum(nopeek[s : s + 10]) / 10:.4f}" for s in starts)
            )
        guarded, victim = runs["guarded"]
        scores = victim._hijack_guards["bottom"].scores
        print(
            f"seed {seed}: honest alarm={honest.tripped}, lowest score after warm-up {min(honest.scores[9:]):.2f} | "
            f"FSHA MSE from step "
            + ", ".join(f"{s}: {v:.4f}" for s, v in windows.items())
            + f" | guarded: refused at step {guarded.stopped_at}, scores {min(scores):.3f}-{max(scores):.3f}"
        )
    mean_image = float(((public.mean(0, keepdim=True) - private.features) / 2).pow(2).mean())
    print(f"guessing the public sample's mean image: MSE {mean_image:.4f}")
    print(f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
