"""The worker's record of one researcher stream (splitnn.server.replay), without a network."""

from __future__ import annotations

import asyncio

import pytest

from splitnn.server.replay import Replay, ResumeRefused
from splitnn.wire.proto import Command


def run(coro):
    return asyncio.run(coro)


def test_a_command_re_sent_with_a_received_seq_is_not_queued_again():
    async def go():
        replay = Replay("s" * 32)
        assert replay.accept(Command(seq=1, op="put"))
        assert replay.accept(Command(seq=2, op="step"))
        assert not replay.accept(Command(seq=2, op="step"))  # a copy
        assert not replay.accept(Command(seq=1, op="put"))
        assert replay.accept(Command(seq=3, op="loss"))
        assert [replay.commands.get_nowait().seq for _ in range(replay.commands.qsize())] == [1, 2, 3]
        assert replay.received == 3

    run(go())


def test_without_a_stream_id_every_command_runs():
    async def go():
        replay = Replay(None)
        assert replay.accept(Command(seq=0, op="hello")) and replay.accept(Command(seq=0, op="hello"))
        assert replay.commands.qsize() == 2

    run(go())


def test_replies_are_kept_until_acknowledged_and_written_again_after_a_resume():
    async def go():
        replay = Replay("s" * 32)
        replay.handler = asyncio.current_task()
        for seq in (1, 2, 3):
            await replay.emit(seq, b"reply%d" % seq)
        assert [await replay.next_reply() for _ in range(3)] == [b"reply1", b"reply2", b"reply3"]
        await replay.ack(1)
        assert replay.kept == (2, 12)
        assert replay.detach(replay.handler)
        await replay.emit(4, b"reply4")  # made while no call is attached
        await replay.attach(asyncio.current_task(), ack=2)
        assert replay.rewrites == 1  # reply3 went out before: it goes again
        assert [await replay.next_reply() for _ in range(2)] == [b"reply3", b"reply4"]

    run(go())


def test_a_resume_that_needs_a_dropped_reply_is_refused():
    async def go():
        replay = Replay("s" * 32, keep_replies=2)
        for seq in (1, 2, 3):  # detached: the oldest unacknowledged reply is dropped to stay in bounds
            await replay.emit(seq, b"r")
        assert replay.kept == (2, 2) and replay.lost_upto == 1
        with pytest.raises(ResumeRefused, match="dropped before the client acknowledged"):
            await replay.attach(asyncio.current_task(), ack=0)
        await replay.attach(asyncio.current_task(), ack=1)  # the client had #1: fine
        assert [await replay.next_reply() for _ in range(2)] == [b"r", b"r"]

    run(go())


def test_the_writer_ends_once_the_client_half_closed_and_every_command_was_answered():
    async def go():
        replay = Replay("s" * 32)
        replay.handler = asyncio.current_task()
        replay.accept(Command(seq=1, op="step"))
        await replay.half_closed()
        waiting = asyncio.ensure_future(replay.next_reply())
        await asyncio.sleep(0)
        assert not waiting.done()  # #1 has not run yet
        await replay.emit(1, b"done")
        await replay.completed_one()
        assert await waiting == b"done"
        assert await replay.next_reply() is None

    run(go())
