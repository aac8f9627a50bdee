"""Time stamps along a lock-step batch, in a ``splitnn worker``, for ``bench_timeline.py``.

On a worker's ``PYTHONPATH`` with ``SPLITNN_TIMELINE=DIR`` set, this wraps, as their modules are imported, the
reads and writes of each peer link (a data frame over 10 KB: ``r`` when it came off the stream, ``s0``/``s1``
around its write) and the engine's calls (``put`` of a received tensor, ``forward``, ``loss``, ``backward``,
``step``, ``zero_grad``), and stamps each with ``time.perf_counter_ns`` (``CLOCK_MONOTONIC``: one clock for every
process of the machine). The stamps since ``DIR/reset`` appeared are written to ``DIR/<party>.json`` once
``DIR/dump`` appears. It knows the module layout of today's tree and of older ones (``splitnn.workers.peers``,
``splitnn.workers.virtual``). Benchmark-only: the library never imports it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import sys
import threading
import time

OUT = os.environ.get("SPLITNN_TIMELINE")
STAMPS: list[tuple[int, str, int]] = []
_now = time.perf_counter_ns
BIG = 10_000  # bytes: a data frame, not a control one


def _size(frame) -> int:
    try:
        return len(frame) if isinstance(frame, (bytes, bytearray, memoryview)) else sum(len(p) for p in frame)
    except TypeError:
        return 0


def _wrap_link(cls) -> None:
    init = cls.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        send, read = self._send, self._read

        async def stamped_send(frame):
            n = _size(frame)
            if n <= BIG:
                return await send(frame)
            STAMPS.append((_now(), "s0", n))
            await send(frame)
            STAMPS.append((_now(), "s1", n))

        async def stamped_read():
            frame = await read()
            n = _size(frame)
            if n > BIG:
                STAMPS.append((_now(), "r", n))
            return frame

        self._send, self._read = stamped_send, stamped_read

    cls.__init__ = __init__


def _wrap_call(cls, name: str) -> None:
    call = cls.__dict__.get(name) or getattr(cls, name, None)
    if call is None:
        return

    def stamped(self, *args, **kwargs):
        STAMPS.append((_now(), name + "0", 0))
        try:
            return call(self, *args, **kwargs)
        finally:
            STAMPS.append((_now(), name + "1", 0))

    setattr(cls, name, stamped)


def _patch(name: str, module) -> None:
    if name in ("splitnn.server.links", "splitnn.workers.peers"):
        _wrap_link(module.PeerLink)
    elif name == "splitnn.workers.virtual" and module.VirtualWorker.__module__ == name:
        for call in ("put", "forward", "loss", "backward", "step", "zero_grad"):
            _wrap_call(module.VirtualWorker, call)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in ("splitnn.server.links", "splitnn.workers.peers", "splitnn.workers.virtual"):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            _patch(name, module)

        spec.loader.exec_module = patched
        return spec


def _dumper(out: str, party: str) -> None:
    reset = False
    while True:
        time.sleep(0.2)
        if not reset and os.path.exists(os.path.join(out, "reset")):
            STAMPS.clear()
            reset = True
        if reset and os.path.exists(os.path.join(out, "dump")):
            tmp = os.path.join(out, f"{party}.json.tmp")
            with open(tmp, "w") as fh:
                json.dump(STAMPS, fh)
            os.replace(tmp, os.path.join(out, f"{party}.json"))
            return


if OUT and "worker" in sys.argv:
    sys.meta_path.insert(0, _Finder())
    _party = sys.argv[sys.argv.index("--name") + 1] if "--name" in sys.argv else str(os.getpid())
    threading.Thread(target=_dumper, args=(OUT, _party), daemon=True).start()
