"""The data of the horizontal topologies over the holders' own data (tests/training/test_own_data_topologies.py):
two holders' shards of small 8x8 'images', each held by its own ``splitnn worker --data`` (features at the holder,
labels at the label holder), and the same data as the tests build in process."""

from __future__ import annotations

from splitnn.data import Dataset
from tests.helpers import toy_dataset

#: rows of each holder's shard (multiples of the tests' batch size: no short last batch)
SIZES = {"alice": 48, "carol": 40}


def _shard(holder: str) -> Dataset:
    data = toy_dataset(sum(SIZES.values()), shape=(1, 8, 8), seed=21)
    start = 0 if holder == "alice" else SIZES["alice"]
    rows = slice(start, start + SIZES[holder])
    return Dataset(data.features[rows], data.labels[rows], "toy", num_classes=10)


def alice() -> Dataset:
    """Holder alice's shard."""
    return _shard("alice")


def carol() -> Dataset:
    """Holder carol's shard."""
    return _shard("carol")
