"""Pipelined schedules: several batches in flight per segment, each with its own graph and gradients.

The arithmetic (stashed weights, weight prediction) is in :mod:`splitnn.workers.inflight`. State: each hosted
segment's ``flights`` (batch -> :class:`~splitnn.workers.inflight.Flight`), ``steps`` and ``drift``.
"""

from __future__ import annotations

from splitnn.errors import WorkerError
from splitnn.workers.engine.hosted import segment_output
from splitnn.workers.engine.steps import backward_values
from splitnn.workers.inflight import Drift, Flight, check_prediction, detached_input, flight_forward, take_grads
from splitnn.workers.losses import Loss, compute_loss
from splitnn.workers.refs import BatchRef, LossStats, TensorRef


class Pipelining:
    """Forward, loss, backward and step of one batch among several in flight on a segment."""

    def start_pipelined_run(self, key: str, *, prediction: float | None = None) -> None:
        """Begin a pipelined run on segment ``key``: weight prediction with moving-average factor
        ``prediction`` (see :mod:`splitnn.workers.inflight`; None: off), its average empty."""
        check_prediction(prediction)
        self._segment(key).drift = Drift(prediction) if prediction is not None else None

    def forward_in_flight(self, key: str, source: TensorRef | BatchRef, batch: int, *, stash: bool) -> TensorRef:
        """Training forward of batch ``batch`` on segment ``key``, kept apart from other batches in flight;
        with ``stash``, on a copy of the current weights (a step comes before this batch's backward)."""
        hosted = self._start_forward(key, True)
        if batch in hosted.flights:
            raise WorkerError(f"worker {self.name!r}: batch {batch} is already in flight on segment {key!r}")
        if isinstance(source, BatchRef):
            x, inp = self._features(key, source), None
        else:
            x = inp = detached_input(self._receive(source, "activation", False)[0])
        predicted = hosted.drift.predicted(hosted.params, len(hosted.flights)) if stash and hosted.drift else None
        out, leaves = flight_forward(hosted.module, hosted.params, x, stash, predicted)
        out = segment_output(out, key, self.name)
        hosted.flights[batch] = Flight(inp, out, leaves, stash, hosted.steps)
        return self._keep(out, "activation", hosted.send_out)  # encoded now: error feedback in batch order

    def loss_in_flight(self, key: str, batch: int, output: TensorRef, target: BatchRef, loss: Loss) -> LossStats:
        """The training loss of batch ``batch``'s output of (last) segment ``key``, kept for its backward."""
        flight = self._flight(key, batch)
        self._receive(output, "activation", False)  # consumes the ref; the graph is the flight's own output
        if type(flight.out) is tuple:
            raise WorkerError(f"worker {self.name!r}: the loss needs one output tensor, got {len(flight.out)} values")
        labels = self._labels(target)
        flight.loss = compute_loss(loss, flight.out, labels)
        return LossStats(float(flight.loss.item()), -1, len(labels))

    def backward_in_flight(self, key: str, batch: int, grad: TensorRef | None) -> TensorRef | None:
        """Back-propagate batch ``batch`` through segment ``key`` (from its loss when ``grad`` is None), with
        the weights its forward used; its parameter gradients wait for :meth:`step_in_flight`. Returns a ref
        to the gradient of the segment's input (None for data)."""
        hosted = self._segment(key)
        flight = self._flight(key, batch)
        if flight.out is None:
            raise WorkerError(f"worker {self.name!r}: batch {batch} of segment {key!r} went backward already")
        if not flight.stashed:
            if flight.steps != hosted.steps:  # the schedule promised no step in between: a bug if it happens
                raise WorkerError(
                    f"worker {self.name!r}: segment {key!r} stepped while batch {batch} was in flight without "
                    "stashed weights (the schedule must stash this forward)"
                )
            for p in hosted.params:  # the live parameters' gradients belong to this batch alone
                p.grad = None
        if grad is None:
            if flight.loss is None:
                raise WorkerError(f"worker {self.name!r}: backward of batch {batch} on {key!r} without its loss")
            flight.loss.backward()
            flight.loss = None
        else:
            g, _ = self._receive(grad, "gradient", False)
            if type(g) is tuple or type(flight.out) is tuple:
                backward_values(flight.out, g, self.name)
            else:
                flight.out.backward(g)
        flight.grads = take_grads(flight.leaves, clear=not flight.stashed)
        inp, flight.inp, flight.out = flight.inp, None, None
        if inp is None:
            return None
        if type(inp) is tuple:
            return self._keep(tuple(t.grad if t.requires_grad else None for t in inp), "gradient", hosted.send_grad)
        if inp.grad is None:
            raise WorkerError(f"worker {self.name!r}: segment {key!r} got no gradient at its input in batch {batch}")
        return self._keep(inp.grad, "gradient", hosted.send_grad)

    def step_in_flight(self, key: str, batch: int) -> None:
        """Step segment ``key``'s optimizer with batch ``batch``'s gradients (and forget the batch)."""
        hosted = self._trainable(key)
        flight = self._flight(key, batch)
        if flight.grads is None:
            raise WorkerError(f"worker {self.name!r}: step of batch {batch} on {key!r} before its backward")
        del hosted.flights[batch]
        if hosted.optimizer is not None:
            before = hosted.drift.before_step(hosted.params) if hosted.drift else None
            for p, g in zip(hosted.params, flight.grads):
                p.grad = g
            hosted.optimizer.step()
            for p in hosted.params:
                p.grad = None
            if before is not None:
                hosted.drift.after_step(hosted.params, before)
        hosted.steps += 1

    def _flight(self, key: str, batch: int) -> Flight:
        flight = self._segment(key).flights.get(batch)
        if flight is None:
            raise WorkerError(f"worker {self.name!r}: batch {batch} is not in flight on segment {key!r}")
        return flight
