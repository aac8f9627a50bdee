"""Training loops, topologies and baselines built on the split layer.

* :func:`fit` / :func:`evaluate` and :class:`Trainable`, the base class of every model they drive
  (defined in :mod:`splitnn.split.fit` and :mod:`splitnn.split.trainable`, below ``SplitNN``).
* Topologies beyond one chain: :class:`MultiHolderSplitNN`, :class:`UShapedSplitNN`,
  :class:`VerticalSplitNN` (:mod:`splitnn.training.topologies`).
* Baselines: :class:`FedAvg`, :class:`LargeBatchSGD` (:mod:`splitnn.training.baselines`).
* Aligning vertical parties by private set intersection: :func:`intersect` (:mod:`splitnn.training.alignment`).
"""

from splitnn.data.batching import epoch_batches
from splitnn.split.fit import EpochStats, EvalResult, History, evaluate, fit
from splitnn.split.trainable import Trainable
from splitnn.training.alignment import PsiResult, intersect
from splitnn.training.baselines import FedAvg, LargeBatchSGD
from splitnn.training.topologies import (
    MultiHolderSplitNN,
    Topology,
    TopologyConfig,
    UShapedSplitNN,
    VerticalSplitNN,
    build_topology,
)

__all__ = [
    "epoch_batches",
    "fit",
    "evaluate",
    "History",
    "EpochStats",
    "EvalResult",
    "Trainable",
    "Topology",
    "MultiHolderSplitNN",
    "UShapedSplitNN",
    "VerticalSplitNN",
    "TopologyConfig",
    "build_topology",
    "FedAvg",
    "LargeBatchSGD",
    "intersect",
    "PsiResult",
]
