"""Batches in flight: what a segment keeps per batch under a pipelined schedule.

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

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from splitnn.workers.values import Value


@dataclass
class Flight:
    """One batch between its forward and its step on one segment."""

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
    module: nn.Module, params: Sequence[torch.Tensor], x: Value, stash: bool
) -> tuple[object, Sequence[torch.Tensor]]:
    """Run ``module`` on ``x``; with ``stash``, on copies of ``params`` (returned as the leaves to differentiate)."""
    args = x if type(x) is tuple else (x,)
    if not stash:
        return module(*args), params
    leaves = [p.detach().clone().requires_grad_() for p in params]
    names = [n for n, p in module.named_parameters() if p.requires_grad]  # the order of ``params``
    return torch.func.functional_call(module, dict(zip(names, leaves)), args), leaves


def take_grads(leaves: Sequence[torch.Tensor], *, clear: bool) -> list[torch.Tensor | None]:
    """The gradients accumulated in ``leaves``; with ``clear``, reset them (live parameters serve the next batch)."""
    grads = [leaf.grad for leaf in leaves]
    if clear:
        for leaf in leaves:
            leaf.grad = None
    return grads
