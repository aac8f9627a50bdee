"""splitnn: split learning (split neural networks) for PyTorch.

A network is cut into segments that live at different parties ("workers").
Data holders keep their features, label holders keep their labels; only the
activations at each cut travel forward and their gradients travel back.

>>> import splitnn
>>> alice, bob = splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")

Parties started with ``splitnn worker`` are reached with ``splitnn.connect(url, token=...)``
(:func:`splitnn.client.connect`, loaded on first use so that in-process work never imports grpc);
a federation provisioned with ``splitnn provision`` with ``splitnn.connect_federation("federation.toml")``.
"""

from splitnn import models
from splitnn.accounting import Ledger
from splitnn.data import Dataset, load_dataset
from splitnn.errors import (
    CheckpointError,
    ConfigurationError,
    DataError,
    LabelError,
    PolicyError,
    ShapeMismatchError,
    SplitNNError,
    WireError,
    WorkerError,
    WorkerUnreachableError,
)
from splitnn.split import SplitNN
from splitnn.split.cut import cut
from splitnn.split.persist import load_model, save_model
from splitnn.training import evaluate, fit
from splitnn.workers import VirtualWorker, Worker, WorkerPolicy

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # ``splitnn.connect`` is :func:`splitnn.client.connect`, imported when first used: importing
    # splitnn must not load grpc (in-process split learning never needs it).
    if name == "connect":
        from splitnn.client import connect

        return connect
    if name == "connect_federation":  # a researcher's kit: every party, with its token and certificates
        from splitnn.deploy.connect import connect_federation

        return connect_federation
    raise AttributeError(f"module 'splitnn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "connect", "connect_federation"])


__all__ = [
    "SplitNN",
    "cut",
    "VirtualWorker",
    "Worker",
    "connect",
    "connect_federation",
    "WorkerPolicy",
    "Ledger",
    "fit",
    "evaluate",
    "Dataset",
    "load_dataset",
    "save_model",
    "load_model",
    "models",
    "SplitNNError",
    "ConfigurationError",
    "ShapeMismatchError",
    "DataError",
    "LabelError",
    "PolicyError",
    "WireError",
    "WorkerError",
    "WorkerUnreachableError",
    "CheckpointError",
]
