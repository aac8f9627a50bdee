"""Batches in flight: what a segment keeps per batch under a pipelined schedule.

:class:`Flight` is one batch between its forward and its step (its input and output, the weights
its forward used, its gradients); :class:`Drift` is the optional weight prediction. Their docstrings
say how weight stashing and prediction work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from splitnn.errors import ConfigurationError
from splitnn.workers.values import Value

#: The moving-average factor ``weight_prediction=True`` stands for.
DEFAULT_PREDICTION = 0.5


@dataclass
class Flight:
    """One batch between its forward and its step on one segment.

    Lock-step training has one batch per segment at a time, so a segment's last forward and
    its parameters' ``.grad`` are all the state there is. A pipelined schedule
    (:class:`~splitnn.workers.schedules.Pipelined`) has several batches between their forward
    and backward, and steps in between, so each batch keeps its own :class:`Flight`:

    * the input and output of its forward (the input detached at the cut, as in the eager path);
    * the weights its forward used. Where the schedule marks the forward ``stash`` (a step of the
      segment comes before this batch's backward), the forward runs, through
      ``torch.func.functional_call``, on a copy of the parameters taken at that moment, so the
      backward differentiates exactly the function the forward computed (PipeDream's weight
      stashing) while the optimizer updates the live parameters in place. Otherwise it runs on the
      live parameters, which the schedule guarantees do not change before its backward;
    * its parameter gradients, from its backward until its step: the step of batch ``t`` loads
      them into ``.grad`` and runs the optimizer, so updates apply in batch order, each with the
      gradient of its own batch.
    """

    inp: Value | None  # the input leaf (None: the worker's own data, no gradient goes back)
    out: Value | None  # the forward's output, until the backward
    leaves: Sequence[torch.Tensor]  # the weights the forward used: stashed copies or the live parameters
    stashed: bool
    steps: int  # the segment's pipelined steps at the forward (a flight on live weights checks it)
    loss: torch.Tensor | None = None
    grads: list[torch.Tensor | None] | None = None  # after the backward, until the step


def detached_input(x: Value) -> Value:
    """A received value as the leaf its segment differentiates: a tensor always needs a gradient; of several
    values, those that needed one at the sender (see :mod:`splitnn.workers.values`)."""
    if type(x) is tuple:
        return tuple(t.detach().requires_grad_(t.requires_grad) for t in x)
    return x.detach().requires_grad_()


def flight_forward(
    module: nn.Module,
    params: Sequence[torch.Tensor],
    x: Value,
    stash: bool,
    predicted: Sequence[torch.Tensor] | None = None,
) -> tuple[object, Sequence[torch.Tensor]]:
    """Run ``module`` on ``x``; with ``stash``, on copies of ``params`` or on the ``predicted`` weights
    (returned as the leaves to differentiate)."""
    args = x if type(x) is tuple else (x,)
    if not stash:
        return module(*args), params
    leaves = predicted if predicted is not None else [p.detach().clone().requires_grad_() for p in params]
    names = [n for n, p in module.named_parameters() if p.requires_grad]  # the order of ``params``
    return torch.func.functional_call(module, dict(zip(names, leaves)), args), leaves


def check_prediction(beta: object) -> None:
    """Refuse a weight-prediction factor that is not None or a number in [0, 1)."""
    if beta is None:
        return
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
        raise ConfigurationError(
            f"weight prediction's moving-average factor must be a number in [0, 1) (or None: off), got {beta!r}"
        )


def as_prediction(value: object) -> float | None:
    """A model's ``weight_prediction`` argument as a moving-average factor: True -> :data:`DEFAULT_PREDICTION`,
    False or None -> None (off), a number in [0, 1) -> itself."""
    if value is None or value is False:
        return None
    if value is True:
        return DEFAULT_PREDICTION
    check_prediction(value)
    return float(value)


class Drift:
    """The moving average ``D`` of one segment's updates in a pipelined run.

    Weight prediction (optional, :class:`Drift`). A stashed forward's gradient is applied
    ``tau`` steps after the forward (``tau``: the batches of the segment in flight before it,
    up to K - 1 at the data holder). With prediction, the forward runs instead on the weights
    extrapolated to that step, ``W + tau x D``, where ``D`` is an exponential moving average of
    the segment's recent updates (``D <- beta x D + (1 - beta) x (W_after - W_before)``); the
    backward differentiates the same predicted weights and the update lands on the live ones.
    Like SpecTrain's and PipeMare's discrepancy correction, it evaluates each gradient closer to
    the weights it updates, which cuts the accuracy cost of deep pipelines. It uses the updates
    themselves, not an optimizer's state, so it works with any optimizer; ``D`` starts empty at
    every pipelined run (the first forwards of a run are not extrapolated), so a run resumed
    from a checkpoint predicts what an uninterrupted one does.
    """

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.avg: list[torch.Tensor] | None = None  # None until the run's first step

    def predicted(self, params: Sequence[torch.Tensor], tau: int) -> list[torch.Tensor] | None:
        """``W + tau x D`` (leaves to differentiate), or None when there is nothing to extrapolate."""
        if self.avg is None or tau == 0:
            return None
        return [(p.detach() + tau * d).requires_grad_() for p, d in zip(params, self.avg)]

    def before_step(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [p.detach().clone() for p in params]

    def after_step(self, params: Sequence[torch.Tensor], before: Sequence[torch.Tensor]) -> None:
        deltas = [p.detach() - b for p, b in zip(params, before)]
        if self.avg is None:
            self.avg = deltas
        else:  # written as the tests' twins write it: beta x D + (1 - beta) x delta
            self.avg = [self.beta * d + (1 - self.beta) * n for d, n in zip(self.avg, deltas)]


def take_grads(leaves: Sequence[torch.Tensor], *, clear: bool) -> list[torch.Tensor | None]:
    """The gradients accumulated in ``leaves``; with ``clear``, reset them (live parameters serve the next batch)."""
    grads = [leaf.grad for leaf in leaves]
    if clear:
        for leaf in leaves:
            leaf.grad = None
    return grads
