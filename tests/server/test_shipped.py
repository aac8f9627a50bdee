"""Shipped epochs without processes: plan checks, who may push what, and the batch order."""

from __future__ import annotations

import asyncio

import pytest
import torch
from torch import nn

from splitnn.common.serde import losses_from_result as losses_from_json
from splitnn.common.serde import losses_to_result as losses_json
from splitnn.errors import ConfigurationError, WireError, WorkerError
from splitnn.server.shipped import EARLY_PUSH_BYTES, EARLY_RULE, MAX_EARLY_PUSHES, Inbox, parse_plan
from splitnn.training import epoch_batches
from splitnn.transport import frames
from splitnn.wire import cut_codec
from splitnn.workers import VirtualWorker
from splitnn.workers.epoch import BatchOrder, EpochPlan, StagePlan, push_id, run_of
from splitnn.workers.refs import LossStats


def _bob() -> VirtualWorker:
    bob = VirtualWorker("bob", fuse=False)
    bob.add_segment("s1", nn.Linear(4, 3), "sgd:lr=0.1")
    return bob


def _args(**over) -> dict:
    args = {
        "run": 7,
        "dataset": "d",
        "loss": "nll",
        "progress_interval": 0.05,
        "stages": [{"index": 1, "key": "s1", "prev": "alice", "next": "claire"}],
        "order": BatchOrder(10, 4).to_dict(),
        "pipeline": 1,  # a plan names its batches in flight (lock-step: 1; no chain)
    }
    args.update(over)
    return args


def test_batch_order_is_epoch_batches():
    order = BatchOrder(n=103, batch_size=16, shuffle=True, seed=3, epoch=2)
    expected = epoch_batches(103, 16, shuffle=True, seed=3, epoch=2)
    assert all(torch.equal(a, b) for a, b in zip(order.batches(), expected)) and len(order.batches()) == 7
    assert BatchOrder.from_dict(order.to_dict()) == order
    with pytest.raises(WireError):
        BatchOrder.from_dict({"n": 0, "batch_size": 1, "shuffle": True, "seed": 0, "epoch": 0})
    with pytest.raises(ConfigurationError):
        EpochPlan(1, "d", "nll", (StagePlan(0, "k", None, None),))  # neither order nor indices


def test_push_ids_separate_runs_batches_and_cuts():
    ids = {push_id(r, b, c) for r in (1, 2) for b in (0, 1, 2**32 - 1) for c in (0, 1, 254)}
    assert len(ids) == 18 and all(i < 2**64 for i in ids)
    assert run_of(push_id(5, 2**32 - 1, 254)) == 5


def test_parse_plan_checks_before_work():
    bob = _bob()
    plan = parse_plan(_args(), [], engine=bob, peers={"alice", "claire"}, max_blob_bytes=1 << 20)
    assert plan.stages == (StagePlan(1, "s1", "alice", "claire"),) and plan.num_batches == 3
    with pytest.raises(WorkerError, match="not a peer"):  # only the model's parties may be adjacent
        parse_plan(_args(), [], engine=bob, peers={"alice"}, max_blob_bytes=1 << 20)
    with pytest.raises(WorkerError, match="hosts no segment"):
        parse_plan(
            _args(stages=[{"index": 1, "key": "zz", "prev": "alice", "next": "claire"}]),
            [],
            engine=bob,
            peers={"alice", "claire"},
            max_blob_bytes=1 << 20,
        )
    with pytest.raises(WireError, match="first stage"):
        parse_plan(
            _args(stages=[{"index": 1, "key": "s1", "prev": None, "next": "claire"}]),
            [],
            engine=bob,
            peers={"alice", "claire"},
            max_blob_bytes=1 << 20,
        )
    with pytest.raises(WireError):
        parse_plan(_args(run=0), [], engine=bob, peers={"alice", "claire"}, max_blob_bytes=1 << 20)
    # the label holder checks its labels and that the order covers exactly its dataset
    bob.add_dataset("d", labels=torch.zeros(12, dtype=torch.int64))
    last = [{"index": 1, "key": "s1", "prev": "alice", "next": None}]
    with pytest.raises(WireError, match="covers 10 samples"):
        parse_plan(_args(stages=last), [], engine=bob, peers={"alice"}, max_blob_bytes=1 << 20)
    with pytest.raises(WireError, match="out of range"):
        from splitnn.wire.tensor_codec import encode_tensor

        parse_plan(
            _args(stages=last, order=None),
            [encode_tensor(torch.tensor([0, 12])), encode_tensor(torch.tensor([2]))],
            engine=bob,
            peers={"alice"},
            max_blob_bytes=1 << 20,
        )


