"""Workers: the parties of split learning behind one protocol."""

from splitnn.workers.base import Worker
from splitnn.workers.refs import BatchRef, DatasetStats, LossStats, TensorRef
from splitnn.workers.virtual import VirtualWorker, WorkerPolicy

__all__ = ["Worker", "VirtualWorker", "WorkerPolicy", "TensorRef", "BatchRef", "LossStats", "DatasetStats"]
