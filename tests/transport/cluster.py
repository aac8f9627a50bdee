"""The worker-process launcher moved to :mod:`splitnn.testing.cluster` (benchmarks share it); re-exported here."""

from splitnn.testing.cluster import STARTUP_TIMEOUT, Cluster, WorkerProcess, open_files_prefix

__all__ = ["STARTUP_TIMEOUT", "Cluster", "WorkerProcess", "open_files_prefix"]
