"""The in-process driver: the researcher runs a schedule's actions across the stages' workers.

The step order lives in :mod:`splitnn.workers.schedules` (the same schedule objects a networked worker
runs in a shipped epoch). This module executes them in the researcher's process: :func:`train_step`
(the lock-step schedule of one batch, through the Worker protocol) and :func:`run_in_process` (any
schedule over in-process engines). Evaluation and the tutorial's low-level API use :func:`forward_chain`
and :func:`backward_chain`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence

import torch

from splitnn.errors import ConfigurationError, WorkerError
from splitnn.split.stage import Stage
from splitnn.workers import BatchRef, LossStats, TensorRef, VirtualWorker
from splitnn.workers.losses import Loss
from splitnn.workers.runner import PartyRun
from splitnn.workers.schedules import RECEIVES, SENDS, LockStep, Op, Schedule

#: Seconds a party thread waits for a tensor from another before it gives up (a guard against hangs).
THREAD_WAIT_SECONDS = 600.0


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


def recipe_step(
    stages: Sequence[Stage], batches: Sequence[BatchRef], loss: Loss, *, clip_grad_norm: float | None = None
) -> list[LossStats]:
    """One optimisation step over ``batches`` (gradient accumulation: each batch's loss divided by their
    number, the gradients summed), clipped by the global norm ``clip_grad_norm`` over every party's
    gradients (:func:`clip_global_norm`), then every stage steps (see :func:`check_recipe_workers`)."""
    check_recipe_workers(stages)
    n = len(batches)
    for stage in stages:
        stage.worker.zero_grad(stage.key)
    stats = []
    for batch in batches:
        out = forward_chain(stages, batch, train=True)
        stats.append(stages[-1].worker.loss(out, batch, loss, train=True, divide=n))
        backward_chain(stages)
    if clip_grad_norm is not None:
        clip_global_norm(stages, clip_grad_norm)
    for stage in stages:
        stage.worker.step(stage.key)
    if n == 1:
        return stats
    return [LossStats(s.loss * n, s.correct, s.count) for s in stats]


def check_recipe_workers(stages: Sequence[Stage]) -> None:
    """Refuse, before any work, global-norm clipping and gradient accumulation on workers that cannot share their
    gradients' norms (``grad_norms``, ``clip_grads``); the label holder divides each batch's loss by the number
    of accumulated batches itself (``loss(..., divide=)``), in process and over the network alike."""
    missing = sorted(
        {s.worker.name for s in stages if not all(callable(getattr(s.worker, m, None)) for m in _RECIPE_OPS)}
    )
    if missing:
        raise ConfigurationError(
            f"fit(..., accumulate=, clip_grad_norm=) needs workers that share their gradients' norms "
            f"({', '.join(_RECIPE_OPS)}); {', '.join(map(repr, missing))} cannot: use splitnn.VirtualWorker or "
            "splitnn.connect parties"
        )


_RECIPE_OPS = ("grad_norms", "clip_grads")


def _refuse_networked(stages: Sequence[Stage], rule: str, fix: str) -> None:
    """Raise ``rule`` naming the networked workers of ``stages`` and ``fix``, when there are any."""
    remote = sorted({s.worker.name for s in stages if not isinstance(s.worker, VirtualWorker)})
    if remote:
        names = ", ".join(map(repr, remote))
        raise ConfigurationError(
            f"{rule}; {names} {'is a networked worker' if len(remote) == 1 else 'are networked workers'}: {fix}"
        )


def clip_global_norm(stages: Sequence[Stage], max_norm: float) -> torch.Tensor:
    """Clip every stage's gradients by their global 2-norm, as ``torch.nn.utils.clip_grad_norm_`` on the
    unsplit model (whose parameters, for :func:`splitnn.cut`'s segments, come in the same order): each
    party sends the norm of each of its gradients, the researcher computes the total
    (``torch.nn.utils.get_total_norm``) and sends it back; each party scales its own gradients."""
    norms = [stage.worker.grad_norms(stage.key) for stage in stages]
    total = torch.nn.utils.get_total_norm(list(torch.cat(norms).unbind()), 2.0)
    for stage in stages:
        stage.worker.clip_grads(stage.key, max_norm, total)
    return total


# ----------------------------------------------------------------------------- lock-step, by refs
_ZERO, _FORWARD, _LOSS, _BACKWARD, _STEP = range(5)
_OPCODES = {Op.ZERO: _ZERO, Op.FORWARD: _FORWARD, Op.LOSS: _LOSS, Op.BACKWARD: _BACKWARD, Op.STEP: _STEP}


@functools.lru_cache(maxsize=64)
def _lockstep_program(stages: tuple[Stage, ...]) -> tuple[tuple, ...]:
    """The one-batch lock-step schedule of ``stages`` as (opcode, stage, key, worker) rows: its computations
    (sends and receives are the refs handed from one computation to the next), in one sequence.

    The sequence interleaves the parties' lists as the tutorial does -- every zero first, the data flow in
    the simulated order, every step last -- which is valid because each party's list starts with its zeros
    and ends with its steps; a party's own order is kept (checked here)."""
    sched = LockStep([s.worker.name for s in stages], 1)
    flow = [a for _, a in sched.order() if a.op not in SENDS and a.op not in RECEIVES]
    ordered = (
        [a for a in flow if a.op is Op.ZERO]
        + [a for a in flow if a.op not in (Op.ZERO, Op.STEP)]
        + sorted((a for a in flow if a.op is Op.STEP), key=lambda a: a.stage)
    )
    for p in sched.parties:
        mine = [a for a in sched.actions(p) if a.op not in SENDS and a.op not in RECEIVES]
        assert [a for a in ordered if stages[a.stage].worker.name == p] == mine, "lock-step lists changed shape"
    return tuple((_OPCODES[a.op], a.stage, stages[a.stage].key, stages[a.stage].worker) for a in ordered)


def train_step(stages: Sequence[Stage], batch: BatchRef, loss: Loss) -> LossStats:
    """One optimisation step on ``batch`` (features at the first stage, labels at the last): the
    :class:`~splitnn.workers.schedules.LockStep` schedule of one batch, driven through the Worker protocol.

    Activations and gradients travel as refs: a send makes the ref the next party's input and the
    receiver pulls the tensor when it uses it (recording the bytes), so the program compiled from the schedule
    keeps only its computations; fused autograd where both ends of a cut allow it. This is the fast path of
    :meth:`SplitNN.train_batch`: it costs about what a hand-written loop does.
    """
    last = len(stages) - 1
    outs: list = [None] * len(stages)  # the ref each stage's forward returned
    grads: list = [None] * len(stages)  # the ref of the gradient of each stage's input
    stats = None
    for code, s, key, w in _lockstep_program(tuple(stages)):
        if code == _FORWARD:
            outs[s] = w.forward(key, batch if s == 0 else outs[s - 1], train=True)
        elif code == _BACKWARD:
            grads[s] = w.backward(key, None if s == last else grads[s + 1])
        elif code == _LOSS:
            stats = w.loss(outs[s], batch, loss, train=True)
        elif code == _STEP:
            w.step(key)
        else:
            w.zero_grad(key)
    return stats


def eval_step(stages: Sequence[Stage], batch: BatchRef, loss: Loss, *, keep: str | None = None) -> LossStats:
    """Loss and correct predictions on ``batch``, without gradients; with ``keep``, the label holder
    keeps the outputs for the evaluation's metrics (see :mod:`splitnn.workers.metrics`)."""
    out = forward_chain(stages, batch, train=False)
    if keep is None:
        return stages[-1].worker.loss(out, batch, loss, train=False)
    return stages[-1].worker.loss(out, batch, loss, train=False, keep=keep)


# ----------------------------------------------------------------------------- any schedule, in-process
def check_in_process(stages: Sequence[Stage], what: str) -> None:
    """Refuse, before any work, a schedule the in-process engines cannot run (networked workers)."""
    _refuse_networked(
        stages,
        f"{what} runs in-process on VirtualWorkers or as shipped epochs on networked workers",
        "use networked workers for every party with ship_epochs=True, or in-process workers for all",
    )


def run_in_process(
    stages: Sequence[Stage],
    schedule: Schedule,
    dataset: str,
    loss: Loss,
    batches: Sequence[torch.Tensor],
    on_batch: Callable[[LossStats], None],
    *,
    threads: bool = False,
    prediction: float | None = None,
) -> None:
    """Run every party's actions of ``schedule`` over in-process workers; ``on_batch`` gets each batch's
    loss in batch order (from the label holder's thread when ``threads``). ``prediction``: a pipelined
    schedule's weight prediction (see :class:`~splitnn.workers.runner.PartyRun`).

    Any schedule (pipelined ones included) over in-process engines, each party's actions through a
    :class:`~splitnn.workers.runner.PartyRun`, the tensors handed from sender to receiver exactly as a shipped
    epoch pushes them. In one thread it follows the schedule's simulated timeline; with ``threads=True`` each
    party runs its own actions on a thread of its own and waits for what it receives, so parties compute at
    once.
    """
    check_in_process(stages, f"{schedule!r}")
    fused = [] if schedule.stashing else sorted({s.worker.name for s in stages if getattr(s.worker, "fuse", False)})
    if fused:  # in-flight operations never fuse; a lock-step schedule's plain ones do on fused workers
        # a fused receiver keeps the sender's graph, so one backward from the loss runs through every segment:
        # that is train_step's fast path, not a schedule of separate backwards per party
        raise ConfigurationError(
            f"{schedule!r} runs the parties' separate backwards, but {', '.join(map(repr, fused))} fuse autograd "
            "across cuts: use VirtualWorker(name, fuse=False), or SplitNN.fit (lock-step takes the fused path itself)"
        )
    if len(batches) != schedule.num_batches:
        raise ConfigurationError(f"{schedule!r} is for {schedule.num_batches} batches, got {len(batches)}")
    last = len(stages) - 1
    runs = {}
    for p in schedule.parties:
        keys = {s.index: s.key for s in stages if s.worker.name == p}
        engine = next(s.worker for s in stages if s.worker.name == p)
        runs[p] = PartyRun(
            engine, keys, last, dataset, loss, batches, stashing=schedule.stashing, prediction=prediction
        )
    try:
        if threads:
            _run_threads(schedule, runs, on_batch)
        else:
            _run_one_thread(schedule, runs, on_batch)
    except BaseException:
        for run in runs.values():  # drop the failed epoch's intermediate tensors
            run.engine.release()
        raise


def _run_one_thread(schedule: Schedule, runs: dict[str, PartyRun], on_batch: Callable[[LossStats], None]) -> None:
    box: dict[tuple[str, int, int], object] = {}
    for p, a in schedule.order():
        op = a.op
        if op in RECEIVES:
            runs[p].incoming(a, box.pop((a.kind, a.cut, a.batch)))
        elif op in SENDS:
            box[(a.kind, a.cut, a.batch)] = runs[p].outgoing(a)
        else:
            stats = runs[p].compute(a)
            if stats is not None:
                on_batch(stats)


def _run_threads(schedule: Schedule, runs: dict[str, PartyRun], on_batch: Callable[[LossStats], None]) -> None:
    box: dict[tuple[str, int, int], object] = {}
    news = threading.Condition()
    errors: list[BaseException] = []

    def party(p: str) -> None:
        run = runs[p]
        try:
            for a in schedule.actions(p):
                op = a.op
                if op in RECEIVES:
                    key = (a.kind, a.cut, a.batch)
                    with news:
                        if not news.wait_for(lambda key=key: key in box or errors, THREAD_WAIT_SECONDS):
                            raise WorkerError(f"party {p!r} waited {THREAD_WAIT_SECONDS:g} s for {a!r}")
                        if errors:
                            return
                        tensor = box.pop(key)
                    run.incoming(a, tensor)
                elif op in SENDS:
                    tensor = run.outgoing(a)
                    with news:
                        box[(a.kind, a.cut, a.batch)] = tensor
                        news.notify_all()
                else:
                    stats = run.compute(a)
                    if stats is not None:
                        on_batch(stats)
        except BaseException as exc:
            with news:
                errors.append(exc)
                news.notify_all()

    workers = [threading.Thread(target=party, args=(p,), name=f"splitnn-{p}", daemon=True) for p in schedule.parties]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if errors:
        raise errors[0]
