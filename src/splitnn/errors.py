"""Exception classes of splitnn.

Every error a user can cause derives from :class:`SplitNNError`, so a caller can
catch the library's errors in one place. Messages name the offending thing and
say how to fix it.
"""

from __future__ import annotations


class SplitNNError(Exception):
    """Base class of every error raised by splitnn."""


class ConfigurationError(SplitNNError, ValueError):
    """A model, topology or training configuration is invalid (raised before work starts)."""


class ShapeMismatchError(ConfigurationError):
    """Two segments do not fit together at a cut."""


class DataError(SplitNNError):
    """Base class of dataset errors."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A dataset could not be found locally and could not be downloaded."""


class CorruptDataError(DataError, ValueError):
    """A dataset file is malformed: bad magic number, wrong length, truncated."""


class ChecksumError(CorruptDataError):
    """A dataset file does not match its registered checksum."""


class DownloadError(DataError):
    """Downloading a dataset file failed."""


class LabelError(DataError, ValueError):
    """Labels are out of range for the model's output or the loss."""


class CheckpointError(ConfigurationError):
    """A checkpoint is missing, damaged, or does not match the run that would resume from it.
    The message names what differs (model, parties, data, steps)."""


class WorkerError(SplitNNError):
    """A worker failed, refused or could not be reached. The message names the worker."""


class WorkerUnreachableError(WorkerError, ConnectionError):
    """A worker could not be reached, or a connection to it (or between it and a peer) broke
    mid-operation: the fault may pass. ``fit(..., retries=N)`` reconnects and resumes."""


class PolicyError(WorkerError, PermissionError):
    """A worker refused to hand out something its policy protects (raw data, labels, activations)."""


class WireError(SplitNNError, ValueError):
    """A message or frame received from another party is malformed, oversized or not allowed."""


class SpecError(WireError):
    """A declarative model or optimizer spec is invalid or names an unknown layer type."""


class TrustError(SpecError):
    """A spec names a class from a module the receiving party does not trust (see ``splitnn worker --trust``)."""


class MemoryBudgetError(SpecError):
    """A received segment would allocate more than the worker's budget (``splitnn worker --max-session-memory``)."""
