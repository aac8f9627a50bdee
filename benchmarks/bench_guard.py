"""What the memory check of received segments costs, and what a process per session would cost.

1. The meta check (:mod:`splitnn.wire.budget`) of the first segment of ``SmallResNet(width=8)`` cut at
   ``layer1.1.conv2``, batch 32: the check itself (once per input shape) and a guarded forward against
   the same segment unguarded (medians of ``--repeats``).
2. A process per session, the alternative: the resident memory of an idle child that imports torch,
   and the median round trip of a 160 KB tensor's bytes over a pipe to it.

    python benchmarks/bench_guard.py [--repeats 50]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch

import splitnn
from splitnn.wire import module_to_spec, spec_to_module
from splitnn.wire.budget import check_forward, guard_segment


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _echo(conn) -> None:
    import torch  # noqa: F401  (what a session's process would hold)

    while True:
        b = conn.recv_bytes()
        if not b:
            break
        conn.send_bytes(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50)
    a = ap.parse_args()
    from tests.cut_models import SmallResNet  # a ResNet as a user writes it

    torch.manual_seed(0)
    plain = splitnn.cut(SmallResNet(width=8), at=["layer1.1.conv2", "layer2"])[0]
    spec = module_to_spec(plain)
    guarded = spec_to_module(spec)
    guarded.load_state_dict(plain.state_dict())
    with torch.device("meta"):
        twin = spec_to_module(spec)
    guard_segment(guarded, twin, 1 << 30)
    x = torch.randn(32, 1, 12, 12)
    check = _median_ms(lambda: check_forward(twin, (x,), {}, 1 << 30, "s"), a.repeats)
    with torch.no_grad():
        guarded(x), plain(x)  # warm up; the guarded one checks its input shape here, once
        rounds = [
            (_median_ms(lambda: plain(x), a.repeats), _median_ms(lambda: guarded(x), a.repeats)) for _ in range(3)
        ]
    p, g = (statistics.median(r[i] for r in rounds) for i in (0, 1))  # interleaved: noise hits both alike
    print(f"meta check {check:.1f} ms per new input shape; forward guarded {g:.3f} ms, unguarded {p:.3f} ms")

    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_echo, args=(there,))
    child.start()
    data = torch.randn(40960).numpy().tobytes()  # 160 KB
    trip = _median_ms(lambda: (here.send_bytes(data), here.recv_bytes()), a.repeats * 6)
    with open(f"/proc/{child.pid}/status") as fh:
        rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024
    here.send_bytes(b"")
    child.join()
    print(f"process per session: {rss:.0f} MB resident per idle child; 160 KB pipe round trip {trip:.3f} ms")


if __name__ == "__main__":
    main()
