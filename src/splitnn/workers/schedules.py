"""Schedules as data: which party runs which action of a training epoch, in which order.

:class:`LockStep` (one batch at a time) and :class:`Pipelined` (up to ``K`` batches in flight) give every
party of a chain of stages its ordered list of :class:`Action` s; the in-process driver
(:mod:`splitnn.split.driver`) and a networked worker's shipped epochs run these lists, and nothing else
writes the step order (the idea of ``torch.distributed.pipelining``'s schedules, for parties instead of ranks).
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from splitnn.checks import check_positive
from splitnn.errors import ConfigurationError

#: Most batches in flight a pipelined schedule may have (bounds what a party holds for its peers).
MAX_IN_FLIGHT = 64


class Op(str, enum.Enum):
    """What an action does (the letters follow ``torch.distributed.pipelining``)."""

    ZERO = "Z"  # zero the stage's gradients (lock-step: the start of each batch)
    FORWARD = "F"
    LOSS = "L"  # the label holder's loss on the last stage's output
    BACKWARD = "B"
    STEP = "S"  # the stage's optimizer step with the batch's gradient
    SEND_F = "SEND_F"  # the stage's output to the next party
    RECV_F = "RECV_F"  # the stage's input from the previous party
    SEND_B = "SEND_B"  # the gradient of the stage's input to the previous party
    RECV_B = "RECV_B"  # the gradient of the stage's output from the next party


COMPUTE = frozenset({Op.ZERO, Op.FORWARD, Op.LOSS, Op.BACKWARD, Op.STEP})
SENDS = frozenset({Op.SEND_F, Op.SEND_B})
RECEIVES = frozenset({Op.RECV_F, Op.RECV_B})
#: What a send or receive carries, by op (:attr:`Action.kind`; a table, so the per-batch loops look it up
#: without a call).
KIND_OF = {Op.SEND_F: "activation", Op.RECV_F: "activation", Op.SEND_B: "gradient", Op.RECV_B: "gradient"}
#: How far before the action's stage the cut its tensor crosses lies, by op (:attr:`Action.cut`: stage - this).
CUT_BEHIND = {Op.SEND_F: 0, Op.RECV_B: 0, Op.RECV_F: 1, Op.SEND_B: 1}


class Action(NamedTuple):
    """One thing one party does: ``op`` of batch ``batch`` on stage ``stage``.

    ``peer`` is the other party of a send or receive. ``stash`` marks a forward whose
    backward comes after a later step of its stage: it must run on a copy of the weights it
    saw. A send or receive names no codec: compression at a cut belongs to the sending
    segment's engine, which encodes what it produces with its codec and error feedback
    (``VirtualWorker.set_codecs``), under every schedule alike.
    """

    stage: int
    op: Op
    batch: int
    peer: str | None = None
    stash: bool = False

    @property
    def cut(self) -> int:
        """For a send or receive: the cut its tensor crosses (cut ``c`` lies after stage ``c``)."""
        return self.stage - CUT_BEHIND.get(self.op, 1)

    @property
    def kind(self) -> str:
        """For a send or receive: ``"activation"`` or ``"gradient"``."""
        return KIND_OF.get(self.op, "gradient")

    def __str__(self) -> str:
        return f"{self.stage}{self.op.value}{self.batch}"

    def __repr__(self) -> str:
        extra = f"@{self.peer}" if self.peer is not None else ""
        extra += "*" if self.stash else ""
        return f"{self.stage}{self.op.value}{self.batch}{extra}"


def _check_chain(chain: Sequence[str]) -> tuple[str, ...]:
    chain = tuple(chain)
    if not chain or not all(isinstance(p, str) and p for p in chain):
        raise ConfigurationError(f"a schedule needs the party of every stage (non-empty names), got {chain!r}")
    return chain


def check_pipeline_depth(pipeline: object, name: str = "pipeline") -> int:
    """``pipeline``, the batches in flight: an integer 1..:data:`MAX_IN_FLIGHT` (1: lock-step); ``name`` names
    it in the error (``"--pipeline"`` on the command line)."""
    if not isinstance(pipeline, int) or isinstance(pipeline, bool) or not 1 <= pipeline <= MAX_IN_FLIGHT:
        raise ConfigurationError(f"{name} must be 1..{MAX_IN_FLIGHT} (an integer: batches in flight), got {pipeline!r}")
    return pipeline


class _Hop(NamedTuple):
    """A maximal run of consecutive stages at one party (no cut between them crosses parties)."""

    party: str
    first: int
    last: int
    prev: str | None  # the party before ``first`` (None: the data)
    next: str | None  # the party after ``last`` (None: the loss)


def _hops(chain: tuple[str, ...]) -> list[_Hop]:
    hops, first = [], 0
    for s in range(1, len(chain) + 1):
        if s == len(chain) or chain[s] != chain[first]:
            hops.append(
                _Hop(
                    chain[first],
                    first,
                    s - 1,
                    chain[first - 1] if first else None,
                    chain[s] if s < len(chain) else None,
                )
            )
            first = s
    return hops


class Schedule:
    """Per-party ordered actions of one training epoch over a chain of stages.

    A training epoch across a chain of stages (segment ``i`` at party ``chain[i]``) is, for
    every party, an ordered list of actions (:class:`Action`): forward / backward / step of batch
    ``t`` on stage ``s``, the loss at the label holder, zeroing gradients where they belong,
    and the sends and receives where the neighbouring stage is another party.

    ``print(schedule)`` shows the schedule simulated as a step x party grid (one row per one-way
    message delay, computation taking no time): for ``Pipelined(("alice", "bob", "claire"),
    4, in_flight=2)``::

        step | alice       | bob         | claire
           0 | 0F0 0F1     |             |
           1 |             | 1F0         |
           2 |             |             | 2F0 2L0 2B0 2S0
           3 |             | 1B0 1S0 1F1 |
           4 | 0B0 0S0 0F2 |             | 2F1 2L1 2B1 2S1
           ...

    Actions print as torch's do: stage, op, batch (``1B3``: backward of batch 3 on stage 1).

    Args:
        chain: the party of each stage, in chain order (stage 0 holds the features, the last
            stage's party the labels).
        num_batches: batches in the epoch.
    """

    #: Batches a party may have between a forward and its backward (1: lock-step).
    in_flight: int = 1

    def __init__(self, chain: Sequence[str], num_batches: int) -> None:
        self.chain = _check_chain(chain)
        self.num_batches = check_positive("num_batches", num_batches)

    # -- what each party does ----------------------------------------------------------------
    @property
    def parties(self) -> list[str]:
        """The parties, in the order of their first stage."""
        return list(dict.fromkeys(self.chain))

    @property
    def stashing(self) -> bool:
        """Whether steps may come between a batch's forward and backward (pipelined runs keep each batch's
        weights and gradients apart); ``False`` for lock-step, whose engines use plain gradients."""
        return False

    def actions(self, party: str) -> tuple[Action, ...]:
        """The ordered actions of ``party``."""
        try:
            return self._lists[party]
        except KeyError:
            raise ConfigurationError(
                f"party {party!r} runs no stage of this schedule (parties: {self.parties})"
            ) from None

    @functools.cached_property
    def _lists(self) -> dict[str, tuple[Action, ...]]:
        return self._build()

    def _build(self) -> dict[str, tuple[Action, ...]]:
        raise NotImplementedError

    # -- the simulated timeline --------------------------------------------------------------
    @functools.cached_property
    def timeline(self) -> list[dict[str, list[Action]]]:
        """The schedule played out with one time step per one-way message (computation free): per step,
        the actions each party runs in it. Raises ``RuntimeError`` if the lists could deadlock."""
        return _simulate({p: [list(self.actions(p))] for p in self.parties})[1]

    def order(self) -> list[tuple[str, Action]]:
        """Every party's actions in one sequence a single thread can run (each receive after its send)."""
        return [(p, a) for step in self.timeline for p, acts in step.items() for a in acts]

    def grid(self, max_steps: int | None = None) -> str:
        """The timeline as a step x party table of computations (sends and receives are between the rows)."""
        parties = self.parties
        steps = self.timeline
        shown = steps if max_steps is None else steps[:max_steps]
        rows = [["step", *parties]]
        for i, step in enumerate(shown):
            rows.append([str(i), *(" ".join(str(a) for a in step.get(p, ()) if a.op in COMPUTE) for p in parties)])
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = [
            " | ".join(
                (cell.rjust(w) if c == 0 else cell.ljust(w)) for c, (cell, w) in enumerate(zip(r, widths))
            ).rstrip()
            for r in rows
        ]
        if len(shown) < len(steps):
            lines.append(f"... {len(steps) - len(shown)} more steps")
        return "\n".join(lines)

    def describe(self) -> str:
        """One line: what the schedule is."""
        where = ", ".join(
            f"{p} (stage{'s' if self.chain.count(p) > 1 else ''} "
            f"{', '.join(str(i) for i, q in enumerate(self.chain) if q == p)})"
            for p in self.parties
        )
        return f"{self!r} over {where}"

    def __str__(self) -> str:
        return (
            f"{self.describe()}\none step = one one-way message; computing takes no time; "
            f"'1B3' = stage 1, backward, batch 3 (Z zero grads, F forward, L loss, B backward, S step)\n"
            + self.grid(max_steps=200)
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.chain!r}, num_batches={self.num_batches})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple:
        return (self.chain, self.num_batches, self.in_flight)


