"""splitnn: split learning (split neural networks) for PyTorch.

A network is cut into segments that live at different parties ("workers").
Data holders keep their features, label holders keep their labels; only the
activations at each cut travel forward and their gradients travel back.

>>> import splitnn
>>> alice, bob = splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")
"""

from splitnn import models
from splitnn.accounting import Ledger
from splitnn.data import Dataset, load_dataset
from splitnn.errors import (
    ConfigurationError,
    DataError,
    LabelError,
    PolicyError,
    ShapeMismatchError,
    SplitNNError,
    WireError,
    WorkerError,
)
from splitnn.split import SplitNN
from splitnn.split.cut import cut
from splitnn.split.persist import load_model, save_model
from splitnn.training import evaluate, fit
from splitnn.workers import VirtualWorker, Worker, WorkerPolicy

__version__ = "0.1.0"


def connect(
    url: str,
    *,
    token: str,
    name: str | None = None,
    timeout: float = 60.0,
    tls=None,
    limits=None,
    session: str | None = None,
):
    """Connect to a party started with ``splitnn worker``; returns a :class:`~splitnn.client.remote.RemoteWorker`.

    See :func:`splitnn.client.remote.connect` (imported lazily: grpc loads only when used).
    """
    from splitnn.client.remote import connect as _connect

    return _connect(url, token=token, name=name, timeout=timeout, tls=tls, limits=limits, session=session)


__all__ = [
    "SplitNN",
    "cut",
    "VirtualWorker",
    "Worker",
    "connect",
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
]
