"""Workers: the parties of split learning behind one protocol, and the in-process engine.

What a model, a topology or a worker implementer needs: the :class:`Worker` protocol and its
optional capabilities, the handles that name a party's tensors and data (:class:`TensorRef`,
:class:`BatchRef`) and what a party reports (:class:`LossStats`, :class:`DatasetStats`,
:class:`ValueShape`), and the in-process :class:`VirtualWorker` with its :class:`WorkerPolicy`.
The helpers behind them (merging, losses, metrics, averaging, held data) are in their modules.
A party reached over the network is :func:`splitnn.connect` (:mod:`splitnn.client`).
"""

from splitnn.workers.base import (
    AveragingWorker,
    CheckpointWorker,
    CodecWorker,
    EpochWorker,
    GradientWorker,
    MergingWorker,
    MetricWorker,
    PeerStateWorker,
    PsiWorker,
    ReconnectingWorker,
    Worker,
)
from splitnn.workers.policy import WorkerPolicy
from splitnn.workers.refs import BatchRef, DatasetStats, LossStats, TensorRef, ValueShape
from splitnn.workers.virtual import VirtualWorker

__all__ = [
    "Worker",
    "VirtualWorker",
    "WorkerPolicy",
    "TensorRef",
    "BatchRef",
    "LossStats",
    "DatasetStats",
    "ValueShape",
    "MergingWorker",
    "PeerStateWorker",
    "PsiWorker",
    "AveragingWorker",
    "GradientWorker",
    "MetricWorker",
    "EpochWorker",
    "CheckpointWorker",
    "ReconnectingWorker",
    "CodecWorker",
]