class LockStep(Schedule):
    """One batch at a time: each party zeroes, forwards, (loss), backwards and steps batch ``t``
    before it touches batch ``t + 1`` -- the tutorial's loop, bit-identical to a monolithic model.

    Per batch each party zeroes its stages' gradients, runs its forwards in chain order (receiving and
    sending activations), the label holder its loss, then the backwards in reverse (receiving and sending
    gradients), then steps. Every batch sees the updates of all earlier batches.
    """

    def _build(self) -> dict[str, tuple[Action, ...]]:
        return {p: tuple(_lockstep(self.chain, p, self.num_batches)) for p in self.parties}


class Pipelined(Schedule):
    """Up to ``in_flight`` batches between the data holder's forward and its backward; stage ``s`` computes
    batch ``t`` with its weights of ``depth(s) - 1`` updates before (at most ``in_flight - 1``).

    With ``K = in_flight`` batches in flight the data holder starts batch
    ``t + 1`` before the gradient of batch ``t`` has come back. Each stage ``s`` has an
    in-flight depth ``d(s)`` (:meth:`Pipelined.depth`): ``K`` at the data holder's first
    stage, 1 at the label holder's last, and in between ``ceil(K * r / r0)`` for a stage with
    ``r`` cross-party cuts after it of the chain's ``r0`` (1F1B: what keeps every link busy
    when the links have equal delays; 3 parties: ``K, ceil(K / 2), 1``). Then, per stage::

        the forward and the backward of batch t use  W_s(max(0, t - d(s) + 1))
        W_s(j + 1) = the optimizer's step from W_s(j) with the gradient of batch j

    where ``W_s(v)`` is stage ``s``'s weights after the updates of batches ``0 .. v - 1`` of
    the epoch. Every batch's gradient is computed with the weights its forward used (weight
    stashing, as PipeDream), each party applies its updates in batch order right after each
    backward, and staleness is at most ``K - 1`` updates (the data holder's), less further
    down the chain (the label holder's last stage computes with fresh weights). The pipeline
    fills and drains within each epoch: every update is applied when it ends. ``K = 1`` is
    lock-step arithmetic.

    One version for every stage instead ("vertical sync": every stage's updates delayed by ``K - 1``)
    costs much more accuracy at large ``K`` for the same throughput (docs/performance.md).

    How the order realises the rule: each stage runs forwards ``0 .. d - 1``, then for each
    batch ``j`` its backward, its step and the forward of batch ``j + d``; a forward whose
    backward comes after a later step of its stage is marked ``stash``, and the party runs it
    on a copy of the weights it saw and keeps each batch's gradients apart until that batch's
    step (:mod:`splitnn.workers.inflight`). A party that runs several non-adjacent parts of the
    chain (the U-shape's data holder) gets its parts' orders merged by simulating the schedule
    with one time step per message.
    """

    def __init__(self, chain: Sequence[str], num_batches: int, in_flight: int) -> None:
        super().__init__(chain, num_batches)
        self.in_flight = check_pipeline_depth(in_flight, "in_flight (pipeline depth)")

    @property
    def stashing(self) -> bool:
        return True

    def depth(self, stage: int) -> int:
        """The in-flight depth ``d`` of ``stage`` (1F1B): its forwards before its first backward; its batch ``t``
        is computed with its weights after ``max(0, t - d + 1)`` updates."""
        hops = _hops(self.chain)
        h = next(i for i, hop in enumerate(hops) if hop.first <= stage <= hop.last)
        return _depth(self.in_flight, len(hops) - 1 - h, len(hops) - 1)

    def _build(self) -> dict[str, tuple[Action, ...]]:
        hops = _hops(self.chain)
        streams: dict[str, list[list[Action]]] = {}
        for h, hop in enumerate(hops):
            w = _depth(self.in_flight, len(hops) - 1 - h, len(hops) - 1)
            streams.setdefault(hop.party, []).append(_pipelined_hop(hop, self.num_batches, w))
        merged = {p: s[0] for p, s in streams.items()} if all(len(s) == 1 for s in streams.values()) else None
        if merged is None:
            merged = _simulate(streams)[0]
        return {p: tuple(_mark_stashes(acts)) for p, acts in merged.items()}

    def __repr__(self) -> str:
        return f"Pipelined({self.chain!r}, num_batches={self.num_batches}, in_flight={self.in_flight})"


