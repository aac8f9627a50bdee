"""Fixtures of the PySyft-facade tests: torch unhooked around every test, an MNIST subset."""

from __future__ import annotations

import pytest

import splitnn.syft as sy
from splitnn.data import load_dataset

#: MNIST test-set images the tutorial tests train on (a subset keeps them fast).
SUBSET = 2000


@pytest.fixture(autouse=True)
def _unhooked():
    """Every test starts and ends with torch as PyTorch ships it."""
    sy.unhook()
    yield
    sy.unhook()


@pytest.fixture(scope="session")
def mnist_subset(shared_data):
    """The first 2,000 images of MNIST's test set, features (N, 1, 28, 28)."""
    return load_dataset("mnist", "test", data_dir=shared_data, limit=SUBSET, download=False, progress=False)
