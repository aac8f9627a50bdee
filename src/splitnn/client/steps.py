"""The researcher's side of the training step: pipelined forward, loss, backward (merged too) and shipped epochs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from splitnn.accounting import RESEARCHER
from splitnn.client.calls import encode_args as _args
from splitnn.client.calls import serialized as _serialized
from splitnn.common import serde
from splitnn.common.messages import (
    error_from_reply,
    reply_result,
)
from splitnn.common.operations import OPERATIONS
from splitnn.errors import WorkerError
from splitnn.workers.checks import (
    check_sources,
    no_training_forward,
)
from splitnn.workers.epoch import EpochHandle, EpochPlan
from splitnn.workers.merge import check_merge
from splitnn.workers.refs import BatchRef, LossStats, TensorRef
from splitnn.workers.values import Value, check_values


class Steps:
    """The training step at a worker, pipelined (a component of :class:`~splitnn.client.RemoteWorker`)."""

    @_serialized
    def put(self, tensor: Value, *, src: str, kind: str) -> TensorRef:
        if not isinstance(tensor, torch.Tensor):  # several values: a model that takes a tuple
            tensor = check_values(tensor, f"the {kind} put at {self.name!r}")
        if src != RESEARCHER or kind != "features":
            raise WorkerError(f"remote worker {self.name!r} only accepts features put by the researcher")
        ref = self._new_ref()
        self._send("put", *_args("put", id=ref.id, kind=kind, values=tensor), flush=False)
        self._feature_ids.add(ref.id)
        return ref

    @_serialized
    def forward(self, key: str, source: TensorRef | BatchRef, *, train: bool = True) -> TensorRef:
        ref = self._new_ref()
        args, blobs = _args("forward", key=key, src=source, train=train, id=ref.id)
        if isinstance(source, BatchRef):
            is_data = True
        else:
            is_data = source.owner == self.name and source.id in self._feature_ids
            self._feature_ids.discard(source.id) if source.owner == self.name else None
        if train:
            self._input_is_data[key] = is_data
        self._send("forward", args, blobs, flush=False)
        return ref

    @_serialized
    def loss_deferred(
        self, output: TensorRef, target: BatchRef, loss: str, *, train: bool = True, keep: str | None = None
    ) -> Callable[[], LossStats]:
        """:meth:`loss`, sent without waiting: call the function returned for the stats (it waits for them).

        The worker runs the loss in its command order, so the ``backward`` that uses it may be sent
        before the stats are back; a caller serving several data holders then lets the next one's
        commands queue at the worker instead of waiting a round trip per batch (SplitFed does).
        Unlike :meth:`loss`, it does not wait for the other workers' commands.
        """
        args, blobs = _args("loss", output=output, target=target, loss=loss, train=train, keep=keep)
        for peer in self._remote_peers():
            peer._stream.flush()  # the output may come from a peer's command still queued here
        pending = self._stream.send("loss", args, blobs)

        def stats() -> LossStats:
            reply = self._stream.wait(pending)
            if not reply.ok:
                raise error_from_reply(reply, self.name, self.address)
            return OPERATIONS["loss"].decode_result(reply_result(reply), list(reply.blobs), limits=self.limits)

        return stats

    @_serialized
    def backward(self, key: str, grad: TensorRef | None) -> TensorRef | None:
        if key not in self._input_is_data:
            raise no_training_forward(self.name, key)
        ref = None if self._input_is_data.pop(key) else self._new_ref()
        self._send(
            "backward", *_args("backward", key=key, grad=grad, id=ref.id if ref is not None else None), flush=False
        )
        return ref

    @_serialized
    def fetch(self, ref: TensorRef, *, kind: str = "output") -> Value:
        return self._call("fetch", ref=ref, kind=kind)

    @_serialized
    def release(self) -> None:
        self._input_is_data.clear()
        self._merged.clear()
        self._feature_ids.clear()
        self._send("release", {})

    @_serialized
    def forward_merged(self, key: str, sources: Sequence[TensorRef], merge: str, *, train: bool = True) -> TensorRef:
        """Run segment ``key`` on the merge of several parties' activations (:class:`~splitnn.workers.MergingWorker`).

        The worker pulls every source from its owner over their peer stream (recorded on each link).
        """
        check_merge(merge)
        sources = check_sources(list(sources), key, self.name)
        ref = self._new_ref()
        for src in sources:
            if src.owner == self.name:
                self._feature_ids.discard(src.id)
        if train:
            self._merged[key] = len(sources)
            self._input_is_data.pop(key, None)
        args = _args("forward_merged", key=key, srcs=sources, merge=merge, train=train, id=ref.id)
        self._send("forward_merged", *args, flush=False)
        return ref

    @_serialized
    def backward_merged(self, key: str, grad: TensorRef | None) -> list[TensorRef]:
        """Back-propagate through segment ``key`` and its merge; one gradient ref per source, in order."""
        count = self._merged.pop(key, None)
        if count is None:
            raise no_training_forward(self.name, key, merged=True)
        refs = [self._new_ref() for _ in range(count)]
        self._send(
            "backward_merged", *_args("backward_merged", key=key, grad=grad, ids=[r.id for r in refs]), flush=False
        )
        return refs

    # -- shipped epochs (EpochWorker) -----------------------------------------------------------
    @_serialized
    def run_epoch(self, plan: EpochPlan, *, notify=None) -> EpochHandle:
        """Ship this worker's part of a training epoch; return a handle that fills as it runs.

        The worker trains every batch with its peers (see :mod:`splitnn.workers.epoch`); the
        label holder's handle receives per-batch losses; each handle gets the worker's final
        report after its ledger records are merged into :attr:`ledger`, or the error (a lost
        connection fails it at once).
        """
        handle = EpochHandle(self.name, notify)
        self._send("run_epoch", *serde.epoch_plan_to_command(plan), handle=handle)
        return handle
