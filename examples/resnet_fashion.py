"""A ResNet on Fashion-MNIST, cut with ``splitnn.cut`` into three parties: alice, bob, claire.

The model is plain PyTorch (BasicBlocks with BatchNorm, 1x1-convolution shortcuts where a
block downsamples); nothing in it knows about splitnn. ``splitnn.cut`` cuts it before
``layer2`` and before ``layer3``: alice holds the images and runs the stem and ``layer1``
(28x28), bob runs ``layer2`` (14x14), claire runs ``layer3`` and the classifier and holds
the labels. Each party has its own Adam optimizer; the learning rate drops tenfold for the
last epoch.

    python examples/resnet_fashion.py                       # 5 epochs on the CPU
    python examples/resnet_fashion.py --device cuda         # every party on the GPU
    python examples/resnet_fashion.py --device cpu,cuda,cpu # bob on the GPU, alice and claire on the CPU
    python examples/resnet_fashion.py --limit 6000 --epochs 2 --width 8   # a quick look

Prints the test accuracy after each epoch, the time, and the bytes each party sent.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import splitnn

PARTIES = ("alice", "bob", "claire")
CUT_AT = ["layer2", "layer3"]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut (1x1 convolution + BatchNorm when the shape changes)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.in_planes, self.planes, self.stride = in_planes, planes, stride
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet for 1x28x28 images: a 3x3 stem, three stages (``width``, 2x, 4x channels; the last
    two halve the resolution), global average pooling and a linear classifier (logits)."""

    def __init__(self, width: int = 16, blocks: Sequence[int] = (1, 1, 1), classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        planes, layers = width, []
        for i, n in enumerate(blocks):
            out = width * 2**i
            stage = [BasicBlock(planes, out, 1 if i == 0 else 2)] + [BasicBlock(out, out) for _ in range(n - 1)]
            layers.append(nn.Sequential(*stage))
            planes = out
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(planes, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def split_resnet(
    model: nn.Module, devices: Sequence[str] = ("cpu",) * 3, lr: float = 2e-3
) -> tuple[splitnn.SplitNN, list[torch.optim.Optimizer]]:
    """``model`` cut at ``CUT_AT`` onto alice, bob and claire (on ``devices``), one Adam each.

    Returns the split network and the parties' optimizers (kept so that the caller can change
    their learning rate between epochs, as with any PyTorch optimizer)."""
    optimizers: list[torch.optim.Optimizer] = []

    def adam(params):
        optimizers.append(torch.optim.Adam(params, lr=lr))
        return optimizers[-1]

    workers = [splitnn.VirtualWorker(name, device=dev) for name, dev in zip(PARTIES, devices)]
    split = splitnn.SplitNN(splitnn.cut(model, at=CUT_AT), workers, optimizer=adam, loss="cross_entropy")
    return split, optimizers


def _devices(text: str) -> list[str]:
    devices = [d.strip() for d in text.split(",")]
    if len(devices) == 1:
        return devices * len(PARTIES)
    if len(devices) != len(PARTIES):
        raise SystemExit(f"--device: give one device, or one per party ({', '.join(PARTIES)}), got {text!r}")
    return devices


def main(argv: Sequence[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam's learning rate (a tenth of it in the last epoch)")
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage (then 2x, 4x)")
    parser.add_argument("--device", default="cpu", help="one device for every party, or three: alice,bob,claire")
    parser.add_argument("--data-dir", type=Path, default=SHARED_DATA if SHARED_DATA.is_dir() else None)
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    parser.add_argument("--test-limit", type=int, default=None, help="test on the first N images only")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = dict(data_dir=args.data_dir, progress=False)
    train = splitnn.load_dataset("fashion-mnist", "train", limit=args.limit, **load)
    test = splitnn.load_dataset("fashion-mnist", "test", limit=args.test_limit, **load)

    torch.manual_seed(args.seed)
    split, optimizers = split_resnet(ResNet(width=args.width), _devices(args.device), lr=args.lr)
    print(f"{split}; {len(train)} training and {len(test)} test images, batch {args.batch_size}")
    accuracies: list[float] = []
    start = time.perf_counter()

    def report(stats) -> None:
        accuracies.append(stats.test_accuracy)
        print(
            f"epoch {stats.epoch}: train loss {stats.train_loss:.4f}, test accuracy {stats.test_accuracy:.4f}, "
            f"{stats.seconds:.0f} s (total {time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        if stats.epoch == args.epochs - 1:  # the last epoch at a tenth of the learning rate
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = args.lr / 10

    split.fit(train, epochs=args.epochs, batch_size=args.batch_size, test_data=test, seed=args.seed, on_epoch=report)
    sent = split.ledger.sent_by()
    print("bytes sent: " + ", ".join(f"{party} {n / 2**20:,.1f} MiB" for party, n in sent.items()))
    return accuracies


if __name__ == "__main__":
    main()
