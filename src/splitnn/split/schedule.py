"""The order in which one training or evaluation step runs across the stages.

This is the eager schedule: one worker call per operation, exactly the loop of
the tutorial (zero grads, forward along the chain, loss at the label holder,
backward along the chain in reverse, step). Workers pass activations and
gradients between themselves by ref; this code never touches a tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

from splitnn.split.stage import Stage
from splitnn.workers import BatchRef, LossStats, TensorRef
from splitnn.workers.losses import Loss


def forward_chain(stages: Sequence[Stage], source: TensorRef | BatchRef, *, train: bool) -> TensorRef:
    """Run every stage in order; return a ref to the last stage's output."""
    ref = source
    for stage in stages:
        ref = stage.worker.forward(stage.key, ref, train=train)
    return ref


def backward_chain(stages: Sequence[Stage]) -> None:
    """Back-propagate from the label holder's loss through every stage in reverse."""
    grad = None
    for stage in reversed(stages):
        grad = stage.worker.backward(stage.key, grad)


def train_step(stages: Sequence[Stage], batch: BatchRef, loss: Loss) -> LossStats:
    """One optimisation step on ``batch``: features at the first stage, labels at the last."""
    for stage in stages:
        stage.worker.zero_grad(stage.key)
    out = forward_chain(stages, batch, train=True)
    stats = stages[-1].worker.loss(out, batch, loss, train=True)
    backward_chain(stages)
    for stage in stages:
        stage.worker.step(stage.key)
    return stats


def eval_step(stages: Sequence[Stage], batch: BatchRef, loss: Loss, *, keep: str | None = None) -> LossStats:
    """Loss and correct predictions on ``batch``, without gradients; with ``keep``, the label holder
    keeps the outputs for the evaluation's metrics (see :mod:`splitnn.workers.metrics`)."""
    out = forward_chain(stages, batch, train=False)
    if keep is None:
        return stages[-1].worker.loss(out, batch, loss, train=False)
    return stages[-1].worker.loss(out, batch, loss, train=False, keep=keep)
