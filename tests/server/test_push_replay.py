"""A push sent again after a broken peer link, without processes: the receiver uses it once and acknowledges
every copy; the sender keeps what is unacknowledged, within a bound."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from splitnn.errors import WireError
from splitnn.server.peers import ACK_DELAY, PeerLink, Peers, SessionPeers
from splitnn.server.pushes import ACK_GRACE, Outbox, PushesLost
from splitnn.server.shipped import Inbox, PeerLost
from splitnn.transport import frames
from splitnn.transport.counters import ByteCounters
from splitnn.transport.limits import Limits
from splitnn.workers.epoch import BatchOrder, EpochPlan, StagePlan, push_id


def _plan(run_id: int, batches: int = 2, pipeline: int = 1) -> EpochPlan:
    stage = StagePlan(1, "s1", "alice", "claire")
    return EpochPlan(run_id, "d", "nll", (stage,), BatchOrder(4 * batches, 4), chain=CHAIN, pipeline=pipeline)


CHAIN = ("alice", "bob", "claire")
#: A pipelined run: its gradients are acknowledged by ACK frames (a lock-step run's by the next batch's activation).
PIPELINED = 2


class Receiver:
    """``me``'s end of a link ``peer`` opened (bob's, from alice, unless told): frames go in as ``peer`` wrote them;
    what ``me`` writes back is kept. Its session's pushes to peers are ``self.scope.peers`` (a SessionPeers)."""

    def __init__(self, peer: str = "alice", me: str = "bob") -> None:
        self.inbox = Inbox(me, timeout=5.0)
        self.scope = SimpleNamespace(tag="t", inbox=self.inbox, counters=ByteCounters(), peers=None)
        peers = Peers(
            me,
            "token",
            tls=None,
            limits=Limits(),
            counters=ByteCounters(),
            timeout=5.0,
            resolve=lambda _: self.scope,
        )
        self.incoming: asyncio.Queue = asyncio.Queue()
        self.written: list[bytes] = []

        async def send(frame: bytes) -> None:
            self.written.append(frame)

        self.scope.peers = SessionPeers(peers, self.scope)
        self.link = PeerLink(peers, peer, "t", send, self.incoming.get)
        self.task = asyncio.get_running_loop().create_task(self.link.run())

    async def push(self, kind: str, frame_id: int, value: torch.Tensor) -> None:
        for frame in frames.value_frames(kind, frame_id, value, 1 << 20, type_=frames.PUSH):
            self.incoming.put_nowait(frame)
        for _ in range(20):  # let the link read them and write its answer
            await asyncio.sleep(0)

    def acked(self) -> list[tuple[str, int]]:
        """Every push bob acknowledged so far (the ACK frames it wrote)."""
        out = []
        for raw in self.written:
            hdr, chunk = frames.parse(raw)
            if hdr.type == frames.ACK:
                out.extend(frames.acked(chunk))
        return out

    async def flush(self) -> int:
        """Have bob send its gathered acknowledgements now (as alice's request does); the ACK frames written."""
        self.incoming.put_nowait(frames.ack(()))
        for _ in range(20):
            await asyncio.sleep(0)
        return sum(frames.parse(raw)[0].type == frames.ACK for raw in self.written)

    async def close(self) -> None:
        self.incoming.put_nowait(None)
        await self.task