def schedule(chain: Sequence[str], num_batches: int, pipeline: int = 1) -> Schedule:
    """The schedule of an epoch: :class:`LockStep` for ``pipeline=1``, else :class:`Pipelined` (cached: every
    epoch of a run asks for the same one)."""
    check_pipeline_depth(pipeline)
    return _schedule(_check_chain(chain), check_positive("num_batches", num_batches), pipeline)


@functools.lru_cache(maxsize=16)
def _schedule(chain: tuple[str, ...], num_batches: int, pipeline: int) -> Schedule:
    return LockStep(chain, num_batches) if pipeline == 1 else Pipelined(chain, num_batches, pipeline)


# ------------------------------------------------------------------------------- the orders
def _lockstep(chain: tuple[str, ...], me: str, num_batches: int) -> Iterable[Action]:
    """Lock-step actions of party ``me``: per batch, zero its stages, forward them in order (receiving and
    sending where the neighbour is another party; the loss after the last stage), backward in reverse, step."""
    stages = [s for s, p in enumerate(chain) if p == me]
    last = len(chain) - 1
    for t in range(num_batches):
        for s in stages:
            yield Action(s, Op.ZERO, t)
        for s in stages:
            if s > 0 and chain[s - 1] != me:
                yield Action(s, Op.RECV_F, t, chain[s - 1])
            yield Action(s, Op.FORWARD, t)
            if s == last:
                yield Action(s, Op.LOSS, t)
            elif chain[s + 1] != me:
                yield Action(s, Op.SEND_F, t, chain[s + 1])
        for s in reversed(stages):
            if s < last and chain[s + 1] != me:
                yield Action(s, Op.RECV_B, t, chain[s + 1])
            yield Action(s, Op.BACKWARD, t)
            if s > 0 and chain[s - 1] != me:
                yield Action(s, Op.SEND_B, t, chain[s - 1])
        for s in stages:
            yield Action(s, Op.STEP, t)


