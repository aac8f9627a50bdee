"""Running a researcher's commands in one session of a worker, in order, and answering each with a Reply.

:class:`Executor` turns one ``Command`` envelope into one ``Reply`` (its docstring covers ``batch`` and
``run_epoch``); :class:`LedgerDelta` is the ledger records made since the previous reply.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import torch
from google.protobuf.message import DecodeError

from splitnn.common import serde
from splitnn.common.messages import MAX_BATCH, command_args, fill_error
from splitnn.errors import SplitNNError, WireError
from splitnn.server import shipped
from splitnn.server.commands import Commands
from splitnn.server.exports import StreamState
from splitnn.server.health import COMMAND_OBSERVERS, command_done
from splitnn.server.peers import SessionPeers, on_new_links
from splitnn.transport.limits import Limits
from splitnn.wire.proto import Command, Reply, Transfer
from splitnn.workers.epoch import EpochPlan
from splitnn.workers.virtual import VirtualWorker

log = logging.getLogger("splitnn.worker")


def receiver(inbox: shipped.Inbox, peers: SessionPeers, run) -> Callable[[str, str, int], Awaitable[torch.Tensor]]:
    """How a shipped epoch's ``run`` receives ``peer``'s push ``(kind, fid)``: its wait on the inbox, inline while
    the link is up (the common case); once a link to the peer broke (PeerLost), again on a new link, where the peer
    sends the push again."""

    async def attempt(peer: str, kind: str, fid: int) -> torch.Tensor:
        fut = inbox.slot(run, peer, kind, fid)
        if not peers.connected(peer):
            # re-dial, sending again what we pushed to it unacknowledged (both sides may be waiting for what the
            # broken link lost); a dead peer fails the wait (Inbox.peer_lost)
            await peers.relink(peer)
        return await inbox.wait(run, peer, kind, fid, fut)

    async def receive(peer: str, kind: str, fid: int) -> torch.Tensor:
        failed = None
        fut = inbox.slot(run, peer, kind, fid)
        if peers.connected(peer):  # the common case, the first attempt, inline
            try:
                return await inbox.wait(run, peer, kind, fid, fut)
            except shipped.PeerLost as exc:
                failed = exc
        return await on_new_links(lambda: attempt(peer, kind, fid), shipped.PeerLost, failed=failed)

    return receive


class LedgerDelta:
    """The records of ``engine.ledger`` made since the previous call, as ``Transfer`` messages for a reply.

    Each session has its own engine and ledger, so a reply carries its own session's records only.
    """

    def __init__(self, engine: VirtualWorker) -> None:
        self._engine = engine
        self._reported: dict[tuple[str, str, str], tuple[int, int, int]] = {}

    def __call__(self) -> list[Transfer]:
        out = []
        for link in self._engine.ledger.links():
            key = (link.src, link.dst, link.kind)
            c0, b0, r0 = self._reported.get(key, (0, 0, 0))
            if (link.count, link.nbytes, link.raw_nbytes) != (c0, b0, r0):
                t = Transfer(src=link.src, dst=link.dst, kind=link.kind, count=link.count - c0, nbytes=link.nbytes - b0)
                if link.raw_nbytes - r0 != t.nbytes:  # compressed at the cut: the raw size beside the sent one
                    t.raw_nbytes = link.raw_nbytes - r0
                out.append(t)
                self._reported[key] = (link.count, link.nbytes, link.raw_nbytes)
        return out


class Executor:
    """Runs commands against one session's engine.

    :class:`Executor` turns one ``Command`` envelope into one ``Reply``: it decodes the
    arguments, puts staged uploads back into the blobs, runs the operation from the
    :class:`~splitnn.server.commands.Commands` table and attaches the ledger records made
    since the previous reply (:class:`LedgerDelta`). Every failure becomes an error reply
    (:func:`~splitnn.common.messages.fill_error`); the worker keeps serving.

    Two commands are not single operations:

    * ``batch`` -- commands the researcher coalesced into one message; they run in order
      and the reply carries the last one's result, or the first error.
    * ``run_epoch`` -- a shipped epoch (:mod:`splitnn.workers.epoch`): this worker's part of
      a whole training epoch, run batch by batch by :func:`splitnn.server.shipped.run_epoch`,
      pushing activations and gradients to the adjacent parties over the peer streams. It
      answers with progress replies (the label holder's losses) and one final reply. On
      failure -- or when the researcher goes away -- the adjacent parties get an ABORT
      frame, so they fail at once instead of waiting for tensors that will not come.
    """

    def __init__(
        self,
        name: str,
        engine: VirtualWorker,
        commands: Commands,
        *,
        peers: SessionPeers,
        inbox: shipped.Inbox,
        limits: Limits,
    ) -> None:
        self.name, self.engine, self.commands = name, engine, commands
        self.peers, self.inbox, self.limits = peers, inbox, limits
        self.ledger_delta = LedgerDelta(engine)

    def _error(self, seq: int, text: str) -> Reply:
        return Reply(seq=seq, ok=False, error_type="WireError", error=f"worker {self.name!r}: {text}")

    async def execute(self, cmd: Command, caller: str, state: StreamState, *, report: bool = True) -> Reply:
        """Run one command; with ``report``, attach the ledger records made since the previous reply."""
        reply = Reply(seq=cmd.seq)
        started, failed = time.perf_counter(), None
        try:
            op = self.commands.table.get(cmd.op)
            if op is None:
                raise WireError(f"unknown command {cmd.op[:64]!r}")
            args = command_args(cmd)
            blobs = state.unstage(args, list(cmd.blobs))
            result, out_blobs = await op(args, blobs, caller=caller, state=state)
            reply.ok = True
            if result:
                reply.result_json = json.dumps(result)
            reply.blobs.extend(out_blobs)
        except Exception as exc:  # every failure becomes an error reply; the server keeps serving
            failed = exc
            fill_error(reply, exc, self.name)
            if not isinstance(exc, SplitNNError):
                log.debug("command %s failed", cmd.op, exc_info=True)
        if COMMAND_OBSERVERS:  # health and metrics (splitnn.server.health)
            command_done(
                self.name, cmd.op if cmd.op in self.commands.table else "unknown", time.perf_counter() - started, failed
            )
        if report:
            reply.transfers.extend(self.ledger_delta())
        return reply

    async def execute_batch(self, batch: Command, caller: str, state: StreamState) -> Reply:
        """Run coalesced commands in order; answer with the last one's result and the first error."""
        if batch.args_json or len(batch.blobs) > MAX_BATCH:
            return self._error(batch.seq, "malformed command batch")
        first_error: Reply | None = None
        reply = Reply(seq=batch.seq, ok=True)
        started = time.perf_counter()
        for raw in batch.blobs:
            try:
                cmd = Command.FromString(raw)
            except DecodeError as exc:
                reply = self._error(0, f"malformed command: {exc}")
            else:
                reply = (
                    self._error(0, "nested batch")
                    if cmd.op == "batch"
                    else await self.execute(cmd, caller, state, report=False)
                )
            if not reply.ok and first_error is None:
                first_error = reply
        out = first_error if first_error is not None else reply
        if COMMAND_OBSERVERS:  # one batch served (its commands were counted one by one)
            command_done(self.name, "batch", time.perf_counter() - started, None)
        out.seq = batch.seq
        del out.transfers[:]
        out.transfers.extend(self.ledger_delta())
        return out

    # -- shipped epochs ---------------------------------------------------------------------
    def _adjacent(self, plan: EpochPlan) -> set[str]:
        return {p for st in plan.stages for p in (st.prev, st.next)} - {None, self.name}

    async def run_epoch(self, cmd: Command) -> AsyncIterator[Reply]:
        """Run a shipped epoch: progress replies (label holder's losses), then one final reply."""
        plan = run = None
        final = Reply(seq=cmd.seq)
        try:
            args = command_args(cmd)
            self.commands.check_plan_names(args)  # another session's segments or dataset: PolicyError
            plan = shipped.parse_plan(
                args,
                list(cmd.blobs),
                engine=self.engine,
                peers=set(self.peers.addresses),
                max_blob_bytes=self.limits.max_blob_bytes,
            )
            run = self.inbox.start(plan)
            for peer in self._adjacent(plan):
                await self.peers.link(peer)  # dial the adjacent parties now: a dead one fails the epoch early

            receive = receiver(self.inbox, self.peers, run)
            async for losses in shipped.run_epoch(self.engine, plan, self.peers.push, receive):
                yield Reply(seq=cmd.seq, ok=True, progress=True, result_json=json.dumps(serde.losses_to_result(losses)))
            # every push acknowledged: a link that breaks now loses nothing the peers still need
            await self.peers.settle(self._adjacent(plan), plan.run_id, lambda: run.aborted)
            final.ok = True
            final.result_json = json.dumps({"batches": plan.num_batches})
        except Exception as exc:
            fill_error(final, exc, self.name)
            self.engine.release()  # drop the failed batch's intermediate tensors
            if plan is not None:
                self.peers.abort(self._adjacent(plan), plan.run_id, final.error)
        except BaseException:  # cancelled: the researcher's session went away
            if plan is not None:
                self.peers.abort(
                    self._adjacent(plan), plan.run_id, f"worker {self.name!r}: the researcher's session ended"
                )
            raise
        finally:
            if run is not None:
                self.inbox.finish(run)
                self.peers.forget_run(run.run_id)
        final.transfers.extend(self.ledger_delta())
        yield final
