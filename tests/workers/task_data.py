"""Datasets that ``splitnn worker --data NAME=tests.workers.task_data:FUNCTION --trust tests.workers`` builds
at a party (and that the tests build in-process to compare): a binary task with float 0/1 labels."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset as MapDataset

from splitnn.data import Dataset


def binary(n: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = ((x[:, 0] - x[:, 1] + 0.5 * torch.randn(n, generator=g)) > 0).float()
    return Dataset(x, y, "binary")


class Rows(MapDataset):
    """Features served one row at a time (a map-style dataset, read in batches by a DataLoader at the party)."""

    def __init__(self, features: torch.Tensor) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.features[i]


def train_features() -> Rows:
    return Rows(binary(200, seed=11).features)


def train_labels() -> dict:
    return {"labels": binary(200, seed=11).labels}


def test_features() -> Rows:
    return Rows(binary(120, seed=12).features)


def test_labels() -> dict:
    return {"labels": binary(120, seed=12).labels}


def toy_images() -> Dataset:
    """The small 8x8 'images' of tests/client/test_remote_checkpoint.py (features at the data holder)."""
    from tests.helpers import toy_dataset

    return toy_dataset(320, shape=(1, 8, 8))
