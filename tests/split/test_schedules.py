"""Schedules as data: the per-party action lists, their invariants, and the printed grid."""

from __future__ import annotations

import itertools

import pytest

from splitnn.errors import ConfigurationError
from splitnn.workers.schedules import MAX_IN_FLIGHT, Action, LockStep, Op, Pipelined, schedule

CHAINS = [
    ("alice", "bob", "claire"),
    ("alice", "bob"),
    ("alice", "bob", "alice"),  # U-shape: the data holder holds the labels too
    ("alice", "alice", "bob", "claire", "claire"),  # consecutive stages on one party
    ("alice", "bob", "claire", "dave"),
    ("alice",),
    ("alice", "bob", "alice", "bob"),
]


def _A(stage, op, batch, peer=None):
    return Action(stage, op, batch, peer)


def test_lockstep_lists_are_the_tutorial_loop_per_party():
    sched = LockStep(("alice", "bob", "claire"), 2)
    F, B, Z, S, L = Op.FORWARD, Op.BACKWARD, Op.ZERO, Op.STEP, Op.LOSS
    alice = [
        [_A(0, Z, t), _A(0, F, t), _A(0, Op.SEND_F, t, "bob"), _A(0, Op.RECV_B, t, "bob"), _A(0, B, t), _A(0, S, t)]
        for t in range(2)
    ]
    bob = [
        [
            _A(1, Z, t),
            _A(1, Op.RECV_F, t, "alice"),
            _A(1, F, t),
            _A(1, Op.SEND_F, t, "claire"),
            _A(1, Op.RECV_B, t, "claire"),
            _A(1, B, t),
            _A(1, Op.SEND_B, t, "alice"),
            _A(1, S, t),
        ]
        for t in range(2)
    ]
    claire = [
        [_A(2, Z, t), _A(2, Op.RECV_F, t, "bob"), _A(2, F, t), _A(2, L, t), _A(2, B, t), _A(2, Op.SEND_B, t, "bob")]
        + [_A(2, S, t)]
        for t in range(2)
    ]
    assert list(sched.actions("alice")) == alice[0] + alice[1]
    assert list(sched.actions("bob")) == bob[0] + bob[1]
    assert list(sched.actions("claire")) == claire[0] + claire[1]
    assert not any(a.stash for p in sched.parties for a in sched.actions(p))


@pytest.mark.parametrize("chain", CHAINS, ids="-".join)
def test_lockstep_of_n_batches_is_n_lockstep_batches(chain):
    """What the in-process driver runs per batch (the one-batch schedule) is the epoch's schedule."""
    one = LockStep(chain, 1)
    five = LockStep(chain, 5)
    for p in one.parties:
        expected = [a._replace(batch=t) for t in range(5) for a in one.actions(p)]
        assert list(five.actions(p)) == expected


def _check_invariants(sched, k):
    chain, n = sched.chain, sched.num_batches
    last = len(chain) - 1
    for p in sched.parties:
        acts = sched.actions(p)
        stages = [s for s, q in enumerate(chain) if q == p]
        # every action of this party's stages happens exactly once
        expected = {(s, op, t) for s in stages for t in range(n) for op in (Op.FORWARD, Op.BACKWARD, Op.STEP)}
        expected |= {(last, Op.LOSS, t) for t in range(n) if last in stages}
        if k == 1 and isinstance(sched, LockStep):
            expected |= {(s, Op.ZERO, t) for s in stages for t in range(n)}
        computed = [(a.stage, a.op, a.batch) for a in acts if a.op not in (Op.SEND_F, Op.RECV_F, Op.SEND_B, Op.RECV_B)]
        assert len(computed) == len(set(computed)) and set(computed) == expected
        pos = {(a.stage, a.op, a.batch): i for i, a in enumerate(acts)}
        for s in stages:
            steps_seen = []
            for a in acts:
                if a.stage != s:
                    continue
                if a.op is Op.STEP:
                    steps_seen.append(a.batch)
                elif a.op is Op.FORWARD:
                    # the rule: stage s's forward of batch t sees exactly the updates of batches 0 .. t - d(s)
                    d = sched.depth(s) if isinstance(sched, Pipelined) else 1
                    assert steps_seen == list(range(max(0, a.batch - d + 1))), (p, a, steps_seen)
                    stepped_between = any(
                        pos[(s, Op.FORWARD, a.batch)] < pos[(s, Op.STEP, j)] < pos[(s, Op.BACKWARD, a.batch)]
                        for j in range(n)
                    )
                    assert a.stash == stepped_between, (p, a)
            assert steps_seen == list(range(n))  # updates in batch order
            for t in range(n):
                assert pos[(s, Op.FORWARD, t)] < pos[(s, Op.BACKWARD, t)] < pos[(s, Op.STEP, t)]
        # sends and receives name the neighbouring party, where it is another one
        for a in acts:
            if a.op in (Op.SEND_F, Op.RECV_B):
                assert a.peer == chain[a.stage + 1] != p
            if a.op in (Op.RECV_F, Op.SEND_B):
                assert a.peer == chain[a.stage - 1] != p
    # at most K batches between the data holder's forward and its backward
    flying = 0
    for a in sched.actions(chain[0]):
        if a.stage == 0 and a.op is Op.FORWARD:
            flying += 1
            assert flying <= k
        elif a.stage == 0 and a.op is Op.BACKWARD:
            flying -= 1
    # one sequence a single thread can run: each receive after its send
    sent = set()
    for _, a in sched.order():
        key = (a.kind, a.cut, a.batch)
        if a.op in (Op.SEND_F, Op.SEND_B):
            sent.add(key)
        elif a.op in (Op.RECV_F, Op.RECV_B):
            assert key in sent
    assert sorted((p, a) for p, a in sched.order()) == sorted((p, a) for p in sched.parties for a in sched.actions(p))