def test_the_receiver_uses_a_push_sent_again_once_and_acknowledges_every_copy():
    async def main():
        bob = Receiver("claire")  # claire, bob's next party, pushes gradients (cut 1, after bob's stage 1)
        run = bob.inbox.start(_plan(7, pipeline=PIPELINED))
        first, second = push_id(7, 0, 1), push_id(7, 1, 1)
        t = torch.arange(4.0)
        await bob.push("gradient", first, t)
        await bob.push("gradient", first, t + 1)  # a copy sent again (the ack was lost with the link): ignored
        assert bob.acked() == []  # acknowledgements are gathered a while ...
        assert await bob.flush() == 1  # ... and go in one frame
        assert bob.acked() == [("gradient", first)] * 2
        got = await bob.inbox.wait(run, "claire", "gradient", first, bob.inbox.slot(run, "claire", "gradient", first))
        assert torch.equal(got.value, t)  # the first copy, once
        await bob.push("gradient", first, t + 2)  # a copy after it was used: acknowledged, never held again
        await bob.flush()
        assert bob.acked() == [("gradient", first)] * 3
        assert not bob.inbox._slots  # nothing waits to be used a second time

        # a wait failed by a broken link is waited again, and the push sent again on the new link fills it
        fut = bob.inbox.slot(run, "claire", "gradient", second)
        bob.inbox.peer_lost("claire")
        with pytest.raises(PeerLost):
            await bob.inbox.wait(run, "claire", "gradient", second, fut)
        await bob.push("gradient", second, t * 3)
        again = bob.inbox.slot(run, "claire", "gradient", second)
        assert torch.equal((await bob.inbox.wait(run, "claire", "gradient", second, again)).value, t * 3)

        bob.inbox.finish(run)
        await bob.push("gradient", push_id(7, 2, 1), t)  # its run is over here: nothing to deliver, but the
        await bob.flush()
        assert bob.acked()[-1] == ("gradient", push_id(7, 2, 1))  # sender may forget it
        await bob.push("gradient", push_id(9, 0, 1), t)  # a run not started here: held, acknowledged
        assert bob.inbox.has("claire", "gradient", push_id(9, 0, 1))
        await asyncio.sleep(ACK_DELAY * 2)  # unasked, they go after ACK_DELAY
        assert bob.acked()[-1] == ("gradient", push_id(9, 0, 1))
        await bob.close()

    asyncio.run(main())


@pytest.mark.parametrize("pipeline", [1, PIPELINED])
def test_a_push_answered_by_one_of_ours_is_acknowledged_by_it(pipeline):
    """Every activation comes back as the gradient of the same cut and batch (same frame id), which its sender
    computed from it: the receiver writes no ACK entry for an activation (a copy sent again is acknowledged as
    before), and the sender forgets the activation when that gradient arrives. Lock-step, a party finishes a batch
    (its step with the batch's gradient) before the next: the next batch's activation at a cut acknowledges the
    gradient before it, and only the run's last gradient gets an ACK entry, at once."""
    lock_step = pipeline == 1
    one = torch.ones(2)

    async def main():
        bob = Receiver()  # bob's end: activations from alice; bob keeps its gradients to alice
        run = bob.inbox.start(_plan(7, batches=3, pipeline=pipeline))
        box = bob.scope.peers.outbox("alice")
        for b in range(2):
            box.keep("gradient", push_id(7, b, 0), one, 8)
        a0 = push_id(7, 0, 0)
        await bob.push("activation", a0, one)
        assert await bob.flush() == 0 and bob.acked() == []  # nothing to acknowledge: the gradient will
        assert len(box) == 2  # (the first batch's activation answers no gradient)
        await bob.push("activation", push_id(7, 1, 0), one)
        kept = [i.frame_id for i in box.unsent(object())]
        assert kept == [push_id(7, 1, 0)] if lock_step else [push_id(7, 0, 0), push_id(7, 1, 0)]
        await bob.inbox.wait(run, "alice", "activation", a0, bob.inbox.slot(run, "alice", "activation", a0))
        await bob.push("activation", a0, one)  # sent again after a broken link: acknowledged
        await bob.flush()
        assert bob.acked() == [("activation", a0)]
        await bob.close()

        alice = Receiver("bob", me="alice")  # alice's end: gradients from bob; alice keeps her activations to bob
        stage = StagePlan(0, "s0", None, "bob")
        alice.inbox.start(EpochPlan(7, "d", "nll", (stage,), BatchOrder(8, 4), chain=CHAIN[:2], pipeline=pipeline))
        box = alice.scope.peers.outbox("bob")
        for b in range(2):
            box.keep("activation", push_id(7, b, 0), one, 8)
        box.keep("gradient", push_id(7, 0, 0), one, 8)  # (of the same id, but not an activation)
        g0, g1 = push_id(7, 0, 0), push_id(7, 1, 0)
        await alice.push("gradient", g0, one)  # batch 0's gradient at cut 0
        kept = [(i.kind, i.frame_id) for i in box.unsent(object())]
        assert kept == [("activation", push_id(7, 1, 0)), ("gradient", push_id(7, 0, 0))] and box.nbytes == 16
        await alice.flush()
        assert alice.acked() == ([] if lock_step else [("gradient", g0)])  # lock-step: our next activation says it
        await alice.push("gradient", g1, one)  # the run's last gradient from bob: acknowledged at once
        assert alice.acked() == ([] if lock_step else [("gradient", g0)]) + [("gradient", g1)]
        await alice.close()

    asyncio.run(main())


