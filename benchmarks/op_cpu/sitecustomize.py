"""CPU time inside each party's compute calls, for ``bench_network.py --parties ... --op-cpu``.

On a worker's ``PYTHONPATH`` (the benchmark puts it there) with ``SPLITNN_OP_CPU=DIR`` set, this
wraps the engine's compute calls (forward, loss, backward, step, lock-step and pipelined) to sum the
calling thread's CPU time per party, and writes ``DIR/<party>.json`` twice a second. The benchmark
calls :func:`install` itself for in-process runs. Benchmark-only: the library never imports it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

COMPUTE_CALLS = (
    "forward",
    "loss",
    "backward",
    "step",
    "forward_in_flight",
    "loss_in_flight",
    "backward_in_flight",
    "step_in_flight",
)
#: party -> [calls, CPU seconds] inside the compute calls
totals: dict[str, list] = {}


def _timed(name: str, call):
    def timed(self, *args, **kwargs):
        t0 = time.thread_time()
        try:
            return call(self, *args, **kwargs)
        finally:
            total = totals.setdefault(self.name, [0, 0.0])
            total[0] += 1
            total[1] += time.thread_time() - t0

    timed.__name__ = name
    return timed


def install(out_dir: str | None = None) -> None:
    """Wrap the compute calls (once); with ``out_dir``, write the totals there twice a second."""
    from splitnn.workers.virtual import VirtualWorker

    if getattr(VirtualWorker, "_op_cpu", False):
        return
    for name in COMPUTE_CALLS:
        setattr(VirtualWorker, name, _timed(name, getattr(VirtualWorker, name)))
    VirtualWorker._op_cpu = True
    if out_dir is not None:
        threading.Thread(target=_write, args=(Path(out_dir),), daemon=True).start()


def _write(out: Path) -> None:
    while True:
        time.sleep(0.5)
        for party, (calls, seconds) in list(totals.items()):
            tmp = out / f".{party}.json"
            tmp.write_text(json.dumps({"calls": calls, "cpu_s": seconds}))
            os.replace(tmp, out / f"{party}.json")


if os.environ.get("SPLITNN_OP_CPU"):
    install(os.environ["SPLITNN_OP_CPU"])