@pytest.mark.parametrize("chain", CHAINS, ids="-".join)
def test_pipelined_schedules_keep_the_staleness_rule(chain):
    for k, n in itertools.product((1, 2, 3, 5), (1, 2, 4, 9)):
        _check_invariants(Pipelined(chain, n, k), k)
    for n in (1, 3):
        _check_invariants(LockStep(chain, n), 1)


def test_depth_follows_1f1b():
    sched = Pipelined(("alice", "bob", "claire"), 20, 8)
    assert [sched.depth(s) for s in range(3)] == [8, 4, 1]
    assert [Pipelined(("a", "b", "c", "d"), 9, 5).depth(s) for s in range(4)] == [5, 4, 2, 1]
    u = Pipelined(("alice", "bob", "alice"), 20, 4)
    assert [u.depth(s) for s in range(3)] == [4, 2, 1]
    assert Pipelined(("alice", "alice"), 5, 3).depth(1) == 3  # no cut crosses parties


def test_grid_prints_steps_by_party():
    text = str(Pipelined(("alice", "bob", "claire"), 6, 2))
    lines = text.splitlines()
    assert lines[0].startswith("Pipelined(('alice', 'bob', 'claire'), num_batches=6, in_flight=2)")
    rows = [[c.strip() for c in line.split("|")] for line in lines[2:]]
    assert rows[0] == ["step", "alice", "bob", "claire"]
    assert rows[1] == ["0", "0F0 0F1", "", ""]
    assert rows[2] == ["1", "", "1F0", ""]
    assert rows[3] == ["2", "", "", "2F0 2L0 2B0 2S0"]
    assert rows[4] == ["3", "", "1B0 1S0 1F1", ""]
    assert rows[5] == ["4", "0B0 0S0 0F2", "", "2F1 2L1 2B1 2S1"]
    assert rows[-1] == ["14", "0B5 0S5", "", ""]
    lock = LockStep(("alice", "bob"), 1).grid().splitlines()
    assert [[c.strip() for c in r.split("|")] for r in lock] == [
        ["step", "alice", "bob"],
        ["0", "0Z0 0F0", "1Z0"],
        ["1", "", "1F0 1L0 1B0 1S0"],
        ["2", "0B0 0S0", ""],
    ]
    assert "more steps" in Pipelined(("alice", "bob"), 50, 2).grid(max_steps=5)


def test_actions_print_as_torch_does():
    a = Action(1, Op.BACKWARD, 3)
    assert str(a) == "1B3" and repr(Action(0, Op.FORWARD, 2, stash=True)) == "0F2*"
    assert repr(Action(0, Op.SEND_F, 2, "bob")) == "0SEND_F2@bob"
    assert Action(0, Op.SEND_F, 2, "bob").cut == 0 and Action(1, Op.RECV_F, 2, "alice").cut == 0
    assert Action(1, Op.SEND_B, 2, "alice").cut == 0 and Action(0, Op.RECV_B, 2, "bob").cut == 0
    assert Action(1, Op.SEND_B, 2, "alice").kind == "gradient"


def test_bad_schedules_are_refused():
    with pytest.raises(ConfigurationError, match="pipeline"):
        schedule(("a", "b"), 3, 0)
    with pytest.raises(ConfigurationError, match="pipeline"):
        schedule(("a", "b"), 3, MAX_IN_FLIGHT + 1)
    with pytest.raises(ConfigurationError, match="pipeline"):
        schedule(("a", "b"), 3, True)
    with pytest.raises(ConfigurationError, match="num_batches"):
        schedule(("a", "b"), 0, 2)
    with pytest.raises(ConfigurationError, match="party"):
        schedule((), 3, 2)
    with pytest.raises(ConfigurationError, match="runs no stage"):
        schedule(("a", "b"), 3, 2).actions("c")
    assert schedule(("a", "b"), 3) == LockStep(("a", "b"), 3) and schedule(("a", "b"), 3, 2).in_flight == 2


def test_a_plan_without_its_chain_is_lockstep_from_the_workers_own_stages():
    """Plans name the chain; one that does not (an older researcher) still gives the worker its lock-step list."""
    from splitnn.workers.epoch import BatchOrder, EpochPlan, StagePlan

    chain = ("alice", "bob", "alice", "claire")
    full = LockStep(chain, 3)
    for me, stages in {
        "alice": (StagePlan(0, "k0", None, "bob"), StagePlan(2, "k2", "bob", "claire")),
        "bob": (StagePlan(1, "k1", "alice", "alice"),),
        "claire": (StagePlan(3, "k3", "alice", None),),
    }.items():
        bare = EpochPlan(1, "d", "nll", stages, order=BatchOrder(30, 10))
        assert bare.schedule(me).actions(me) == full.actions(me)
        named = EpochPlan(1, "d", "nll", stages, order=BatchOrder(30, 10), chain=chain, pipeline=2)
        assert named.schedule(me).actions(me) == Pipelined(chain, 3, 2).actions(me)
    with pytest.raises(ConfigurationError, match="chain"):
        EpochPlan(1, "d", "nll", stages, order=BatchOrder(30, 10), pipeline=2)
    with pytest.raises(ConfigurationError, match="does not fit its chain"):
        EpochPlan(1, "d", "nll", stages, order=BatchOrder(30, 10), chain=("alice", "bob", "bob", "claire"))
