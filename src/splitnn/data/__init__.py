"""Datasets for splitnn: IDX (MNIST-family) loading, download with checksums, partitioners.

Typical use::

    from splitnn.data import load_dataset, iid_shards
    train = load_dataset("fashion-mnist", "train")      # finds or downloads, verifies
    shards = iid_shards(len(train), k=3, seed=0)
    parts = [train.subset(s) for s in shards]
"""

from .batching import epoch_batches
from .dataset import Dataset, clear_cache, load_dataset, normalize_images
from .download import download_file, sha256_file
from .idx import read_idx, write_idx
from .partition import (
    PartitionSpec,
    column_partition,
    dirichlet_shards,
    iid_shards,
    parse_partition,
    vertical_split,
)
from .registry import DATASETS, SPLITS, DatasetInfo, get_dataset_info
from .resolve import cache_dir, candidate_dirs, downloads_allowed, resolve_dataset_dir, resolve_split_files
from .scaling import standardize
from .sources import TorchDataset
from .tabular import Table, load_table

__all__ = [
    "DATASETS",
    "SPLITS",
    "Dataset",
    "TorchDataset",
    "Table",
    "load_table",
    "standardize",
    "DatasetInfo",
    "PartitionSpec",
    "cache_dir",
    "candidate_dirs",
    "clear_cache",
    "column_partition",
    "dirichlet_shards",
    "download_file",
    "epoch_batches",
    "downloads_allowed",
    "get_dataset_info",
    "iid_shards",
    "load_dataset",
    "normalize_images",
    "parse_partition",
    "read_idx",
    "resolve_dataset_dir",
    "resolve_split_files",
    "sha256_file",
    "vertical_split",
    "write_idx",
]
