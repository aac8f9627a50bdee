"""One party's part of a schedule, run on its engine (a :class:`~splitnn.workers.VirtualWorker`).

:class:`PartyRun` turns the actions of :mod:`splitnn.workers.schedules` into engine calls; whoever runs
it moves the tensors, so a networked and an in-process run execute the same calls in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from splitnn.errors import WorkerError
from splitnn.wire.cut_codec import Arrived, Encoded
from splitnn.workers.losses import Loss
from splitnn.workers.refs import BatchRef, LossStats, TensorRef
from splitnn.workers.schedules import KIND_OF, Action, Op
from splitnn.workers.values import Value
from splitnn.workers.virtual import VirtualWorker


class PartyRun:
    """One party's state while it runs its actions of a schedule.

    :class:`PartyRun` turns the actions of :mod:`splitnn.workers.schedules` into engine calls.
    It does not move tensors: whoever runs it -- a networked worker's shipped epoch
    (:mod:`splitnn.server.shipped`), or the in-process driver running every party in one
    process (:mod:`splitnn.split.driver`) -- carries what :meth:`PartyRun.outgoing` hands
    it to the peer named by the action, and gives the peer's tensor to
    :meth:`PartyRun.incoming`, which records the transfer on the receiver's side (as every
    receive does). So a networked run and an in-process run execute the same calls in the
    same order and end ``torch.equal``.

    Lock-step schedules use the engine's plain operations (``zero_grad``, ``forward``,
    ``loss``, ``backward``, ``step``), exactly the eager path; pipelined ones its in-flight
    operations (:mod:`splitnn.workers.inflight`), which keep each batch's weights and
    gradients apart.

    Compression at a cut needs nothing here: both kinds of operation encode what a segment
    produces for another party with that segment's codec (``VirtualWorker.set_codecs``: the
    codec and its error feedback live with the sending segment, so the schedule carries none),
    in the order the segment produces it -- batch order, per cut and direction, under any
    schedule. A send hands the encoded bytes on; an in-process receive decodes them, a
    networked one gets them decoded off the wire.

    Args:
        engine: the party's in-process engine.
        keys: the segment key of each stage this party runs, by stage index.
        last: the index of the chain's last stage (its output meets the labels).
        dataset: the placed dataset (features at stage 0's party, labels at the last stage's).
        loss: the loss (name, or callable in-process).
        batches: the index tensors of the epoch's batches, by batch number.
        stashing: the schedule keeps batches apart (pipelined) rather than lock-step.
        prediction: a pipelined run's weight prediction, the moving-average factor of each of this party's
            segments (:mod:`splitnn.workers.inflight`; None: off). Each run starts its averages afresh.
        split_backward: lock-step, a backward whose input gradient goes to another party computes that gradient
            first and its weights' gradients at the step (``VirtualWorker.backward``, ``weights_later``): the
            same gradients, the sender's wait shorter. A networked worker's choice; in one process it gains nothing.
    """

    def __init__(
        self,
        engine: VirtualWorker,
        keys: dict[int, str],
        last: int,
        dataset: str,
        loss: Loss,
        batches: Sequence[torch.Tensor],
        *,
        stashing: bool,
        prediction: float | None = None,
        split_backward: bool = False,
    ) -> None:
        self.engine, self.keys, self.last = engine, keys, last
        self.dataset, self.loss, self.batches = dataset, loss, batches
        self.stashing = stashing
        self.split_backward = split_backward and not stashing
        if stashing:
            for key in keys.values():
                engine.start_pipelined_run(key, prediction=prediction)
        self._out: dict[tuple[int, int], TensorRef] = {}  # (stage, batch) -> the stage's output, here
        self._grad: dict[tuple[int, int], TensorRef] = {}  # (stage, batch) -> gradient of the stage's output

    def _batch(self, t: int) -> BatchRef:
        return BatchRef(self.dataset, self.batches[t])

    def compute(self, a: Action) -> LossStats | None:
        """Run a computing action (zero, forward, loss, backward, step); the loss action returns its stats."""
        e, key, s, t, op = self.engine, self.keys[a.stage], a.stage, a.batch, a.op
        if op is Op.FORWARD:
            source = self._batch(t) if s == 0 else self._out.pop((s - 1, t))
            if self.stashing:
                self._out[(s, t)] = e.forward_in_flight(key, source, t, stash=a.stash)
            else:
                self._out[(s, t)] = e.forward(key, source, train=True)
        elif op is Op.BACKWARD:
            grad = None if s == self.last else self._grad.pop((s, t))
            if self.stashing:
                back = e.backward_in_flight(key, t, grad)
            elif self.split_backward and s > 0:
                back = e.backward(key, grad, weights_later=True)
            else:
                back = e.backward(key, grad)
            if s > 0 and back is not None:
                self._grad[(s - 1, t)] = back
        elif op is Op.LOSS:
            out = self._out.pop((s, t))
            if self.stashing:
                return e.loss_in_flight(key, t, out, self._batch(t), self.loss)
            return e.loss(out, self._batch(t), self.loss, train=True)
        elif op is Op.STEP:
            if self.stashing:
                e.step_in_flight(key, t)
            else:
                e.step(key)
        elif op is Op.ZERO:
            e.zero_grad(key)
        else:
            raise WorkerError(f"worker {e.name!r}: {a!r} is not a computation")
        return None

    def outgoing(self, a: Action) -> Value | Encoded:
        """What a send action hands to its peer (taken out of the engine's store): the value, or the
        :class:`~splitnn.wire.cut_codec.Encoded` bytes where the sending segment compresses that cut."""
        ref = self._out.pop((a.stage, a.batch)) if a.op is Op.SEND_F else self._grad.pop((a.stage - 1, a.batch))
        return self.engine.take(ref.id)

    def incoming(self, a: Action, tensor: Value | Encoded | Arrived) -> None:
        """Accept what a receive action got from its peer (the engine records the transfer): a value, the
        sender's :class:`~splitnn.wire.cut_codec.Encoded` bytes (in process: decoded here, as a networked
        receiver decodes the same bytes), or what came off the wire (:class:`~splitnn.wire.cut_codec.Arrived`)."""
        if type(tensor) is Encoded:
            tensor = tensor.arrived()
        ref = self.engine.put(tensor, src=a.peer, kind=KIND_OF[a.op])
        if a.op is Op.RECV_F:
            self._out[(a.stage - 1, a.batch)] = ref
        else:
            self._grad[(a.stage, a.batch)] = ref
