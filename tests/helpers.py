"""Test helpers: synthetic datasets and a monolithic twin trainer."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from splitnn.data import Dataset
from splitnn.training import epoch_batches


def toy_dataset(
    n: int = 256, shape: Sequence[int] = (1, 28, 28), classes: int = 10, seed: int = 0, name: str = "toy"
) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    return Dataset(
        features=torch.randn(n, *shape, generator=g),
        labels=torch.randint(0, classes, (n,), generator=g),
        name=name,
        num_classes=classes,
    )


def train_twin(
    segments: Sequence[nn.Module],
    data: Dataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float = 0.03,
    seed: int = 0,
    shuffle: bool = True,
) -> nn.Sequential:
    """Train the same layers as one nn.Sequential with one SGD optimizer, in fit's data order."""
    twin = nn.Sequential(*copy.deepcopy(list(segments)))
    opt = torch.optim.SGD(twin.parameters(), lr=lr)
    loss_fn = nn.NLLLoss()
    for epoch in range(epochs):
        for idx in epoch_batches(len(data), batch_size, shuffle=shuffle, seed=seed, epoch=epoch):
            opt.zero_grad()
            loss_fn(twin(data.features[idx]), data.labels[idx]).backward()
            opt.step()
    return twin


def flat_params(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in module.state_dict().values()]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    pa, pb = flat_params(a), flat_params(b)
    assert len(pa) == len(pb), f"{len(pa)} tensors vs {len(pb)}"
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert x.shape == y.shape, f"tensor {i}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
        assert torch.equal(x, y), f"tensor {i} differs (max abs diff {(x - y).abs().max().item():.3g})"
