"""The Worker protocol: the one interface every layer above ``workers`` talks to.

A worker is a party that owns segments (``nn.Module`` pieces of a split
network), one optimizer per segment, and its own datasets. Operations name
segments by key and tensors by :class:`TensorRef`; a worker that receives a ref
owned by another party fetches it from that party and records the transfer in
the ledger. In-process (:class:`VirtualWorker`) and networked workers implement
the same protocol and must give the same numbers, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from splitnn.accounting import Ledger
from splitnn.workers.refs import BatchRef, DatasetStats, LossStats, TensorRef
from splitnn.workers.values import ProbeShape, Value

#: What may be given as a segment's optimizer: a factory ``params -> Optimizer``
#: (in-process workers only) or anything :meth:`OptimizerSpec.coerce` accepts.
OptimizerLike = Callable[..., torch.optim.Optimizer] | object


@runtime_checkable
class Worker(Protocol):
    """A party in split learning: it hosts segments and their optimizers, and holds its own datasets.

    Operations name segments by key and tensors by :class:`TensorRef`; a worker that receives a
    ref owned by another party fetches it from that party and records the transfer in the
    ledger. In-process workers (:class:`VirtualWorker`) and networked ones
    (:func:`splitnn.connect`) implement this protocol and give the same numbers, bit for bit.
    """

    name: str
    ledger: Ledger

    def connect_peers(self, peers: Mapping[str, Worker]) -> None:
        """Tell the worker how to reach the other parties of a model, by name."""

    def add_segment(
        self, key: str, segment: nn.Module, optimizer: OptimizerLike | None, *, replace: bool = False
    ) -> None:
        """Host ``segment`` under ``key`` with an optimizer built over its parameters.

        A key already in use is a :class:`~splitnn.errors.ConfigurationError` unless ``replace``.
        """

    def remove_segment(self, key: str) -> None:
        """Drop a hosted segment and its optimizer."""

    def add_dataset(
        self,
        name: str,
        *,
        features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        replace: bool = False,
        allow_nonfinite: bool = False,
    ) -> None:
        """Keep a dataset (features, labels or both) at this worker under ``name``.

        Features holding a NaN or an infinite value are refused (a DataError naming the row and the fix)
        unless ``allow_nonfinite``.

        In-process workers also take map-style datasets (read in batches at the worker) and,
        with ``ids=``, the samples' ids for private set intersection (:mod:`splitnn.training.alignment`).
        A name already in use is a :class:`~splitnn.errors.ConfigurationError` unless ``replace``.
        """

    def dataset_stats(self, name: str) -> DatasetStats:
        """Size and shape of a held dataset; never its contents."""

    def probe(self, key: str, input_shape: ProbeShape) -> ProbeShape:
        """Output shape of segment ``key`` for an input of ``input_shape`` (zeros, no training).

        Several values (a segment that takes or returns a tuple) are described by one
        :class:`~splitnn.workers.refs.ValueShape` each (see :mod:`splitnn.workers.values`).
        """

    def put(self, tensor: Value, *, src: str, kind: str) -> TensorRef:
        """Receive a tensor (or a tuple of them) from ``src`` (recorded as ``kind``) and return a ref to it."""

    def forward(self, key: str, source: TensorRef | BatchRef, *, train: bool = True) -> TensorRef:
        """Run segment ``key`` on ``source`` (a peer's activation or a local batch)."""

    def loss(
        self,
        output: TensorRef,
        target: BatchRef,
        loss: str,
        *,
        train: bool = True,
        keep: str | None = None,
        divide: int = 1,
    ) -> LossStats:
        """Compute the loss of ``output`` against local labels; keep it for :meth:`backward`.

        ``loss`` is a name of :data:`splitnn.workers.losses.LOSS_NAMES` (in-process workers also
        take a callable). In evaluation (``train=False``), ``keep`` names an evaluation whose
        outputs and labels the worker keeps for :meth:`MetricWorker.metrics`. ``divide``: the loss
        back-propagated (and reported) is the loss divided by this many batches (gradient accumulation).
        """

    def backward(self, key: str, grad: TensorRef | None) -> TensorRef | None:
        """Back-propagate through segment ``key``.

        ``grad`` is the gradient of the segment's output (a ref to the next
        party's tensor), or ``None`` to start from the loss kept by :meth:`loss`
        (or from a backward the caller already ran on the fetched output).
        Returns a ref to the gradient of the segment's input, or ``None`` when
        the input was local data.
        """

    def zero_grad(self, key: str) -> None:
        """Zero the gradients of segment ``key``'s optimizer."""

    def step(self, key: str) -> None:
        """Step segment ``key``'s optimizer."""

    def fetch(self, ref: TensorRef, *, kind: str = "output") -> Value:
        """Hand a stored tensor (or tuple of them) to the researcher, if this worker's policy allows it."""

    def get_state(self, key: str) -> dict[str, torch.Tensor]:
        """Weights of segment ``key`` (recorded as ``weights`` bytes to the caller)."""

    def set_state(self, key: str, state: Mapping[str, torch.Tensor], *, src: str) -> None:
        """Load weights into segment ``key`` (recorded as ``weights`` bytes from ``src``)."""

    def fetch_segment(self, key: str) -> nn.Module:
        """A copy of segment ``key`` with its trained weights, for the researcher."""

    def release(self) -> None:
        """Forget every stored intermediate tensor (activations, gradients, losses)."""


# -- optional capabilities (the topologies of splitnn.training.topologies) ----------------
# Kept out of :class:`Worker` so that a worker without them still is a Worker;
# a topology that needs one checks for it and names the missing methods.


@runtime_checkable
class PeerStateWorker(Protocol):
    """A worker that can hand a segment's weights directly to another party."""

    name: str

    def send_state(self, key: str, dst: str, *, dst_key: str | None = None) -> None:
        """Send the weights of segment ``key`` to peer ``dst``, which loads them into its segment
        ``dst_key`` (default ``key``); recorded as ``weights`` bytes on the link self -> ``dst``."""

    def may_release_weights(self, peer: str) -> None:
        """Raise the PolicyError that this party's gate would raise for its segments' weights leaving to
        ``peer`` (rules ``release_weights``, then ``peers``); moves nothing (a topology asks before training)."""


@runtime_checkable
class AveragingWorker(Protocol):
    """A worker that can average the weights of segments it hosts, locally (SplitFed's aggregation,
    :class:`~splitnn.training.topologies.SplitFedSplitNN`)."""

    name: str

    def average_states(self, keys: Sequence[str], weights: Sequence[float], *, into: Sequence[str]) -> None:
        """Load ``sum_k weights[k] / sum(weights) * state(keys[k])`` (floating-point tensors; integer
        buffers from ``keys[0]``, see :func:`splitnn.workers.averaging.weighted_average`) into every
        segment of ``into``. Nothing leaves the worker, so nothing is recorded in the ledger."""


@runtime_checkable
class MergingWorker(Protocol):
    """A worker whose segment can take several parties' activations, merged (vertical split learning)."""

    name: str

    def forward_merged(self, key: str, sources: Sequence[TensorRef], merge: str, *, train: bool = True) -> TensorRef:
        """Fetch every ``sources`` activation (each recorded on its owner's link), merge them with
        ``merge`` (see :mod:`splitnn.workers.merge`) and run segment ``key`` on the result."""

    def backward_merged(self, key: str, grad: TensorRef | None) -> list[TensorRef]:
        """Back-propagate through segment ``key`` (as :meth:`Worker.backward`) and through the merge;
        return one gradient ref per source of the last :meth:`forward_merged`, in order."""


@runtime_checkable
class MetricWorker(Protocol):
    """A label holder that computes evaluation metrics itself (:mod:`splitnn.workers.metrics`)."""

    name: str

    def metrics(self, keep: str, names: Sequence[str]) -> dict[str, float]:
        """Metrics ``names`` over every output and label kept by ``loss(..., train=False, keep=keep)``;
        the kept tensors are dropped, and only the values leave the worker."""


@runtime_checkable
class PsiWorker(Protocol):
    """A worker that can align its rows with other parties by private set intersection
    (:mod:`splitnn.training.alignment`). Messages are bytes held as refs: the receiving party pulls
    them from their owner and records them as ``psi`` bytes on that link."""

    name: str

    def psi_request(self, session: str, dataset: str) -> TensorRef:
        """Open ``session`` as the PSI client over ``dataset``'s candidate ids; a ref to the request."""

    def psi_reply(self, dataset: str, request: TensorRef) -> TensorRef:
        """Answer a client's request as the PSI server over ``dataset``'s candidate ids; a ref to the reply."""

    def psi_finish(self, session: str, reply: TensorRef) -> None:
        """Read the server's reply: the candidates of the session's dataset shrink to the common ids."""

    def psi_size(self, dataset: str) -> int:
        """How many candidate rows ``dataset`` has."""

    def psi_apply(self, dataset: str, parts: Mapping[str, torch.Tensor] | None = None) -> None:
        """Keep exactly the candidate rows, in ascending id order (and each named part of them)."""

    def psi_cancel(self, dataset: str) -> None:
        """Abandon the intersection of ``dataset``; the held rows stay as they were."""


@runtime_checkable
class GradientWorker(Protocol):
    """A worker that can hand the gradients of a segment's parameters to the researcher
    (large-batch synchronous SGD, :mod:`splitnn.training.baselines`)."""

    name: str

    def get_grads(self, key: str) -> dict[str, torch.Tensor]:
        """Gradients of segment ``key``'s trainable parameters by name (zeros where none was
        computed); recorded as ``gradient`` bytes from this worker to the researcher."""


@runtime_checkable
class CheckpointWorker(Protocol):
    """A worker that keeps checkpoints of the segments it hosts itself, locally
    (:mod:`splitnn.workers.checkpoint`): weights never travel for a checkpoint.

    Segments are named by their *label* in the model (``segments``: label -> key), since keys
    are random per run. ``job`` is the researcher's secret id of the training job."""

    name: str

    def checkpoint_steps(self, job: str) -> list[int]:
        """The steps of ``job`` this party holds checkpoints of, ascending."""

    def save_checkpoint(
        self, job: str, step: int, segments: Mapping[str, str], *, note: Mapping[str, object] | None = None
    ) -> dict:
        """Write this party's checkpoint of ``segments`` at ``step``; ``{"step", "digest", "bytes"}``."""

    def load_checkpoint(self, job: str, step: int, segments: Mapping[str, str], *, digest: str | None = None) -> dict:
        """Load this party's checkpoint of ``segments`` at ``step`` (refused, before anything changes,
        when it does not match them or -- given ``digest`` -- is not that file); ``{"step", "digest", "bytes"}``."""


@runtime_checkable
class ReconnectingWorker(Protocol):
    """A worker reached over a connection that can break and be made again (a networked party)."""

    name: str

    def reconnect(self) -> bool:
        """Make sure the connection is up again (reconnecting if it broke; raises
        :class:`~splitnn.errors.WorkerUnreachableError` while the party cannot be reached). True when the
        party still holds this researcher's session as it was; False when it started it afresh (it
        restarted, or the session expired) and everything the researcher had installed there -- segments,
        placed datasets, peers -- was installed again, with the segments' initial weights."""


@runtime_checkable
class CodecWorker(Protocol):
    """A worker that compresses what its segments send to other parties (``SplitNN(..., compression=...)``)."""

    name: str

    def set_codecs(self, key: str, *, output: str | None = None, input_grad: str | None = None) -> None:
        """Encode segment ``key``'s output activations with codec ``output`` and the gradient of its input with
        ``input_grad`` (names of :func:`splitnn.wire.compress.get_codec`; ``None``/``"none"``: plain) when they
        cross to another party. The encoder's state (error feedback) stays at this worker, the sender."""


@runtime_checkable
class EpochWorker(Protocol):
    """A worker that can run a whole training epoch with its peers (the fast path of
    :mod:`splitnn.workers.epoch`): one plan per epoch instead of one call per operation."""

    name: str

    def run_epoch(self, plan: EpochPlan, *, notify: Callable[[], None] | None = None) -> EpochHandle:
        """Start this worker's part of ``plan`` and return at once; ``notify`` is called (from any
        thread) whenever the returned handle has news: losses, the final report, or an error."""


from splitnn.workers.epoch import EpochHandle, EpochPlan  # noqa: E402  (names for the annotations above)
