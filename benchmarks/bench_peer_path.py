"""The peer links' push and receive path alone: CPU per round, in one process, no gRPC.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_peer_path.py [--rounds 10000]

Two sessions (alice's and bob's) with real :class:`~splitnn.server.links.PeerLink` objects, whose
streams are asyncio queues: alice pushes a 64 x 32 activation to bob (``SessionPeers.push``: kept
until acknowledged, framed, counted), bob receives it (``Inbox.admit``, decoding, ``Inbox.deliver``,
the wait the executor does) and pushes a gradient back, alice receives it. Prints the process CPU per
such round, best of the 1,000-round blocks (the least disturbed on a busy machine). Not a test: nothing
here asserts timings.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from types import SimpleNamespace

import torch

from splitnn.common.serde.setup import PeerAddress
from splitnn.server.executor import receiver
from splitnn.server.peers import PeerLink, Peers, SessionPeers
from splitnn.server.shipped import Inbox
from splitnn.transport.counters import ByteCounters
from splitnn.transport.limits import Limits
from splitnn.workers.epoch import BatchOrder, EpochPlan, StagePlan, push_id

BLOCK = 1000


def _party(name: str, other: str, scopes: dict) -> tuple[Peers, SimpleNamespace]:
    peers = Peers(name, "token", tls=None, limits=Limits(), counters=ByteCounters(), timeout=30.0, resolve=scopes.get)
    scope = SimpleNamespace(tag=f"{name}-tag", inbox=Inbox(name, 30.0), counters=ByteCounters())
    scope.peers = SessionPeers(peers, scope)
    scope.peers.addresses[other] = PeerAddress("127.0.0.1:1", f"{other}-tag")
    scopes[scope.tag] = scope
    return peers, scope


async def _main(rounds: int) -> list[float]:
    scopes: dict = {}
    pa, sa = _party("alice", "bob", scopes)
    pb, sb = _party("bob", "alice", scopes)
    a_to_b, b_to_a_acks, b_to_a, a_to_b_acks = (asyncio.Queue() for _ in range(4))

    def writer(queue: asyncio.Queue):
        async def send(frame) -> None:
            queue.put_nowait(frame)

        return send

    links = [
        PeerLink(pa, "bob", "bob-tag", writer(a_to_b), b_to_a_acks.get, scope=sa),  # alice dialled bob
        PeerLink(pb, "alice", "bob-tag", writer(b_to_a_acks), a_to_b.get),  # ... and bob accepted it
        PeerLink(pb, "alice", "alice-tag", writer(b_to_a), a_to_b_acks.get, scope=sb),  # bob dialled alice
        PeerLink(pa, "bob", "alice-tag", writer(a_to_b_acks), b_to_a.get),  # ... and alice accepted it
    ]
    pa._dialled[("alice-tag", "bob", "bob-tag")] = links[0]
    pb._dialled[("bob-tag", "alice", "alice-tag")] = links[2]
    for link in links:
        link._task = asyncio.get_running_loop().create_task(link.run())
    order = BatchOrder(8, 4)
    run_a = sa.inbox.start(EpochPlan(1, "d", "nll", (StagePlan(0, "s0", None, "bob"),), order=order))
    run_b = sb.inbox.start(EpochPlan(1, "d", "nll", (StagePlan(1, "s1", "alice", None),), order=order))
    receive_a, receive_b = receiver(sa.inbox, sa.peers, run_a), receiver(sb.inbox, sb.peers, run_b)
    x = torch.randn(64, 32)
    blocks: list[float] = []

    async def alice() -> None:
        t = time.process_time()
        for b in range(rounds):
            if b and b % BLOCK == 0:
                blocks.append(time.process_time() - t)
                t = time.process_time()
            fid = push_id(1, b, 0)
            await sa.peers.push("bob", "activation", fid, x)
            await receive_a("bob", "gradient", fid)

    async def bob() -> None:
        for b in range(rounds):
            fid = push_id(1, b, 0)
            await receive_b("alice", "activation", fid)
            await sb.peers.push("alice", "gradient", fid, x)

    await asyncio.gather(alice(), bob())
    for link in links:
        link.close()
    return blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10_000)
    args = parser.parse_args()
    blocks = sorted(asyncio.run(_main(max(args.rounds, 2 * BLOCK))))
    print(f"{1e6 * blocks[0] / BLOCK:.1f} us CPU per round (2 pushes, 2 receives), best of {len(blocks)} blocks")


if __name__ == "__main__":
    main()
