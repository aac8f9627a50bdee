"""Baselines that split learning is compared with, on the same workers and ledger.

* :class:`FedAvg`: federated averaging; each client trains the whole model on its
  shard, the server averages the weights (by sample count) every round.
* :class:`LargeBatchSGD`: synchronous data-parallel SGD; each client computes the
  whole model's gradient on its batch, the server averages and steps.

In both, the server is the researcher (the orchestrating process), which keeps
the global model; clients are workers holding their shard's features and labels.
"""

from splitnn.training.baselines.common import Federation, evaluate_module, weighted_average
from splitnn.training.baselines.fedavg import FedAvg
from splitnn.training.baselines.large_batch import LargeBatchSGD

__all__ = ["FedAvg", "LargeBatchSGD", "Federation", "evaluate_module", "weighted_average"]
