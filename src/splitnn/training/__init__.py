"""Training loops, topologies and baselines built on the split layer."""

from splitnn.data.batching import epoch_batches
from splitnn.training.loop import EpochStats, EvalResult, History, evaluate, fit

__all__ = ["epoch_batches", "fit", "evaluate", "History", "EpochStats", "EvalResult"]