def test_a_push_from_a_party_the_plan_does_not_name_is_not_acknowledged():
    async def main():
        bob = Receiver()
        bob.inbox.start(_plan(7))
        await bob.push("gradient", push_id(7, 0, 1), torch.ones(2))  # alice is bob's previous party: refused
        await bob.flush()
        assert bob.acked() == []
        await bob.close()

    asyncio.run(main())


def test_the_sender_keeps_unacknowledged_pushes_within_a_bound():
    async def main():
        box = Outbox("bob", keep_pushes=3, keep_bytes=1 << 20)
        old, new = object(), object()  # two links
        for b in range(3):
            box.keep("activation", push_id(7, b, 0), torch.ones(1), 4)
        assert [i.frame_id for i in box.unsent(old)] == [push_id(7, b, 0) for b in range(3)]
        for item in box.unsent(old):
            item.sent_on, item.sends = old, 1
        box.acked("activation", push_id(7, 0, 0))
        assert len(box) == 2 and box.nbytes == 8 and box.pending(7)
        again = box.unsent(new)  # the link broke: what was not acknowledged goes again, in order
        assert [i.frame_id for i in again] == [push_id(7, 1, 0), push_id(7, 2, 0)]
        for item in again:
            item.sent_on, item.sends = new, 2
        for b in range(3, 6):  # beyond the bound the oldest unacknowledged is dropped ...
            box.keep("activation", push_id(7, b, 0), torch.ones(1), 4)
        assert len(box) == 3
        with pytest.raises(PushesLost, match="had to be dropped"):
            box.unsent(object())  # ... and a re-send that may need it fails (as a broken link did before)
        box.forget_run(7)
        assert len(box) == 0 and not box.pending(7)
        assert box.unsent(object()) == []  # the run ended: nothing is missing any more

    asyncio.run(main())


def test_ack_frames_round_trip_and_reject_malformed_ones():
    entries = [("activation", push_id(7, 0, 0)), ("gradient", push_id(7, 3, 1))]
    hdr, chunk = frames.parse(frames.ack(entries))
    assert hdr.type == frames.ACK and frames.acked(chunk) == entries
    assert frames.acked(frames.parse(frames.ack(()))[1]) == []  # "acknowledge what you have"
    good = frames.ack(entries)
    with pytest.raises(WireError, match="malformed ACK"):
        frames.parse(frames.pack(frames.ACK, "activation", 0, len(good) - 25, good[24:-1]))  # a torn entry
    with pytest.raises(WireError, match="unknown kind"):
        frames.acked(frames.parse(frames.pack(frames.ACK, "activation", 0, 9, bytes([99]) + bytes(8)))[1])


