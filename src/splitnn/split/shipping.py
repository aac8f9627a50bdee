"""Shipped epochs, the researcher's side: one plan per worker per epoch, then watch.

:func:`ship_epoch` builds each worker's :class:`~splitnn.workers.epoch.EpochPlan`
from the chain of stages (its segments, with the previous and next party of each),
starts them all, hands the label holder's per-batch losses to ``on_batch`` as they
arrive, and returns once every worker has reported (their ledger records are merged
by then, so the bytes of the epoch are exact). The researcher sends no tensor.

Faults: a worker that dies fails its handle at once (its stream breaks) and its
neighbours' parts fail with "lost the connection to peer ..."; a hung worker is
caught by the workers' peer timeout or, at the latest, by this side's ``timeout``
without news. Either way :class:`~splitnn.errors.WorkerError` names the worker.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Sequence

import torch

from splitnn.errors import WorkerError, WorkerUnreachableError
from splitnn.split.stage import Stage
from splitnn.workers.base import EpochWorker
from splitnn.workers.epoch import RUN_ID_BITS, BatchOrder, EpochHandle, EpochPlan, StagePlan
from splitnn.workers.refs import LossStats

#: Seconds to let the other workers' errors arrive after the first one (to report the root cause).
SETTLE_SECONDS = 1.0


def can_ship(stages: Sequence[Stage]) -> bool:
    """Whether every worker of the chain can run shipped epochs."""
    return all(isinstance(s.worker, EpochWorker) for s in stages)


def plans_for(
    stages: Sequence[Stage],
    run_id: int,
    dataset: str,
    loss: str,
    *,
    order: BatchOrder | None,
    indices: Sequence[torch.Tensor] | None,
    progress_interval: float = 0.05,
    pipeline: int = 1,
    prediction: float | None = None,
) -> dict[str, EpochPlan]:
    """Each worker's part of the epoch, by worker name (stages in chain order); every plan names the
    whole chain, from which each worker builds the epoch's schedule (``pipeline`` batches in flight)."""
    names = [s.worker.name for s in stages]
    parts: dict[str, list[StagePlan]] = {}
    for i, stage in enumerate(stages):
        prev = names[i - 1] if i > 0 else None
        nxt = names[i + 1] if i + 1 < len(stages) else None
        parts.setdefault(names[i], []).append(StagePlan(i, stage.key, prev, nxt))
    return {
        name: EpochPlan(
            run_id,
            dataset,
            loss,
            tuple(sp),
            order=order,
            indices=tuple(indices) if order is None else None,
            progress_interval=progress_interval,
            chain=tuple(names),
            pipeline=pipeline,
            prediction=prediction if pipeline > 1 else None,
        )
        for name, sp in parts.items()
    }


def ship_epoch(
    stages: Sequence[Stage],
    dataset: str,
    loss: str,
    batches: Sequence[torch.Tensor],
    on_batch: Callable[[LossStats], None],
    *,
    order: BatchOrder | None = None,
    timeout: float | None = None,
    pipeline: int = 1,
    prediction: float | None = None,
) -> int:
    """Run one training epoch as shipped plans; call ``on_batch`` per batch, in order. Returns the batch count.

    ``order`` (when the batches are :func:`~splitnn.training.epoch_batches`' for it) is
    sent instead of the indices; otherwise ``batches`` travel explicitly. ``pipeline``:
    batches in flight (:class:`~splitnn.workers.schedules.Pipelined`; 1 is lock-step);
    ``prediction``: a pipelined epoch's weight prediction (:mod:`splitnn.workers.inflight`).
    """
    if order is not None and -(-order.n // order.batch_size) != len(batches):
        raise WorkerError(
            f"the batch order gives {-(-order.n // order.batch_size)} batches but {len(batches)} were planned"
        )
    workers = {s.worker.name: s.worker for s in stages}
    if timeout is None:
        timeout = max(float(getattr(w, "timeout", 60.0)) for w in workers.values())
    plans = plans_for(
        stages,
        1 + secrets.randbelow((1 << RUN_ID_BITS) - 1),
        dataset,
        loss,
        order=order,
        indices=batches,
        pipeline=pipeline,
        prediction=prediction,
    )
    news = threading.Condition()
    fresh = [False]

    def notify() -> None:
        with news:
            fresh[0] = True
            news.notify_all()

    handles: dict[str, EpochHandle] = {}
    try:
        for name, plan in plans.items():
            handles[name] = workers[name].run_epoch(plan, notify=notify)
    except Exception:
        _settle(handles)
        raise
    label = handles[stages[-1].worker.name]
    delivered = 0
    while True:
        with news:
            if not fresh[0] and not news.wait_for(lambda: fresh[0], timeout):
                running = sorted(n for n, h in handles.items() if not h.done)
                raise WorkerUnreachableError(
                    f"shipped epoch: no news from the workers for {timeout:g} s; still running: "
                    f"{', '.join(map(repr, running))} (dead or hung?)"
                )
            fresh[0] = False
        for stats in label.take_losses():
            delivered += 1
            on_batch(stats)
        if any(h.error is not None for h in handles.values()):
            raise _root_error(_settle(handles))
        if all(h.done for h in handles.values()):
            break
    for stats in label.take_losses():
        delivered += 1
        on_batch(stats)
    if delivered != len(batches):
        raise WorkerError(
            f"shipped epoch: {stages[-1].worker.name!r} reported {delivered} losses for {len(batches)} batches"
        )
    return delivered


def _settle(handles: dict[str, EpochHandle]) -> dict[str, EpochHandle]:
    """Give the other parts a moment to finish or fail (bounded), so the root cause can be told."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline and not all(h.done for h in handles.values()):
        time.sleep(0.01)
    return handles


def _root_error(handles: dict[str, EpochHandle]) -> BaseException:
    """The most telling error: a lost worker, then a worker's own failure, then one that only
    reports an aborting or lost peer (a consequence)."""
    errors = [h.error for h in handles.values() if h.error is not None]

    def rank(exc: BaseException) -> int:
        text = str(exc)
        if "connection lost" in text or "closed the session" in text:
            return 0
        if "aborted the epoch" in text or "lost the connection to peer" in text:
            return 2
        return 1

    return min(errors, key=rank)