def _depth(k: int, remote_after: int, remote_total: int) -> int:
    """1F1B in-flight depth of a hop with ``remote_after`` cross-party cuts after it (of ``remote_total``)."""
    if remote_total == 0:
        return k
    return max(1, math.ceil(k * remote_after / remote_total))


def _pipelined_hop(hop: _Hop, num_batches: int, w: int) -> list[Action]:
    """One hop's actions (1F1B with depth ``w``): forwards 0 .. w-1, then for each batch j its backward, its
    step, and the forward of batch j + w -- so the forward of batch t comes after the steps of batches
    0 .. t-w: it sees the stage's weights after t - w + 1 updates."""
    stages = range(hop.first, hop.last + 1)
    out: list[Action] = []

    def forward(t: int) -> None:
        if hop.prev is not None:
            out.append(Action(hop.first, Op.RECV_F, t, hop.prev))
        out.extend(Action(s, Op.FORWARD, t) for s in stages)
        out.append(Action(hop.last, Op.LOSS, t) if hop.next is None else Action(hop.last, Op.SEND_F, t, hop.next))

    for t in range(min(w, num_batches)):
        forward(t)
    for j in range(num_batches):
        if hop.next is not None:
            out.append(Action(hop.last, Op.RECV_B, j, hop.next))
        out.extend(Action(s, Op.BACKWARD, j) for s in reversed(stages))
        if hop.prev is not None:
            out.append(Action(hop.first, Op.SEND_B, j, hop.prev))  # the gradient leaves before the step runs
        out.extend(Action(s, Op.STEP, j) for s in stages)
        if j + w < num_batches:
            forward(j + w)
    return out