def test_early_pushes_are_bounded_in_bytes_per_session():
    """Held pushes of runs not started here take at most EARLY_PUSH_BYTES (decoded) per session, from all peers
    together; room() says how much is left before a push is decoded, and 0 for a push that would be refused."""

    async def main():
        inbox = Inbox("bob", timeout=1.0)
        quarter = torch.zeros(EARLY_PUSH_BYTES // 4 // 4)  # float32: a quarter of the bound
        for i, peer in enumerate(("p1", "p2", "p3")):
            assert inbox.deliver(peer, "activation", push_id(5, i, 0), quarter)
        assert inbox.early_bytes() == 3 * EARLY_PUSH_BYTES // 4
        assert inbox.room("p4", "activation", push_id(5, 3, 0)) == EARLY_PUSH_BYTES // 4
        assert not inbox.deliver("p4", "activation", push_id(5, 3, 0), torch.zeros(EARLY_PUSH_BYTES // 4 // 4 + 1))
        assert inbox.deliver("p4", "activation", push_id(5, 3, 0), quarter)
        assert inbox.room("p5", "activation", push_id(6, 0, 0)) == 0
        assert not inbox.deliver("p5", "activation", push_id(6, 0, 0), torch.zeros(1))
        assert not inbox.deliver("p5", "activation", push_id(6, 1, 0), WireError("bad"))  # an error is not held early
        inbox.clear()
        assert inbox.early_bytes() == 0 and inbox.room("p5", "activation", push_id(6, 0, 0)) == EARLY_PUSH_BYTES

    asyncio.run(main())


def test_pushes_held_for_a_running_epoch_are_bounded_in_bytes_per_session(monkeypatch):
    """Pushes a running epoch expects but has not used yet take at most HELD_PUSH_BYTES (decoded) per session:
    room() says how much is left before a push is decoded (the decoder refuses a payload declaring more), 0 once
    the bound is reached, and refusal() names the rule; what the run has used no longer counts."""
    from splitnn.server import shipped

    monkeypatch.setattr(shipped, "HELD_PUSH_BYTES", 4096)

    async def main():
        inbox = Inbox("bob", timeout=1.0)
        plan = parse_plan(_args(), [], engine=_bob(), peers={"alice", "claire"}, max_blob_bytes=1 << 20)
        run = inbox.start(plan)
        quarter = torch.zeros(4096 // 4 // 4)  # float32: a quarter of the bound
        for b in range(3):
            assert inbox.room("alice", "activation", push_id(7, b, 0)) == 4096 - b * 1024
            assert inbox.deliver("alice", "activation", push_id(7, b, 0), quarter)
        assert inbox.held_bytes() == 3072 and inbox.early_bytes() == 0
        assert inbox.room("claire", "gradient", push_id(7, 0, 1)) == 1024
        assert not inbox.deliver("claire", "gradient", push_id(7, 0, 1), torch.zeros(257))  # 1,028 bytes: over
        assert inbox.deliver("claire", "gradient", push_id(7, 0, 1), quarter)
        assert inbox.room("alice", "activation", push_id(7, 3, 0)) == 0
        assert "bytes of pushes received for its running epochs and not yet used" in inbox.refusal(
            push_id(7, 3, 0), "alice", "activation"
        )
        assert (
            inbox.refusal(push_id(7, 3, 0), "mallory", "activation") == "not expected from it by the epoch run it names"
        )
        await inbox.wait(
            run, "alice", "activation", push_id(7, 0, 0), inbox.slot(run, "alice", "activation", push_id(7, 0, 0))
        )
        assert inbox.held_bytes() == 3072 and inbox.room("alice", "activation", push_id(7, 3, 0)) == 1024

    asyncio.run(main())


def test_inbox_takes_pushes_only_from_the_adjacent_parties_of_a_plan():
    async def main():
        inbox = Inbox("bob", timeout=1.0)
        plan = parse_plan(_args(), [], engine=_bob(), peers={"alice", "claire", "mallory"}, max_blob_bytes=1 << 20)
        t = torch.ones(2)
        early = inbox.deliver("alice", "activation", push_id(7, 0, 0), t)  # before the plan arrives: held
        run = inbox.start(plan)
        assert early
        assert not inbox.deliver("claire", "activation", push_id(7, 0, 0), t)  # wrong direction
        assert not inbox.deliver("alice", "gradient", push_id(7, 0, 1), t)  # wrong kind from alice
        assert not inbox.deliver("mallory", "activation", push_id(7, 1, 0), t)  # not adjacent
        assert inbox.deliver("claire", "gradient", push_id(7, 0, 1), t)
        got = await inbox.wait(
            run, "alice", "activation", push_id(7, 0, 0), inbox.slot(run, "alice", "activation", push_id(7, 0, 0))
        )
        assert torch.equal(got, t)
        # a peer's ABORT fails the wait at once; its reason is kept
        fut = inbox.slot(run, "claire", "gradient", push_id(7, 1, 1))
        inbox.peer_aborted("claire", 7, "worker 'claire': boom")
        with pytest.raises(WorkerError, match="boom"):
            await inbox.wait(run, "claire", "gradient", push_id(7, 1, 1), fut)
        inbox.finish(run)
        assert not inbox.deliver("alice", "activation", push_id(7, 2, 0), t)  # late: dropped
        with pytest.raises(WireError, match="already"):
            inbox.start(plan)  # a run id is never reused
        # pushes for runs not started here are capped per session, whatever name the sender claims
        assert all(inbox.deliver("alice", "activation", push_id(9, b, 0), t) for b in range(MAX_EARLY_PUSHES - 1))
        assert inbox.room("mallory", "activation", push_id(9, 98, 0)) > 0
        assert inbox.deliver("mallory", "activation", push_id(9, 98, 0), t)
        assert (
            inbox.room("eve", "activation", push_id(9, 99, 0)) == 0 and inbox.refusal(push_id(9, 99, 0)) == EARLY_RULE
        )
        assert not inbox.deliver("eve", "activation", push_id(9, 99, 0), t)
        assert not inbox.deliver("alice", "activation", push_id(9, 99, 0), t)
        # a lost peer fails every wait on it
        run2 = inbox.start(EpochPlan(11, "d", "nll", plan.stages, order=BatchOrder(10, 4)))
        fut = inbox.slot(run2, "alice", "activation", push_id(11, 0, 0))
        inbox.peer_lost("alice")
        with pytest.raises(WorkerError, match="lost the connection to peer 'alice'"):
            await inbox.wait(run2, "alice", "activation", push_id(11, 0, 0), fut)
        # and nobody waits forever
        fut = inbox.slot(run2, "claire", "gradient", push_id(11, 0, 1))
        with pytest.raises(WorkerError, match="did not send"):
            await Inbox("bob", timeout=0.01).wait(run2, "claire", "gradient", push_id(11, 0, 1), fut)

    asyncio.run(main())


def test_push_and_abort_frames_round_trip():
    t = torch.randn(64, 640)
    reasm = frames.Reassembler(1 << 24)
    out = None
    chunks = list(frames.data_frames("gradient", push_id(3, 1, 0), t, 50_000, type_=frames.PUSH))
    assert len(chunks) > 1
    for raw in chunks:
        hdr, body = frames.parse(raw)
        assert hdr.type == frames.PUSH and hdr.kind == "gradient"
        out = reasm.feed(hdr, body)
    assert torch.equal(out, t)
    hdr, body = frames.parse(frames.abort(3, "x" * 10_000))
    assert hdr.type == frames.ABORT and hdr.id == 3 and len(body) == frames.MAX_ERROR_BYTES
    with pytest.raises(ValueError):
        next(frames.data_frames("gradient", 1, t, 1024, type_=frames.REQUEST))


def test_losses_round_trip_exactly():
    stats = [LossStats(2.302585092994046, -1, 64), LossStats(0.1 + 0.2, -1, 8)]
    assert losses_from_json(losses_json(stats)) == stats
    with pytest.raises(WireError):
        losses_from_json({"loss": [1.0], "count": []})


def test_inlined_run_of_is_run_of():
    """The inbox reads a push's run as ``frame_id >> RUN_SHIFT`` on its per-push path: the same as run_of."""
    from splitnn.workers.epoch import RUN_SHIFT

    for fid in (push_id(1, 0, 0), push_id(5, 2**32 - 1, 254), push_id(2**23 - 1, 7, 3), (1 << RUN_SHIFT) - 1, 0):
        assert fid >> RUN_SHIFT == run_of(fid)


def test_held_bytes_kept_as_it_changes_equal_the_sum_over_active_runs():
    """Inbox.held_bytes() is a total kept as pushes are delivered, used, dropped and runs start and finish: after
    every step of a random mix of them it equals the bytes the slots of the runs active here hold, summed anew."""
    import random

    def summed(inbox: Inbox) -> int:
        return sum(n for key, n in inbox._bytes.items() if run_of(key[2]) in inbox._runs)

    async def main():
        rng = random.Random(25)
        inbox = Inbox("bob", timeout=1.0)
        plans = {rid: EpochPlan(rid, "d", "nll", _plan_stages(), order=BatchOrder(10, 4)) for rid in (3, 4, 5)}
        runs: dict[int, object] = {}
        kinds = [("alice", "activation", 0), ("claire", "gradient", 1), ("mallory", "activation", 0)]
        for _ in range(600):
            rid = rng.choice(list(plans))
            peer, kind, cut = rng.choice(kinds)
            fid = push_id(rid, rng.randrange(6), cut)
            step = rng.randrange(6)
            if step <= 1:
                inbox.deliver(peer, kind, fid, torch.zeros(rng.randrange(1, 50)))
            elif step == 2 and rid in runs:  # used by its run
                fut = inbox._slots.get((peer, kind, fid))
                if fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
                    await inbox.wait(runs[rid], peer, kind, fid, fut)
            elif step == 3 and rid not in runs and rid not in inbox._finished:
                runs[rid] = inbox.start(plans[rid])
            elif step == 4 and rid in runs and rng.random() < 0.2:
                inbox.finish(runs.pop(rid))
                plans[max(plans) + 1] = EpochPlan(max(plans) + 1, "d", "nll", _plan_stages(), order=BatchOrder(10, 4))
                del plans[rid]
            elif step == 5 and rng.random() < 0.05:
                inbox.clear()
                runs.clear()
            assert inbox.held_bytes() == summed(inbox)
            assert inbox.early_bytes() == sum(n for key, n in inbox._bytes.items() if run_of(key[2]) not in inbox._runs)
        assert inbox.held_bytes() > 0 or not runs  # (the mix held something for a running epoch)

    asyncio.run(main())


def _plan_stages() -> tuple[StagePlan, ...]:
    return (StagePlan(1, "s1", "alice", "claire"),)


def test_a_slot_failed_and_never_awaited_is_not_reported(caplog):
    """An inbox slot's future is a plain one: an error put in it (a lost peer, an ABORT, an undecodable push) is
    marked retrieved, so a slot nobody awaits any more is never logged as "exception was never retrieved"; an
    await of it still raises the error."""
    import gc

    async def main():
        inbox = Inbox("bob", timeout=1.0)
        run = inbox.start(EpochPlan(7, "d", "nll", _plan_stages(), order=BatchOrder(10, 4)))
        inbox.slot(run, "alice", "activation", push_id(7, 0, 0))
        inbox.slot(run, "claire", "gradient", push_id(7, 0, 1))
        fut = inbox.slot(run, "claire", "gradient", push_id(7, 1, 1))
        assert inbox.deliver("alice", "activation", push_id(7, 1, 0), WireError("bad tensor"))
        inbox.peer_lost("alice")
        inbox.peer_aborted("claire", 7, "boom")
        with pytest.raises(WorkerError, match="boom"):
            await fut
        del inbox, fut  # the failed futures are dropped unawaited (not cancelled: a cancel would silence them)
        gc.collect()
        await asyncio.sleep(0)

    with caplog.at_level("ERROR", logger="asyncio"):
        asyncio.run(main())
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


@pytest.mark.parametrize("chunk", [100, 1 << 20])
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(16, 8),
        lambda: torch.arange(300, dtype=torch.int64).reshape(3, 100),
        lambda: torch.zeros(0, 5),
        lambda: torch.randn(40, 64, dtype=torch.float16),
        lambda: (torch.randn(16, 8), torch.ones(16, 8), torch.arange(16)),
        lambda: (torch.randn(16, 8), None, None),
        lambda: cut_codec.CutEncoder("fp16").encode(torch.randn(40, 64)),
        lambda: cut_codec.CutEncoder("topk:0.1").encode(torch.randn(40, 64)),
        lambda: cut_codec.CutEncoder("int8").encode((torch.randn(16, 8), torch.arange(16))),
    ],
)
def test_an_arrivals_raw_bytes_are_what_its_value_holds(make, chunk):
    """Inbox.deliver bounds the bytes it holds by an arrival's ``raw`` (not counted again): for every way a pushed
    value is decoded (one frame or chunks, received or owned memory, a codec, several values), ``raw`` equals
    exports.held_bytes of the decoded value -- the count the inbox made itself before."""
    from splitnn.server.exports import held_bytes

    for owned in (False, True):
        reasm = frames.Reassembler(1 << 24)
        arrived = None
        for raw in frames.value_frames("activation", push_id(3, 0, 0), make(), chunk, type_=frames.PUSH):
            hdr, body = frames.parse(raw)
            arrived = reasm.feed_arrival(hdr, body, owned=owned)
        assert arrived is not None and arrived.raw == held_bytes(arrived.value)


def test_every_wait_times_out_at_its_own_deadline_under_the_inboxs_one_timer():
    """The inbox times its waits with one timer at the oldest wait's deadline, not a timer per wait: a wait whose
    older neighbour was filled still times out (the timer is set again for it), a filled wait leaves nothing
    behind, and an inbox that outlives its event loop times the waits of the next one."""
    inbox = Inbox("bob", timeout=0.05)
    plan = EpochPlan(7, "d", "nll", _plan_stages(), order=BatchOrder(10, 4))

    async def two_waits():
        run = inbox.start(plan)
        first = push_id(7, 0, 0)
        fut1 = inbox.slot(run, "alice", "activation", first)
        w1 = asyncio.ensure_future(inbox.wait(run, "alice", "activation", first, fut1))
        await asyncio.sleep(0.02)
        fut2 = inbox.slot(run, "claire", "gradient", push_id(7, 0, 1))
        w2 = asyncio.ensure_future(inbox.wait(run, "claire", "gradient", push_id(7, 0, 1), fut2))
        await asyncio.sleep(0)
        assert len(inbox._waits) == 2 and inbox._watch is not None
        assert inbox.deliver("alice", "activation", first, torch.ones(2))
        assert torch.equal(await w1, torch.ones(2))
        await asyncio.sleep(0.04)  # past the first wait's deadline: the timer fired for it, and is set again
        assert inbox._watch is not None or w2.done()
        with pytest.raises(WorkerError, match="'claire' did not send its gradient within 0.05 s"):
            await w2
        assert not inbox._waits and not inbox._slots
        # a wait cancelled (its epoch ended) leaves the timer set on this loop, which ends before it fires
        fut3 = inbox.slot(run, "alice", "activation", push_id(7, 1, 0))
        w3 = asyncio.ensure_future(inbox.wait(run, "alice", "activation", push_id(7, 1, 0), fut3))
        await asyncio.sleep(0)
        w3.cancel()
        with pytest.raises(asyncio.CancelledError):
            await w3
        assert not inbox._waits and inbox._watch is not None
        inbox.finish(run)

    async def next_loop():
        run = inbox.start(EpochPlan(8, "d", "nll", _plan_stages(), order=BatchOrder(10, 4)))
        fut = inbox.slot(run, "alice", "activation", push_id(8, 0, 0))
        wait = asyncio.ensure_future(inbox.wait(run, "alice", "activation", push_id(8, 0, 0), fut))
        await asyncio.sleep(0)
        assert inbox._watch_loop is asyncio.get_running_loop()  # (the timer of the ended loop will never fire)
        with pytest.raises(WorkerError, match="did not send its activation"):
            await wait
        assert not inbox._waits

    asyncio.run(two_waits())
    asyncio.run(next_loop())
