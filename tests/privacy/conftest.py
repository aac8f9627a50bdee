"""Fixtures of the privacy tests: small Fashion-MNIST samples from ../shared/data."""

from __future__ import annotations

import pytest

from splitnn.data import load_dataset


@pytest.fixture(scope="session")
def fmnist_dir(shared_data):
    return shared_data / "fashion-mnist"


@pytest.fixture(scope="session")
def fmnist_small(fmnist_dir):
    """The first 600 Fashion-MNIST training samples (for exactness checks)."""
    return load_dataset("fashion-mnist", "train", data_dir=fmnist_dir, download=False, progress=False, limit=600)
