"""Split learning against federated learning and large-batch SGD, measured.

* :mod:`splitnn.compare.analytic`: the analytic model of bytes per client.
* :mod:`splitnn.compare.runner`: runs every method for a list of client counts and measures
  bytes (the ledger), FLOPs and time per client (:mod:`splitnn.accounting.flops`) and accuracy.
* :mod:`splitnn.compare.report`: the table, CSV/JSON and PNG plots.
"""

from splitnn.compare.analytic import CommModel, client_bytes, crossover, iid_shard_sizes, mean_bytes_per_client
from splitnn.compare.runner import METHODS, MODELS, CompareConfig, RunResult, build_model, run_comparison, run_method

__all__ = [
    "CommModel",
    "client_bytes",
    "crossover",
    "iid_shard_sizes",
    "mean_bytes_per_client",
    "METHODS",
    "MODELS",
    "CompareConfig",
    "RunResult",
    "build_model",
    "run_comparison",
    "run_method",
]