def test_a_lost_peer_link_reaches_the_researcher_as_a_worker_unreachable_error():
    # fit's checkpoint route catches WorkerUnreachableError: a server's own subclass (LinkLost, PushesLost) must
    # travel as that class, not fall back to a plain WorkerError (a race in the bob-killed-and-restarted test)
    from splitnn.common.messages import error_from_reply, fill_error
    from splitnn.errors import PolicyError, WorkerError, WorkerUnreachableError
    from splitnn.server.peers import LinkLost
    from splitnn.server.pushes import PushesLost
    from splitnn.wire.proto import Reply

    for exc, cls in (
        (LinkLost("lost the connection to peer 'bob'"), WorkerUnreachableError),
        (PushesLost("3 pushes dropped"), WorkerUnreachableError),
        (PolicyError("refused"), PolicyError),
        (KeyError("k"), WorkerError),
    ):
        reply = Reply()
        fill_error(reply, exc, "alice")
        got = error_from_reply(reply, "alice", "127.0.0.1:1")
        assert type(got) is cls, (exc, got)
        assert "alice" in str(got)


def test_a_receiver_acknowledges_a_full_batch_of_pushes_without_waiting_for_the_delay():
    from splitnn.server.pushes import ACK_EVERY

    async def main():
        bob = Receiver("claire")
        bob.inbox.start(_plan(7, batches=ACK_EVERY + 1, pipeline=PIPELINED))  # (none of these pushes is the run's last)
        for b in range(ACK_EVERY - 1):
            await bob.push("gradient", push_id(7, b, 1), torch.ones(2))
        assert bob.acked() == []  # gathered (the timer has ACK_DELAY to go) ...
        await bob.push("gradient", push_id(7, ACK_EVERY - 1, 1), torch.ones(2))
        # ... until ACK_EVERY of them: one ACK frame, at once (no sleep over ACK_DELAY here)
        assert bob.acked() == [("gradient", push_id(7, b, 1)) for b in range(ACK_EVERY)]
        assert sum(frames.parse(raw)[0].type == frames.ACK for raw in bob.written) == 1
        await bob.close()

    asyncio.run(main())


def test_the_last_push_a_run_expects_from_a_sender_is_acknowledged_at_once():
    """The sender's epoch ends waiting for its pushes' acknowledgements: the receiver sends them with the last push
    its run expects of that sender and kind (batches cross a cut in order), without waiting for ACK_DELAY or a
    request; earlier pushes are gathered, and so is a last push of a kind this run does not expect of that peer."""

    async def main():
        bob = Receiver("claire")
        bob.inbox.start(
            _plan(7, batches=3, pipeline=PIPELINED)
        )  # bob's stage 1: gradients from claire (cut 1), 3 batches
        await bob.push("gradient", push_id(7, 0, 1), torch.ones(2))
        await bob.push("gradient", push_id(7, 1, 1), torch.ones(2))
        assert bob.acked() == []  # gathered: ACK_DELAY to go
        await bob.push("gradient", push_id(7, 2, 1), torch.ones(2))  # the run's last from claire: all, at once
        assert bob.acked() == [("gradient", push_id(7, b, 1)) for b in range(3)]
        assert bob.inbox.ends_run("claire", "gradient", push_id(7, 2, 1))
        assert not bob.inbox.ends_run("claire", "gradient", push_id(7, 1, 1))
        assert not bob.inbox.ends_run("alice", "gradient", push_id(7, 2, 1))  # alice sends activations here
        assert bob.inbox.ends_run("alice", "activation", push_id(7, 2, 0))  # (cut 0: before bob's stage 1)
        assert not bob.inbox.ends_run("claire", "gradient", push_id(8, 2, 1))  # a run not started here
        await bob.close()

    asyncio.run(main())


