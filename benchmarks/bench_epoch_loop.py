"""The workers' side of a shipped epoch without links: the three parties' epoch loops in one process.

    OMP_NUM_THREADS=1 PYTHONPATH=TREE/src python benchmarks/bench_epoch_loop.py [--epochs 30]

Three engines (alice, bob, claire) hold the tutorial network's segments and data, and each runs its
part of a shipped epoch of 60 batches of 64 (``run_epoch`` of the tree's ``server/shipped.py``, or
``workers/shipped.py`` in trees older than the server package); pushes and receives meet in futures, so
what is timed is the epoch loop and the engine around each compute call (the checks, the tensor store,
the ledger) and the torch calls themselves. Prints the process CPU per batch, best and median epoch.
Runs any tree (``PYTHONPATH``), so an old commit's worktree can be timed beside this one. Not a test:
nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from splitnn.models import tutorial_mlp
from splitnn.workers.epoch import BatchOrder, EpochPlan, StagePlan
from splitnn.workers.virtual import VirtualWorker

try:
    from splitnn.server import shipped
except ImportError:  # trees older than the server package
    from splitnn.workers import shipped

NAMES = ("alice", "bob", "claire")
BATCHES, BATCH = 60, 64


def _plans(run_id: int) -> dict[str, EpochPlan]:
    stages = [StagePlan(0, "s0", None, "bob"), StagePlan(1, "s1", "alice", "claire"), StagePlan(2, "s2", "bob", None)]
    order = BatchOrder(BATCHES * BATCH, BATCH)
    try:
        return {n: EpochPlan(run_id, "d", "nll", (stages[i],), order=order, chain=NAMES) for i, n in enumerate(NAMES)}
    except TypeError:  # trees whose plans carry no chain
        return {n: EpochPlan(run_id, "d", "nll", (stages[i],), order=order) for i, n in enumerate(NAMES)}


async def _epoch(workers: dict[str, VirtualWorker], plans: dict[str, EpochPlan]) -> None:
    """One shipped epoch of the three parties, their pushes and receives meeting in futures."""
    slots: dict[tuple, asyncio.Future] = {}

    def slot(key: tuple) -> asyncio.Future:
        fut = slots.get(key)
        if fut is None:
            fut = slots[key] = asyncio.get_running_loop().create_future()
        return fut

    async def party(me: str) -> None:
        async def push(peer, kind, fid, value):
            slot((peer, me, kind, fid)).set_result(value)

        async def receive(peer, kind, fid):
            return await slot((me, peer, kind, fid))

        async for _ in shipped.run_epoch(workers[me], plans[me], push, receive):
            pass

    await asyncio.gather(*(party(n) for n in NAMES))


async def _epochs(workers: dict[str, VirtualWorker], epochs: int) -> list[float]:
    times = []
    for run_id in range(1, epochs + 1):
        plans = _plans(run_id)
        t = time.process_time()
        await _epoch(workers, plans)
        times.append(time.process_time() - t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    workers = {n: VirtualWorker(n, fuse=False) for n in NAMES}
    for i, (n, segment) in enumerate(zip(NAMES, tutorial_mlp())):
        workers[n].add_segment(f"s{i}", segment, "sgd")
    workers["alice"].add_dataset("d", features=torch.randn(BATCHES * BATCH, 1, 28, 28))
    workers["claire"].add_dataset("d", labels=torch.randint(0, 10, (BATCHES * BATCH,)))
    asyncio.run(_epochs(workers, 1))  # warm-up
    times = sorted(asyncio.run(_epochs(workers, args.epochs)))
    best, median = (1e6 * t / BATCHES for t in (times[0], times[len(times) // 2]))
    print(f"{best:.0f} us CPU per batch (best epoch), {median:.0f} us (median), the three parties together")


if __name__ == "__main__":
    main()
