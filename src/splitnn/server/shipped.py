"""The worker's side of a shipped epoch (see :mod:`splitnn.workers.epoch`).

:class:`Inbox` holds the tensors adjacent peers push, and bounds them.
:func:`parse_plan` turns a ``run_epoch`` command into an :class:`~splitnn.workers.epoch.EpochPlan`
(decoded by :mod:`splitnn.common.serde`) and checks it against this worker's segments, peers and data
before any work starts; the worker then runs its actions of the plan's schedule on the engine,
exchanging tensors through ``push(peer, kind, frame_id, tensor)`` and ``receive(peer, kind, frame_id)``.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import torch

from splitnn.common import serde
from splitnn.errors import WireError, WorkerError, WorkerUnreachableError
from splitnn.server.exports import held_bytes
from splitnn.wire.cut_codec import Arrived
from splitnn.workers.epoch import RUN_ID_BITS, RUN_SHIFT, EpochPlan, push_id, run_of
from splitnn.workers.losses import check_loss_name
from splitnn.workers.refs import LossStats
from splitnn.workers.runner import PartyRun
from splitnn.workers.schedules import CUT_BEHIND, KIND_OF, MAX_IN_FLIGHT, RECEIVES, SENDS
from splitnn.workers.virtual import VirtualWorker

#: Pushes a session holds for runs that have not started here yet (from all peers together): a pipelined data
#: holder may send all its batches in flight before the researcher's plan reaches its neighbour.
MAX_EARLY_PUSHES = MAX_IN_FLIGHT
#: Bytes (decoded) of the pushes a session holds for runs that have not started here yet (from all peers together).
EARLY_PUSH_BYTES = 64 * 1024 * 1024
#: The rule an early push beyond those bounds breaks (in the refusal the worker logs).
EARLY_RULE = (
    f"a session holds at most {MAX_EARLY_PUSHES} pushes and {EARLY_PUSH_BYTES:,} bytes for epoch runs that have not "
    "started at this worker (early pushes, from all peers together)"
)
#: Bytes (decoded) of the pushes a session holds for its running epochs, received and not yet used (from all peers
#: together): a pipelined run holds a few batches' values; a peer that pushes ahead of what it may is refused.
HELD_PUSH_BYTES = 256 * 1024 * 1024
#: The rule a push beyond that bound breaks (the error its run fails with).
HELD_RULE = (
    f"a session holds at most {HELD_PUSH_BYTES:,} bytes of pushes received for its running epochs and not yet used "
    "(from all peers together)"
)
#: Finished run ids remembered (late pushes for them are dropped, their ids not reused).
REMEMBER_RUNS = 256


class PeerLost(WorkerUnreachableError):
    """A link to the peer broke while this worker waited for its push (the peer may send it again)."""


@dataclass
class Run:
    """An active shipped epoch at this worker."""

    run_id: int
    allowed: frozenset[tuple[str, str]]  # (peer, kind) pairs that may push
    # the last push the run expects of each (peer, kind): its acknowledgement goes at once (the sender's epoch ends
    # when its pushes are acknowledged: it need not ask for it then)
    last: frozenset[tuple[str, str, int]] = frozenset()
    lock_step: bool = False  # each party finishes a batch (backward and step) before it starts the next
    aborted: BaseException | None = None
    consumed: set[tuple[str, str, int]] = field(default_factory=set)  # pushes received and used (a copy is ignored)


@dataclass
class Inbox:
    """Pushed tensors awaiting their consumer.

    :class:`Inbox` holds tensors that adjacent peers *push* (PUSH frames) before or
    while this worker waits for them, keyed by (sender, kind, frame id), and enforces
    who may push what: only the parties named as ``prev``/``next`` in an active plan,
    activations from ``prev`` and gradients from ``next``. Pushes for a run that has
    not started here yet (*early* pushes: the researcher's plan may reach this worker after the
    previous party's first activation) are held within a bound per session, whoever sends them
    (a peer's name is the sender's claim, so a bound per name would bound nothing): at most
    :data:`MAX_EARLY_PUSHES` pushes and :data:`EARLY_PUSH_BYTES` bytes, decoded. The receiver asks
    :meth:`Inbox.early_room` before it decodes an early push, and the decoder refuses a payload that
    declares more (a 40-byte ``topk`` payload may declare a tensor of 512 MiB) before it allocates. Pushes a running
    epoch expects are bounded the same way, by :data:`HELD_PUSH_BYTES` per session (received and not yet used); one
    beyond it fails the run, naming the rule. A push sent again after
    a broken link (:mod:`splitnn.server.pushes`) is recognised (:meth:`Inbox.has`: held,
    consumed, or of a finished run) and not delivered twice; a wait that a broken link failed
    (:class:`PeerLost`) may be waited again, and the push sent again fills it.
    """

    worker: str
    timeout: float
    _slots: dict[tuple[str, str, int], asyncio.Future] = field(default_factory=dict)
    _runs: dict[int, Run] = field(default_factory=dict)
    _finished: collections.deque = field(default_factory=lambda: collections.deque(maxlen=REMEMBER_RUNS))
    _bytes: dict[tuple[str, str, int], int] = field(default_factory=dict)  # slot -> bytes (decoded) it holds
    _run_bytes: collections.Counter = field(default_factory=collections.Counter)  # run id -> bytes its slots hold
    # bytes the slots of runs active here hold (held_bytes(): kept as it changes, not summed per push)
    _held: int = 0
    # the waits on slots not yet filled: id -> (deadline, future), oldest first (every wait has the same timeout, so
    # the oldest has the earliest deadline); one timer (_watch) fires at the oldest deadline, not a timer per wait
    _waits: dict[int, tuple[float, asyncio.Future]] = field(default_factory=dict)
    _wait_ids: Iterator[int] = field(default_factory=itertools.count)
    _watch: asyncio.TimerHandle | None = None
    _watch_loop: asyncio.AbstractEventLoop | None = None  # the loop _watch is on

    # -- runs ---------------------------------------------------------------------------
    def start(self, plan: EpochPlan) -> Run:
        if plan.run_id in self._runs or plan.run_id in self._finished:
            raise WireError(f"worker {self.worker!r}: epoch run #{plan.run_id} is already running or finished")
        allowed, last, final = set(), set(), plan.num_batches - 1
        for st in plan.stages:
            if st.prev not in (None, self.worker):
                allowed.add((st.prev, "activation"))
                last.add((st.prev, "activation", push_id(plan.run_id, final, st.index - 1)))
            if st.next not in (None, self.worker):
                allowed.add((st.next, "gradient"))
                last.add((st.next, "gradient", push_id(plan.run_id, final, st.index)))
        run = Run(plan.run_id, frozenset(allowed), frozenset(last), lock_step=plan.pipeline == 1)
        self._runs[plan.run_id] = run
        self._held += self._run_bytes.get(plan.run_id, 0)  # its early pushes are now held for a running epoch
        for key in [k for k in self._slots if run_of(k[2]) == plan.run_id and k[:2] not in run.allowed]:
            self._drop(key).cancel()  # held early, but from a party this plan does not name
        return run

    def finish(self, run: Run) -> None:
        if self._runs.pop(run.run_id, None) is not None:
            self._held -= self._run_bytes.get(run.run_id, 0)
        self._finished.append(run.run_id)
        for key in [k for k in self._slots if run_of(k[2]) == run.run_id]:
            self._drop(key).cancel()

    def clear(self) -> None:
        """Forget every run and held push (the session ended); waits on them are cancelled."""
        for fut in self._slots.values():
            fut.cancel()
        self._slots.clear()
        self._runs.clear()
        self._bytes.clear()
        self._run_bytes.clear()
        self._held = 0
        self._waits.clear()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def _drop(self, key: tuple[str, str, int]) -> asyncio.Future:
        """Remove slot ``key`` (and the bytes it held from the tallies); return its future."""
        nbytes = self._bytes.pop(key, 0)
        if nbytes:
            rid = key[2] >> RUN_SHIFT  # (run_of, inlined)
            self._run_bytes[rid] -= nbytes
            if self._run_bytes[rid] <= 0:
                del self._run_bytes[rid]
            if rid in self._runs:
                self._held -= nbytes
        return self._slots.pop(key)

    # -- deliveries (from peer links) --------------------------------------------------------
    def _early(self) -> list[asyncio.Future]:
        """The slots of pushes held for runs that have not started here."""
        return [fut for (_, _, i), fut in self._slots.items() if run_of(i) not in self._runs]

    def early_bytes(self) -> int:
        """Bytes (decoded) of the pushes held for runs that have not started here."""
        return sum(n for rid, n in self._run_bytes.items() if rid not in self._runs)

    def held_bytes(self) -> int:
        """Bytes (decoded) of the pushes held for runs active here, received and not yet used."""
        return self._held

    def active(self, frame_id: int) -> bool:
        """Whether ``frame_id`` names a run active here."""
        return run_of(frame_id) in self._runs

    def room(self, peer: str, kind: str, frame_id: int) -> int | None:
        """Before a push is decoded, the bytes it may take decoded: 0 if it is refused (not expected from ``peer``
        by the run it names, or over the session's bound); for a run active here, what is left of
        :data:`HELD_PUSH_BYTES`; for an early push, what is left of :data:`EARLY_PUSH_BYTES`."""
        rid = run_of(frame_id)
        run = self._runs.get(rid)
        if run is not None:
            if (peer, kind) not in run.allowed or (peer, kind, frame_id) in run.consumed:
                return 0
            return max(HELD_PUSH_BYTES - self._held, 0)
        if rid in self._finished or not 0 < rid < 1 << RUN_ID_BITS or len(self._early()) >= MAX_EARLY_PUSHES:
            return 0
        return max(EARLY_PUSH_BYTES - self.early_bytes(), 0)

    def admit(self, peer: str, kind: str, frame_id: int) -> tuple[int | None, bool]:
        """Before a push is decoded, in one look: ``(None, active)`` if it needs no delivery (:meth:`has`), else
        ``(room, active)`` (:meth:`room`); ``active`` is :meth:`active`. (A receiver asks this for every push.)"""
        rid = frame_id >> RUN_SHIFT  # (run_of, inlined)
        run = self._runs.get(rid)
        key = (peer, kind, frame_id)
        if run is None:
            if rid in self._finished:
                return None, False
        elif key in run.consumed:
            return None, True
        fut = self._slots.get(key)
        if fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
            return None, run is not None
        if run is not None:
            if (peer, kind) not in run.allowed:
                return 0, True
            return max(HELD_PUSH_BYTES - self._held, 0), True
        if not 0 < rid < 1 << RUN_ID_BITS or len(self._early()) >= MAX_EARLY_PUSHES:
            return 0, False
        return max(EARLY_PUSH_BYTES - self.early_bytes(), 0), False

    def refusal(self, frame_id: int, peer: str | None = None, kind: str | None = None) -> str:
        """Why a push of ``frame_id`` (from ``peer``, of ``kind``) was refused (for the log)."""
        rid = run_of(frame_id)
        run = self._runs.get(rid)
        if run is not None:
            if (peer, kind) in run.allowed and (peer, kind, frame_id) not in run.consumed:
                return HELD_RULE
            return "not expected from it by the epoch run it names"
        if rid in self._finished or not 0 < rid < 1 << RUN_ID_BITS:
            return "its epoch run finished here, or its id is not one"
        return EARLY_RULE

    def deliver(self, peer: str, kind: str, frame_id: int, value: torch.Tensor | BaseException) -> bool:
        """Store a pushed tensor (or the error decoding it). False if it is refused or stale."""
        rid = frame_id >> RUN_SHIFT  # (run_of, inlined)
        run = self._runs.get(rid)
        key = (peer, kind, frame_id)
        failed = isinstance(value, BaseException)
        if failed:
            nbytes = 0
        elif isinstance(value, Arrived):
            # an arrival's bytes are its value's (its two counts hold none): ``raw``, which the decoder counted from
            # the tensors it made (tensor_nbytes of each, never a size the sender declared; a test holds it equal to
            # held_bytes of the value), so they are not counted a second time here
            nbytes = value.raw
        else:
            nbytes = held_bytes(value)
        slots = self._slots
        if run is None:
            if rid in self._finished or not 0 < rid < 1 << RUN_ID_BITS:
                return False
            if key not in slots:  # a new early push: within the session's bound
                if failed or len(self._early()) >= MAX_EARLY_PUSHES:
                    return False
                if self.early_bytes() + nbytes > EARLY_PUSH_BYTES:
                    return False
        elif (peer, kind) not in run.allowed or key in run.consumed or self._held + nbytes > HELD_PUSH_BYTES:
            return False  # not expected from it by its run, used already, or over the session's bound for its runs
        fut = slots.get(key)  # (as slot() makes it)
        if fut is None:
            fut = slots[key] = asyncio.get_running_loop().create_future()
        elif fut.done():
            if fut.cancelled() or not isinstance(fut.exception(), PeerLost):
                return False
            fut = slots[key] = asyncio.get_running_loop().create_future()  # failed by a broken link: fill anew
        if failed:
            _fail(fut, value)
        else:
            fut.set_result(value)
            self._bytes[key] = nbytes
            self._run_bytes[rid] += nbytes
            if run is not None:
                self._held += nbytes
        return True

    def ends_run(self, peer: str, kind: str, frame_id: int) -> bool:
        """Whether push ``(peer, kind, frame_id)`` is the last one its running epoch expects of ``peer`` and ``kind``
        (batches cross each cut in order, under every schedule): its sender waits for the acknowledgements of its
        pushes once its part of the epoch is done, so they go at once."""
        run = self._runs.get(frame_id >> RUN_SHIFT)
        return run is not None and (peer, kind, frame_id) in run.last

    def lock_step(self, frame_id: int) -> bool:
        """Whether ``frame_id``'s run is running here, lock-step."""
        run = self._runs.get(frame_id >> RUN_SHIFT)
        return run is not None and run.lock_step

    def has(self, peer: str, kind: str, frame_id: int) -> bool:
        """Whether the push (peer, kind, frame_id) needs no delivery: it is held or was used here, or its run
        finished (a copy sent again after a broken link; the sender may forget it)."""
        rid = run_of(frame_id)
        run = self._runs.get(rid)
        if run is None and rid in self._finished:
            return True
        if run is not None and (peer, kind, frame_id) in run.consumed:
            return True
        fut = self._slots.get((peer, kind, frame_id))
        return fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None

    def peer_aborted(self, peer: str, run_id: int, text: str) -> None:
        """An adjacent peer's part of ``run_id`` failed: fail our waits for it."""
        run = self._runs.get(run_id)
        if run is None or not any(p == peer for p, _ in run.allowed):
            return
        run.aborted = WorkerError(f"worker {self.worker!r}: peer {peer!r} aborted the epoch: {text}")
        for (_, _, i), fut in self._slots.items():
            if run_of(i) == run_id and not fut.done():
                _fail(fut, run.aborted)

    def peer_lost(self, peer: str) -> None:
        """The connection to ``peer`` broke: fail every wait on it."""
        for (p, _, _), fut in self._slots.items():
            if p == peer and not fut.done():
                _fail(fut, PeerLost(f"worker {self.worker!r}: lost the connection to peer {peer!r}"))

    # -- waiting (from the epoch loop) ---------------------------------------------------------
    def slot(self, run: Run, peer: str, kind: str, frame_id: int) -> asyncio.Future:
        """The future a wait for (peer, kind, frame_id) awaits; create it before dialling the peer."""
        if run.aborted is not None:
            raise run.aborted
        # a slot's future is a plain one, not exports.quiet_future (whose done-callback costs an event-loop pass per
        # push): every error put in it goes through _fail, which marks it retrieved
        key = (peer, kind, frame_id)
        fut = self._slots.get(key)
        if fut is None:
            fut = self._slots[key] = asyncio.get_running_loop().create_future()
        return fut

    async def wait(self, run: Run, peer: str, kind: str, frame_id: int, fut: asyncio.Future) -> torch.Tensor:
        try:
            if fut.done():  # pushed ahead of its receive (pipelined runs): no timer needed
                value = fut.result()
            else:
                # awaited directly (not wait_for: one event-loop pass less per receive), its deadline kept for the
                # inbox's one timer (a timer per wait, made and cancelled, costs about a dozen calls per receive)
                loop = asyncio.get_running_loop()
                wid = next(self._wait_ids)
                deadline = loop.time() + self.timeout
                self._waits[wid] = (deadline, fut)
                if self._watch is None or self._watch_loop is not loop:  # (none armed on this loop: arm it)
                    self._watch, self._watch_loop = loop.call_at(deadline, self._expire, deadline), loop
                try:
                    value = await fut
                finally:
                    self._waits.pop(wid, None)
            run.consumed.add((peer, kind, frame_id))
            return value
        except asyncio.TimeoutError:
            raise WorkerUnreachableError(
                f"worker {self.worker!r}: peer {peer!r} did not send its {kind} within "
                f"{self.timeout:g} s (is it alive?)"
            ) from None
        finally:
            if self._slots.get((peer, kind, frame_id)) is fut:
                self._drop((peer, kind, frame_id))

    def _expire(self, due: float) -> None:
        """The timer of the waits fired (for the deadline ``due``): fail every wait whose deadline has come (its slot
        is dropped by :meth:`wait`), and set the timer again for the oldest one left."""
        self._watch = None
        loop = asyncio.get_running_loop()
        now = max(loop.time(), due)  # (a timer may fire a clock tick before its time: ``due`` has come)
        for wid, (deadline, fut) in list(self._waits.items()):  # oldest first
            if deadline > now:
                self._watch, self._watch_loop = loop.call_at(deadline, self._expire, deadline), loop
                return
            del self._waits[wid]
            _time_out(fut)


# ------------------------------------------------------------------------------- plans
def parse_plan(
    args: dict, blobs: list[bytes], *, engine: VirtualWorker, peers: set[str], max_blob_bytes: int
) -> EpochPlan:
    """Decode a ``run_epoch`` command (:func:`splitnn.common.serde.epoch_plan_from_command`) and check it
    against what this worker hosts and knows; raise WireError/WorkerError before any work starts."""
    plan = serde.epoch_plan_from_command(args, blobs, worker=engine.name, max_bytes=max_blob_bytes)
    me = engine.name
    for st in plan.stages:
        engine.segment(st.key)  # WorkerError naming what it hosts
        for p in (st.prev, st.next):
            if p not in (None, me) and p not in peers:
                raise WorkerError(
                    f"worker {me!r}: the epoch plan names {p!r}, which is not a peer of this "
                    f"worker's model (known peers: {sorted(peers)})"
                )
    for st in plan.stages:  # the party's policy: whom its tensors may go to (`peers`, or the model's adjacency)
        if st.next not in (None, me):
            engine.check_receiver(st.next, "its activations")
        if st.prev not in (None, me):
            engine.check_receiver(st.prev, "its gradients")
    if plan.holds_labels:
        check_loss_name(plan.loss)
    _check_data(plan, engine)
    return plan


def _check_data(plan: EpochPlan, engine: VirtualWorker) -> None:
    """The dataset parts the plan reads here (features at its first stage, labels at its last) exist and fit it."""
    me, dataset, order, indices = engine.name, plan.dataset, plan.order, plan.indices
    needs = [
        part for part, needed in (("features", plan.stages[0].prev is None), ("labels", plan.holds_labels)) if needed
    ]
    if needs:
        data = engine.dataset(dataset)  # WorkerError naming what it holds
        size = data.size  # rows (named features: of each tensor, not the number of names)
        for part in needs:
            if getattr(data, part) is None:
                raise WorkerError(f"worker {me!r} holds no {part} for dataset {dataset!r}")
        if order is not None and order.n != size:
            raise WireError(
                f"epoch plan: the batch order covers {order.n} samples but dataset {dataset!r} "
                f"has {size} at worker {me!r}"
            )
        for idx in indices or ():
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
                raise WireError(f"epoch plan: batch indices of dataset {dataset!r} out of range 0..{size - 1}")


# ------------------------------------------------------------------------------- running
Push = Callable[[str, str, int, torch.Tensor], Awaitable[None]]
Receive = Callable[[str, str, int], Awaitable[torch.Tensor]]


async def run_epoch(
    engine: VirtualWorker, plan: EpochPlan, push: Push, receive: Receive
) -> AsyncIterator[list[LossStats]]:
    """Run this worker's part of ``plan``; yield the label holder's losses every ``progress_interval`` s.

    The worker runs its actions of the plan's schedule (:meth:`EpochPlan.schedule`, the one the
    in-process driver runs) on the engine through a :class:`~splitnn.workers.runner.PartyRun`:
    computations in order, receives by awaiting ``receive`` (pushes ahead of their receive wait
    in the inbox), sends as ``push`` to the action's peer. A send does not wait for its write:
    the pushes to each peer go out in order (one stream, one lock) while the worker computes
    on, and the run ends only when every push has been written (the first failed one fails it).
    Received tensors enter through ``engine.put`` (the receiver records the transfer, as
    in-process).
    """
    me = engine.name
    sched = plan.schedule(me)
    run = PartyRun(
        engine,
        {st.index: st.key for st in plan.stages},
        len(sched.chain) - 1,
        plan.dataset,
        plan.loss,
        plan.batches(),
        stashing=sched.stashing,
        prediction=plan.prediction,
        split_backward=plan.pipeline == 1,  # the gradient a peer waits for goes before this party's weights'
    )
    sending: collections.deque[asyncio.Task] = collections.deque()
    lock_step = plan.pipeline == 1
    pending: list[LossStats] = []
    last_report = time.monotonic()
    try:
        for a in sched.actions(me):
            op = a.op
            if op in RECEIVES:
                # (Action.kind and .cut, looked up in their tables: per send and receive)
                fid = push_id(plan.run_id, a.batch, a.stage - CUT_BEHIND[op])
                run.incoming(a, await receive(a.peer, KIND_OF[op], fid))
            elif op in SENDS:
                fid = push_id(plan.run_id, a.batch, a.stage - CUT_BEHIND[op])
                if lock_step:  # the party's next action waits for a peer anyway: write now, no task per push
                    await push(a.peer, KIND_OF[op], fid, run.outgoing(a))
                    continue
                sending.append(asyncio.ensure_future(push(a.peer, KIND_OF[op], fid, run.outgoing(a))))
                while sending and sending[0].done():
                    sending.popleft().result()  # a failed push fails the run here
            else:
                stats = run.compute(a)
                if stats is not None:
                    pending.append(stats)
                    if time.monotonic() - last_report >= plan.progress_interval:
                        out, pending = pending, []
                        last_report = time.monotonic()
                        yield out
        while sending:
            await sending.popleft()
    finally:
        for task in sending:  # failed or cancelled: writes are never cut off half-way; just collect their errors
            task.add_done_callback(_quiet)
    if pending:
        yield pending


def _quiet(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


def _time_out(fut: asyncio.Future) -> None:
    """A wait's timer ran out: fail the wait (its slot is dropped by :meth:`Inbox.wait`)."""
    if not fut.done():
        _fail(fut, asyncio.TimeoutError())


def _fail(fut: asyncio.Future, exc: BaseException) -> None:
    """Fail an inbox slot's wait with ``exc``, marked retrieved: a slot nobody awaits any more (its run ended, its
    peer aborted) is never reported as "exception never retrieved"; an await of it still raises ``exc``."""
    fut.set_exception(exc)
    fut.exception()
