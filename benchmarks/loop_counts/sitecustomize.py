"""Event-loop passes, tasks and CPU of a ``splitnn worker``, for ``bench_batch_cost.py``.

On a worker's ``PYTHONPATH`` with ``SPLITNN_LOOP_COUNTS=DIR`` set, this counts the passes of the
asyncio event loop and the tasks created, and writes them with the process's CPU seconds to
``DIR/<party>.json`` four times a second. With ``SPLITNN_LOOP_YAPPI=1`` it also profiles the worker
with yappi (CPU clock) between the files ``DIR/reset`` and ``DIR/dump`` appearing, and saves the
profile as ``DIR/<party>.pstat``. Benchmark-only: the library never imports it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

OUT = os.environ.get("SPLITNN_LOOP_COUNTS")


def _install(out: str) -> None:
    import asyncio.base_events as base
    import gc

    counts = {"passes": 0, "tasks": 0, "gc0": 0, "gc1": 0, "gc2": 0, "gc_s": 0.0}
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:  # the collector's passes and the time they take
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            counts[f"gc{info['generation']}"] += 1
            counts["gc_s"] += time.perf_counter() - started[0]

    gc.callbacks.append(on_gc)
    run_once, create_task = base.BaseEventLoop._run_once, base.BaseEventLoop.create_task

    def counted_run_once(self):
        counts["passes"] += 1
        return run_once(self)

    def counted_create_task(self, *args, **kwargs):
        counts["tasks"] += 1
        return create_task(self, *args, **kwargs)

    base.BaseEventLoop._run_once = counted_run_once
    base.BaseEventLoop.create_task = counted_create_task
    name = sys.argv[sys.argv.index("--name") + 1] if "--name" in sys.argv else str(os.getpid())
    profile = os.environ.get("SPLITNN_LOOP_YAPPI") == "1"
    if profile:
        import yappi

        yappi.set_clock_type(os.environ.get("SPLITNN_LOOP_YAPPI_CLOCK", "cpu"))  # "wall": waits too
        yappi.start(builtins=False)

    def write() -> None:
        state = "run"
        while True:
            time.sleep(0.25)
            tmp = os.path.join(out, f"{name}.json.tmp")
            with open(tmp, "w") as fh:
                json.dump({**counts, "cpu": time.process_time()}, fh)
            os.replace(tmp, os.path.join(out, f"{name}.json"))
            if profile and state == "run" and os.path.exists(os.path.join(out, "reset")):
                yappi.clear_stats()
                state = "reset"
            if profile and state == "reset" and os.path.exists(os.path.join(out, "dump")):
                yappi.stop()
                yappi.get_func_stats().save(os.path.join(out, f"{name}.pstat"), type="pstat")
                open(os.path.join(out, f"{name}.done"), "w").close()
                state = "done"

    threading.Thread(target=write, daemon=True).start()


if OUT and "worker" in sys.argv:
    _install(OUT)
