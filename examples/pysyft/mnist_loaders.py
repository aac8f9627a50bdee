"""MNIST for the PySyft tutorial scripts, in place of the notebooks' torchvision data cell.

The tutorials load MNIST with torchvision (``ToTensor()`` then
``Normalize((0.5,), (0.5,))``) into a ``DataLoader`` with batch size 64. These
loaders hold the same tensors, read by splitnn (no torchvision needed):
images (B, 1, 28, 28) in [-1, 1], labels int64.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader, TensorDataset

from splitnn.data import load_dataset


def options(doc: str) -> argparse.Namespace:
    """The scripts' command line: where MNIST is, how much of it, how many epochs."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--data-dir", default=None, help="directory holding mnist/ (default: splitnn's search path)")
    parser.add_argument(
        "--split",
        default="test",
        choices=["test", "train"],
        help="test (default): MNIST's test set only, the first images to train, the last --holdout to test; "
        "train: the training set to train (downloaded if missing) and the test set to test, as the notebooks",
    )
    parser.add_argument("--limit", type=int, default=None, help="use only the first LIMIT images of the split")
    parser.add_argument("--holdout", type=int, default=2000, help="with --split test: images kept out to test on")
    parser.add_argument("--epochs", type=int, default=15, help="the notebooks' epochs (15)")
    args = parser.parse_args()
    if args.split == "test" and args.holdout < 1:
        parser.error("--holdout must be at least 1 (the test images come from the end of MNIST's test set)")
    return args


def loaders(args: argparse.Namespace) -> tuple[DataLoader, DataLoader]:
    """``trainloader`` (shuffled, as the notebooks') and ``testloader`` (in order), batch size 64."""
    data = load_dataset("mnist", args.split, data_dir=args.data_dir, limit=args.limit)
    if args.split == "train":
        train, test = data, load_dataset("mnist", "test", data_dir=args.data_dir)
        trainset = TensorDataset(train.features, train.labels)
        testset = TensorDataset(test.features, test.labels)
    else:
        if len(data.labels) <= args.holdout:
            raise SystemExit(f"--holdout {args.holdout} leaves no training images out of {len(data.labels)}")
        n = len(data.labels) - args.holdout
        trainset = TensorDataset(data.features[:n], data.labels[:n])
        testset = TensorDataset(data.features[n:], data.labels[n:])
    # The notebooks' DataLoader draws its shuffle from torch's global generator, which their model cell seeds.
    return DataLoader(trainset, batch_size=64, shuffle=True), DataLoader(testset, batch_size=64, shuffle=False)


def accuracy(predict, testloader: DataLoader) -> str:
    """``predict(images) -> log-probabilities`` (a local tensor) over ``testloader``, as a line to print."""
    correct = 0
    with torch.no_grad():
        for images, labels in testloader:
            correct += int((predict(images).argmax(dim=1) == labels).sum())
    n = len(testloader.dataset)
    return f"Accuracy on the {n} test images: {correct}/{n} ({100 * correct / n:.1f}%)"
