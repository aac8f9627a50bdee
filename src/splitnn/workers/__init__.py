"""Workers: the parties of split learning behind one protocol."""

from splitnn.workers.base import (
    AveragingWorker,
    EpochWorker,
    GradientWorker,
    MergingWorker,
    MetricWorker,
    PeerStateWorker,
    PsiWorker,
    Worker,
)
from splitnn.workers.merge import MERGE_MODES, merge_tensors, merged_shape
from splitnn.workers.refs import BatchRef, DatasetStats, LossStats, TensorRef, ValueShape, fresh_name
from splitnn.workers.virtual import VirtualWorker, WorkerPolicy

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
    "MERGE_MODES",
    "merge_tensors",
    "merged_shape",
    "fresh_name",
]