def _mark_stashes(actions: Sequence[Action]) -> list[Action]:
    """Mark each forward that a step of its stage follows before its backward (its weights must be kept)."""
    out = list(actions)
    unmarked: dict[tuple[int, int], int] = {}  # (stage, batch) -> position of a forward awaiting its backward
    for i, a in enumerate(out):
        if a.op is Op.FORWARD:
            unmarked[(a.stage, a.batch)] = i
        elif a.op is Op.BACKWARD:
            unmarked.pop((a.stage, a.batch), None)
        elif a.op is Op.STEP:
            for key in [k for k in unmarked if k[0] == a.stage]:
                j = unmarked.pop(key)
                out[j] = out[j]._replace(stash=True)
    return out


# ------------------------------------------------------------------------------- simulation
def _message(a: Action) -> tuple[str, int, int]:
    return (a.kind, a.cut, a.batch)


def _simulate(streams: dict[str, list[list[Action]]]) -> tuple[dict[str, list[Action]], list[dict[str, list[Action]]]]:
    """Play per-party action streams with one time step per message (sent at step i, received from step i + 1)
    and free computation. A party with several streams runs, at each moment, the ready head with the lowest
    batch (then stage). Returns each party's resulting order and, per step, what each party ran."""
    heads = {p: [0] * len(s) for p, s in streams.items()}
    arrived: dict[tuple[str, int, int], int] = {}  # message -> the step from which it can be received
    order: dict[str, list[Action]] = {p: [] for p in streams}
    timeline: list[dict[str, list[Action]]] = []
    left = sum(len(x) for s in streams.values() for x in s)
    step = 0
    while left:
        ran: dict[str, list[Action]] = {}
        for p, ss in streams.items():
            done: list[Action] = []
            while True:
                best = None
                for i, stream in enumerate(ss):
                    if heads[p][i] >= len(stream):
                        continue
                    a = stream[heads[p][i]]
                    if a.op in RECEIVES and arrived.get(_message(a), step + 1) > step:
                        continue
                    if best is None or (a.batch, a.stage) < (
                        ss[best][heads[p][best]].batch,
                        ss[best][heads[p][best]].stage,
                    ):
                        best = i
                if best is None:
                    break
                a = ss[best][heads[p][best]]
                heads[p][best] += 1
                if a.op in SENDS:
                    arrived[_message(a)] = step + 1
                done.append(a)
            if done:
                ran[p] = done
                order[p].extend(done)
                left -= len(done)
        if not ran:  # a message sent at step i is receivable at i + 1: nothing ran, nothing ever will
            stuck = {
                p: str(ss[i][heads[p][i]])
                for p, ss in streams.items()
                for i in range(len(ss))
                if heads[p][i] < len(ss[i])
            }
            raise RuntimeError(f"schedule deadlocks at step {step}: waiting {stuck}")
        timeline.append(ran)
        step += 1
    return order, timeline
