"""VirtualWorker: an in-process party, for experiments and tests, and the engine of a networked party.

The class is small: it composes the capabilities of :mod:`splitnn.workers.engine` (segments, datasets, codecs,
the tensor store, steps, pipelining, state transfer, checkpoints, PSI, scoring and the policy's gate) and holds
what they share: the party's name, device, ledger and fusing.
"""

from __future__ import annotations

import os

import torch

from splitnn.accounting import RESEARCHER, Ledger
from splitnn.errors import ConfigurationError
from splitnn.workers.audit import AuditLog
from splitnn.workers.devices import RESEARCHER_DEVICE, resolve_device, to_device
from splitnn.workers.engine.admission import Admission
from splitnn.workers.engine.checkpoints import Checkpoints
from splitnn.workers.engine.codecs import Codecs
from splitnn.workers.engine.datasets import DataHolder
from splitnn.workers.engine.gate import Gate
from splitnn.workers.engine.intersection import Intersection
from splitnn.workers.engine.merged import Merged
from splitnn.workers.engine.pipelined import Pipelining
from splitnn.workers.engine.scoring import Scoring
from splitnn.workers.engine.segments import SegmentHost
from splitnn.workers.engine.states import StateTransfer
from splitnn.workers.engine.steps import Steps
from splitnn.workers.engine.store import TensorStore
from splitnn.workers.policy import WorkerPolicy
from splitnn.workers.precision import check_autocast
from splitnn.workers.values import Value

__all__ = ["VirtualWorker", "WorkerPolicy"]


class VirtualWorker(
    SegmentHost,
    Codecs,
    DataHolder,
    TensorStore,
    Steps,
    Merged,
    Scoring,
    Pipelining,
    StateTransfer,
    Checkpoints,
    Intersection,
    Admission,
    Gate,
):
    """An in-process party, for experiments and tests.

    Tensors are not copied between in-process workers; the ledger records the bytes a real
    transfer would move. With ``fuse=True`` (the default) the activation at a cut between two
    in-process workers stays attached to the autograd graph, so one ``backward`` from the loss
    runs through every segment, with weights bit-identical to the cut-by-cut path
    (``fuse=False``, what networked workers do).

    A networked party (:mod:`splitnn.server`) runs one of these per researcher session, with
    ``fuse=False``, through the Worker protocol and a few more public methods (:meth:`segment`,
    :meth:`dataset`, :meth:`keep`, :meth:`take`, :meth:`clear`, ...).

    Args:
        name: the party's name, as it appears in the ledger.
        ledger: where transfers are recorded; a model rebinds its workers to
            its own ledger unless they already share one.
        fuse: keep autograd graphs attached across cuts between in-process
            workers (same numbers, fewer autograd calls).
        policy: what this worker runs on its data and hands out
            (:class:`~splitnn.workers.policy.WorkerPolicy`; default: no restriction but the
            model's adjacency for peers' pulls). It is enforced here, before any batch.
        state_dir: where this party keeps its checkpoints (:meth:`save_checkpoint`); ``fit(...,
            checkpoint_dir=DIR)`` gives an in-process worker without one ``DIR/parties/<name>``.
        audit: an :class:`~splitnn.workers.audit.AuditLog` recording the segments installed, the
            datasets read, policy refusals and checkpoints (default: none).
        device: where the worker's segments, optimizer state and data live and its
            computation runs (``"cpu"``, ``"cuda:0"``, ...); checked here, see
            :func:`splitnn.workers.devices.resolve_device`. A value from a peer on another device is
            moved here when received; what the researcher gets comes back on the CPU.
        autocast: ``"bf16"`` (or ``"fp16"``) runs the forward of every segment this party hosts under
            ``torch.autocast`` on its device (weights and optimizer state stay float32; see
            :mod:`splitnn.workers.precision`); ``None`` (default): full precision.
    """

    #: It runs in the researcher's process, so it can run a loss given as a callable and hand out outputs
    #: with their autograd graph (the low-level loop of SplitNN.forward).
    runs_callables = True

    def __init__(
        self,
        name: str,
        *,
        ledger: Ledger | None = None,
        fuse: bool = True,
        policy: WorkerPolicy | None = None,
        device: str | torch.device = "cpu",
        state_dir: str | os.PathLike | None = None,
        audit: AuditLog | None = None,
        autocast: str | None = None,
    ) -> None:
        if not isinstance(name, str) or not name or name == RESEARCHER:
            raise ConfigurationError(f"worker name must be a non-empty string other than {RESEARCHER!r}, got {name!r}")
        self.name = name
        self.device = resolve_device(device, name)
        self.ledger = ledger if ledger is not None else Ledger()
        self.fuse = fuse
        self.autocast = check_autocast(autocast, name)
        self._init_gate(policy, audit)
        self._init_admission()
        self._init_segments()
        self._init_datasets()
        self._init_store()
        self._init_scoring()
        self._init_checkpoints(state_dir)
        self._init_intersection()

    def __repr__(self) -> str:
        on = "" if self.device == RESEARCHER_DEVICE else f", device={str(self.device)!r}"
        return f"VirtualWorker({self.name!r}, segments={list(self._segments)}, datasets={list(self._data)}{on})"

    def _move(self, value: Value, device: torch.device) -> Value:
        """``value`` on ``device``: the one place a value changes device (``Tensor.to``: differentiable, so a
        fused graph spans devices)."""
        return to_device(value, device)

    def release(self) -> None:
        """Drop every intermediate tensor: stored values, pending losses, kept outputs, batches in flight."""
        self._store.clear()
        self._forget_scores()
        for hosted in list(self._segments.values()):
            hosted.forget()

    def clear(self) -> None:
        """Forget everything: intermediate tensors, segments with their optimizers, datasets."""
        self.release()
        self._segments.clear()
        self._data.clear()
        self._derived.clear()
        self._forget_intersections()
