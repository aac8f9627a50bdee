"""Fixtures of the PySyft-facade tests: torch unhooked around every test, an MNIST subset."""

from __future__ import annotations

import pytest

import splitnn.syft as sy
from splitnn.data import Dataset, load_dataset

#: MNIST test-set images the tutorial tests train on, and the next ones they test on (subsets keep them fast).
TRAIN, HELD_OUT = 2000, 500


@pytest.fixture(autouse=True)
def _unhooked():
    """Every test starts and ends with torch as PyTorch ships it."""
    sy.unhook()
    yield
    sy.unhook()


@pytest.fixture(scope="session")
def mnist(shared_data) -> tuple[Dataset, Dataset]:
    """The first 2,000 images of MNIST's test set to train on and the next 500 to test on, (N, 1, 28, 28)."""
    data = load_dataset("mnist", "test", data_dir=shared_data, limit=TRAIN + HELD_OUT, download=False, progress=False)
    return data.subset(slice(0, TRAIN)), data.subset(slice(TRAIN, None))
