"""Shared fixtures: where the project's shared test data lives, and small models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SPLITNN_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked ``cuda`` where there is no CUDA GPU (benchmarks/gpu_check.sh runs them on one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository (MNIST test set, full Fashion-MNIST)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}; set SPLITNN_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Same thread count in every test so that kernels pick the same code paths.
    torch.set_num_threads(1)
    yield


@pytest.fixture()
def remote(cluster, request):
    """The researcher's connections to the module's ``NAMES`` workers of its ``cluster`` (worker processes the
    module starts), closed after the test."""
    workers = cluster.connect(*request.module.NAMES)
    yield workers
    for w in workers:
        w.close()