def test_the_inbox_admits_a_push_in_one_look_as_its_three_questions_say():
    """``Inbox.admit`` (what a peer link asks per push) against ``has``, ``room`` and ``active`` asked one by one,
    over pushes held, used, refused, early, of finished runs and beyond the early bound."""
    from splitnn.server.shipped import MAX_EARLY_PUSHES

    def check(inbox: Inbox, cases) -> None:
        for peer, kind, fid in cases:
            expected = (
                None if inbox.has(peer, kind, fid) else inbox.room(peer, kind, fid),
                inbox.active(fid),
            )
            assert inbox.admit(peer, kind, fid) == expected, (peer, kind, fid)

    async def main():
        inbox = Inbox("bob", timeout=5.0)
        run = inbox.start(_plan(7))  # alice -> bob activations, claire -> bob gradients
        a0, a1, a2 = (push_id(7, b, 0) for b in range(3))
        cases = [
            ("alice", "activation", a0),
            ("alice", "activation", a1),
            ("alice", "gradient", a0),  # not expected from alice
            ("mallory", "activation", a0),
            ("alice", "activation", push_id(8, 0, 0)),  # early
            ("alice", "activation", 0),  # no run id at all
        ]
        check(inbox, cases)
        assert inbox.deliver("alice", "activation", a0, torch.ones(3))  # held
        check(inbox, cases)
        await inbox.wait(run, "alice", "activation", a0, inbox.slot(run, "alice", "activation", a0))  # used
        check(inbox, cases)
        fut = inbox.slot(run, "alice", "activation", a2)
        inbox.peer_lost("alice")  # a wait failed by a broken link: the push is needed again
        with pytest.raises(PeerLost):
            await inbox.wait(run, "alice", "activation", a2, fut)
        check(inbox, [*cases, ("alice", "activation", a2)])
        for b in range(MAX_EARLY_PUSHES):  # early pushes up to their bound
            assert inbox.deliver("alice", "activation", push_id(9, b, 0), torch.ones(1))
        check(inbox, [*cases, ("alice", "activation", push_id(9, MAX_EARLY_PUSHES, 0))])
        inbox.finish(run)  # a finished run's pushes need no delivery
        check(inbox, cases)

    asyncio.run(main())


def test_a_first_attempt_made_inline_counts_among_the_attempts(monkeypatch):
    from splitnn.server import links
    from splitnn.server.links import LinkLost, on_new_links

    monkeypatch.setattr(links, "PULL_RETRY_WAIT", 0.0)
    tries, retried = [], []

    async def attempt():
        tries.append(1)
        raise LinkLost("lost the connection to peer 'bob'")

    async def main():
        with pytest.raises(LinkLost, match=rf"\({links.PULL_RETRIES + 1} attempts to push\)"):
            await on_new_links(attempt, what="push", on_retry=retried.append, failed=LinkLost("first, inline"))

    asyncio.run(main())
    assert len(tries) == links.PULL_RETRIES  # the inline one was the first of PULL_RETRIES + 1
    assert str(retried[0]) == "first, inline" and len(retried) == links.PULL_RETRIES


def _settling(kind: str, fid: int, answer: bool = False):
    """Alice's session with one push ``(kind, fid)`` to bob kept and sent on a stand-in link that records the frame
    types alice writes on it (``asked``); ``answer``: bob acknowledges the push as soon as alice writes."""
    from splitnn.server.peers import SessionPeers

    peers = Peers(
        "alice", "token", tls=None, limits=Limits(), counters=ByteCounters(), timeout=5.0, resolve=lambda _: None
    )
    session = SessionPeers(peers, SimpleNamespace(tag="t", counters=ByteCounters()))
    box = session.outbox("bob")
    item = box.keep(kind, fid, torch.ones(2), 8)
    asked = []

    async def send(frame, kind_):
        asked.append(frames.parse(frame)[0].type)
        if answer:
            session.acked("bob", kind, fid)

    link = SimpleNamespace(closed=None, send=send)
    box.unsent(link)
    item.sent_on, item.sends = link, 1
    return session, box, asked


