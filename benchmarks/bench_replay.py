"""What a transient fault costs: fit across worker processes, with and without a dropped connection.

Three ``splitnn worker`` processes on this machine; the researcher (``--link researcher``) or
alice and claire (``--link peers``) reach bob through a link emulator
(:mod:`splitnn.testing.linkemu`). One epoch of the tutorial network on ``--samples``
synthetic MNIST-shaped samples, batch 64, SGD with momentum, the per-op path or shipped epochs.
Each repeat runs once undisturbed and once with the connections through the emulator reset after
``--drop-at`` batches (no checkpoints: the researcher's stream is resumed; a pull is asked again,
a push sent again), interleaved; the report gives medians, their ratio, the bytes re-sent, and
per dropped run the streams resumed (researcher) or the pulls and pushes repeated (peers).

    python benchmarks/bench_replay.py [--samples 6400] [--repeats 5] [--drop-at 20] [--link researcher|peers]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.helpers

import torch  # noqa: E402

import splitnn  # noqa: E402
from splitnn.data import Dataset  # noqa: E402
from splitnn.models import tutorial_mlp  # noqa: E402
from splitnn.testing.cluster import Cluster  # noqa: E402
from splitnn.testing.linkemu import ThreadedLinkEmulator  # noqa: E402
from tests.helpers import at_batch  # noqa: E402

NAMES = ("alice", "bob", "claire")


def _data(n: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g), "bench", 10)


def _run(cl: Cluster, emu: ThreadedLinkEmulator, via: str, data: Dataset, ship: bool, drop_at: int | None, link: str):
    peers = link == "peers"
    urls = {n: (f"grpc://{via}" if n == "bob" and not peers else cl.workers[n].url) for n in NAMES}
    workers = [splitnn.connect(urls[n], token=cl.token, name=n) for n in NAMES]
    # only the link named drops: the peers reach bob through the emulator, or the researcher does
    workers[1].address = via if peers else cl.workers["bob"].address
    torch.manual_seed(0)
    model = splitnn.SplitNN(tutorial_mlp(), workers, optimizer="sgd:lr=0.03,momentum=0.9", ship_epochs=ship)
    if drop_at is not None:
        at_batch(model, drop_at, lambda: emu.drop("bob"))
    start = time.perf_counter()
    model.fit(data, epochs=1, batch_size=64, progress=False)
    seconds = time.perf_counter() - start
    if peers:  # what alice and claire sent again to bob, and how many pulls and pushes they repeated
        rows = [r for w in (workers[0], workers[2]) for r in w.stats()["counters"] if r["direction"] == "sent"]
        resent = sum(r["nbytes"] for r in rows if r["kind"] == "resent")
        resumed = sum(r["messages"] for r in rows if r["kind"] in ("repull", "repush"))
    else:
        resent = workers[1].counters.total(kind="resent")
        resumed = workers[1].resumed
    for w in workers:
        w.close(end_session=True)
    return seconds, resent, resumed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=6400)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--drop-at", type=int, default=20)
    ap.add_argument("--link", choices=("researcher", "peers"), default="researcher")
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    data = _data(args.samples)
    rows = []
    with tempfile.TemporaryDirectory() as root, Cluster(Path(root), lifetime=3600) as cl:
        for n in NAMES:
            cl.start(n)
        with ThreadedLinkEmulator() as emu:
            via = emu.add("bob", cl.workers["bob"].address)
            for ship in (False, True):
                times: dict[str, list[float]] = {"none": [], "drop": []}
                resent, resumed = [], []
                for _ in range(args.repeats):
                    times["none"].append(_run(cl, emu, via, data, ship, None, args.link)[0])
                    s, r, k = _run(cl, emu, via, data, ship, args.drop_at, args.link)
                    times["drop"].append(s)
                    resent.append(r)
                    resumed.append(k)
                none, drop = statistics.median(times["none"]), statistics.median(times["drop"])
                rows.append(
                    {
                        "path": "shipped" if ship else "per-op",
                        "undisturbed_s": none,
                        "dropped_s": drop,
                        "ratio": drop / none,
                        "resent_bytes_median": statistics.median(resent),
                        "resumed": resumed,
                    }
                )
    again = "resumes" if args.link == "researcher" else "pulls/pushes repeated"
    print(f"{'path':8} {'undisturbed s':>14} {'dropped s':>10} {'ratio':>6} {'re-sent B':>10}  {again}")
    for r in rows:
        print(
            f"{r['path']:8} {r['undisturbed_s']:14.3f} {r['dropped_s']:10.3f} {r['ratio']:6.2f} "
            f"{r['resent_bytes_median']:10.0f}  {r['resumed']}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