def test_an_epochs_end_sees_an_acknowledgement_that_arrives_while_it_asks_for_it(monkeypatch):
    """``settle`` asks the receiver for its acknowledgements (after waiting ACK_GRACE for them unasked); one that
    comes back while the question is still being written must end the wait at once (it was missed, and the epoch's
    end waited out a 50 ms poll)."""

    async def main():
        # bob's acknowledgement overtakes the end of alice's question
        session, box, asked = _settling("activation", push_id(7, 0, 0), answer=True)
        waited_unset = []
        wait_for = asyncio.wait_for

        async def watched_wait_for(aw, timeout):
            waited_unset.append(not box.changed.is_set())  # a wait on an event nobody will set: the poll's timeout
            return await wait_for(aw, timeout)

        monkeypatch.setattr(asyncio, "wait_for", watched_wait_for)
        await session.settle(["bob"], 7)
        assert asked == [frames.ACK] and not box.pending(7)
        assert waited_unset == [True, False]  # the grace (nothing came), then the question's answer, seen

    asyncio.run(main())


def test_an_epochs_end_does_not_ask_for_an_acknowledgement_on_its_way():
    """The receiver acknowledges a run's last push unasked, at once: ``settle`` waits ACK_GRACE for that before it
    asks (a question costs both sides a frame per link and epoch)."""

    async def main():
        fid = push_id(7, 0, 1)
        session, box, asked = _settling("gradient", fid)
        asyncio.get_running_loop().call_later(ACK_GRACE / 4, session.acked, "bob", "gradient", fid)
        await session.settle(["bob"], 7)
        assert asked == [] and not box.pending(7)

    asyncio.run(main())


def test_one_ack_frame_forgets_all_its_pushes_at_once():
    """Outbox.acked_all (an ACK frame's entries, in one call): every kept push it names is forgotten and its bytes
    no longer count, one dropped by the bound is no longer missed, an entry for nothing kept changes nothing, and
    the waiters are woken once; the same as acknowledging them one by one."""

    async def main():
        one_by_one, at_once = (Outbox("bob", keep_pushes=3, keep_bytes=1 << 20) for _ in range(2))
        for box in (one_by_one, at_once):
            for b in range(4):  # the first is dropped by the bound
                box.keep("activation", push_id(7, b, 0), torch.ones(b + 1), 4 * (b + 1))
            assert box.dropped == {("activation", push_id(7, 0, 0))} and box.nbytes == 8 + 12 + 16
        entries = [("activation", push_id(7, 0, 0)), ("activation", push_id(7, 2, 0)), ("gradient", push_id(7, 2, 0))]
        entries.append(("activation", push_id(7, 3, 0)))
        for kind, fid in entries:
            one_by_one.acked(kind, fid)
        assert not at_once.changed.is_set()
        at_once.acked_all(entries)
        assert at_once.changed.is_set()
        for box in (one_by_one, at_once):
            assert not box.dropped and len(box) == 1 and box.nbytes == 8
            assert [i.frame_id for i in box.unsent(object())] == [push_id(7, 1, 0)]
        quiet = Outbox("bob")
        quiet.acked_all([("activation", push_id(7, 0, 0))])  # nothing kept: nothing to wake
        assert not quiet.changed.is_set()

    asyncio.run(main())


def test_the_last_push_is_acknowledged_before_the_epoch_waiting_for_it_runs_on():
    """The sender's epoch ends waiting for the acknowledgement of its last push: the receiver writes the ACK frame
    before the wait for that push resumes (else the receiver's backward and step would come first, and the sender
    would wait through them). Earlier pushes are gathered, so the wait for them resumes with nothing written."""

    async def main():
        bob = Receiver("claire")
        run = bob.inbox.start(_plan(7, batches=2, pipeline=PIPELINED))
        seen = []

        async def epoch():
            for b in range(2):
                fid = push_id(7, b, 1)
                await bob.inbox.wait(run, "claire", "gradient", fid, bob.inbox.slot(run, "claire", "gradient", fid))
                seen.append(bob.acked())  # what bob had written when its epoch got the push

        task = asyncio.get_running_loop().create_task(epoch())
        await asyncio.sleep(0)
        for b in range(2):
            await bob.push("gradient", push_id(7, b, 1), torch.ones(2))
        await task
        assert seen == [[], [("gradient", push_id(7, 0, 1)), ("gradient", push_id(7, 1, 1))]]
        await bob.close()

    asyncio.run(main())
